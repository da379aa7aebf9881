"""From a trained (unsharded) embedding collection to the exported row store.

Reads the tables out of the collections `compress` builds (stock, MEmCom, hashed, QR, and mixes
of them), then packs them for `CompressedEmbeddings` in the precision asked for.
"""

import dataclasses
from typing import Dict, Iterator, List, Optional, Tuple

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm, used to quantize)
import torch
from torch import Tensor, nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_memcom.export.inference import INDEX_FIELDS, CompressedEmbeddings, mix_params
from torchrec_memcom.modules.hash_embedding_bag import HashEmbeddingBagCollection
from torchrec_memcom.modules.memcom_embedding_bag import MEmComEmbeddingBagCollection
from torchrec_memcom.modules.mixed_embedding_bag import MixedEmbeddingBagCollection
from torchrec_memcom.modules.qr_embedding_bag import QREmbeddingBagCollection

METHODS = ("none", "memcom", "hash", "qr")
FP16_MAX = 65504.0


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked (the message says why and what to do)."""


@dataclasses.dataclass
class TableExport:
    """One trained table, as the export needs it.

    ``weight``: the rows ids read (``n x d`` stock, ``m x d`` MEmCom/hash, QR's quotient table);
    ``scalars``: MEmCom's per-entity scalars by slot; ``remainder``: QR's ``c x d`` table.
    """

    name: str
    features: List[str]
    method: str
    num_embeddings: int
    weight: Tensor
    hash: str = "mod"
    scalars: Optional[Tensor] = None
    remainder: Optional[Tensor] = None
    operation: str = "mult"

    @property
    def fp32_bytes(self) -> int:
        """Bytes of the trained float32 state."""
        parts = [self.weight, self.scalars, self.remainder]
        return sum(p.numel() * 4 for p in parts if p is not None)


def _leaves(collection: nn.Module) -> Iterator[nn.Module]:
    if isinstance(collection, MixedEmbeddingBagCollection):
        for child in collection.collections:
            yield from _leaves(child)
    else:
        yield collection


def collect_tables(collection: nn.Module) -> List[TableExport]:
    """Every table of ``collection`` (a model's EBC after ``compress``), detached float32."""
    out: List[TableExport] = []
    for c in _leaves(collection):
        configs = c.embedding_bag_configs()
        if type(c) is EmbeddingBagCollection:
            for cfg in configs:
                w = c.embedding_bags[cfg.name].weight
                out.append(TableExport(cfg.name, list(cfg.feature_names), "none", cfg.num_embeddings, w))
        elif isinstance(c, (MEmComEmbeddingBagCollection, HashEmbeddingBagCollection)):
            method = "memcom" if isinstance(c, MEmComEmbeddingBagCollection) else "hash"
            for cfg, t in zip(configs, c.tables):
                w = c.embedding_bags[t.name].weight
                scalars = c.entity_weights[t.name] if t.compressed and method == "memcom" else None
                out.append(TableExport(
                    t.name, list(cfg.feature_names), method if t.compressed else "none",
                    t.num_embeddings, w, hash=t.hash, scalars=scalars,
                ))
        elif isinstance(c, QREmbeddingBagCollection):
            for cfg, t in zip(configs, c.tables):
                if not t.compressed:
                    w = c.embeddings[t.name].weight
                    out.append(TableExport(t.name, list(cfg.feature_names), "none", t.num_embeddings, w))
                    continue
                out.append(TableExport(
                    t.name, list(cfg.feature_names), "qr", t.num_embeddings,
                    c.embeddings[f"{t.name}@q"].weight, remainder=c.embeddings[f"{t.name}@r"].weight,
                    operation=t.operation,
                ))
        else:
            names = [cfg.name for cfg in configs]
            raise ExportError(
                f"tables {names} are held by {type(c).__name__}, which export does not support "
                f"(it exports the methods {list(METHODS)})"
            )
    for t in out:
        for name in ("weight", "scalars", "remainder"):
            value = getattr(t, name)
            if value is not None:
                setattr(t, name, value.detach().float().contiguous())
    return out


def _check_values(what: str, values: Tensor, precision: str) -> None:
    """Refuse non-finite values, and values fp16 (or int8's fp16 scale and bias) cannot hold."""
    if not bool(torch.isfinite(values).all()):
        raise ExportError(f"{what} holds non-finite values: the trained model diverged")
    if precision != "fp32" and values.numel() and float(values.abs().max()) > FP16_MAX:
        raise ExportError(
            f"{what} holds values beyond fp16's range ({float(values.abs().max()):.4g} > "
            f"{FP16_MAX}): export with --precision fp32"
        )


def pack_rows(rows: Tensor, precision: str) -> Tuple[Tensor, Tensor]:
    """Float32 rows in the stored precision, and the per-row fp16 (scale, bias) of int8 rows.

    int8 is FBGEMM's row-wise quantization, as TorchRec quantizes INT8 tables (``d`` codes, then
    the fp16 scale and bias, per row), split into codes ``[R, d]`` and ``scale_bias [R, 2]``.
    """
    none = torch.zeros(0, 2, dtype=torch.float16)
    if precision == "fp32":
        return rows, none
    if precision == "fp16":
        return rows.half(), none
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(rows, 8)
    dim = rows.shape[1]
    return fused[:, :dim].contiguous(), fused[:, dim:].contiguous().view(torch.float16)


def build_embeddings(tables: List[TableExport], feature_names: List[str], precision: str) -> CompressedEmbeddings:
    """One row store (all tables, then QR remainder tables) and the per-feature index of ``feature_names``."""
    dims = {t.weight.shape[1] for t in tables}
    if len(dims) != 1:
        raise ExportError(f"all tables must share one embedding dim (DLRM's rule), got {sorted(dims)}")
    dim = dims.pop()
    blocks: List[Tensor] = []
    offset: Dict[str, int] = {}
    remainder_offset: Dict[str, int] = {}
    scalar_offset: Dict[str, int] = {}
    scalar_blocks: List[Tensor] = []
    rows = 0
    for t in tables:
        _check_values(f"table {t.name}", t.weight, precision)
        offset[t.name], rows = rows, rows + t.weight.shape[0]
        blocks.append(t.weight)
    for t in tables:
        if t.remainder is not None:
            _check_values(f"table {t.name} (QR remainder)", t.remainder, precision)
            remainder_offset[t.name], rows = rows, rows + t.remainder.shape[0]
            blocks.append(t.remainder)
    count = 0
    for t in tables:
        if t.scalars is not None:
            _check_values(f"table {t.name} (per-entity scalars)", t.scalars, precision)
            scalar_offset[t.name], count = count, count + t.scalars.numel()
            scalar_blocks.append(t.scalars)
    scalars = torch.cat(scalar_blocks + [torch.ones(1)])
    by_feature = {f: t for t in tables for f in t.features}
    unknown = [f for f in feature_names if f not in by_feature]
    if unknown:
        raise ExportError(f"features {unknown} have no table")
    fields: Dict[str, List[int]] = {name: [] for name in INDEX_FIELDS}
    for f in feature_names:
        t = by_feature[f]
        n = t.num_embeddings
        is_mix = t.method in ("memcom", "hash") and t.hash == "mix"
        mask, shift, mul1, mul2 = mix_params(n) if is_mix else (0, 1, 1, 1)
        qr = t.method == "qr"
        c = t.remainder.shape[0] if t.remainder is not None else 0
        values = {
            "num_embeddings": n,
            "div": c if qr else 1,
            "mod": t.weight.shape[0],
            "offset": offset[t.name],
            "scalar_stride": int(t.scalars is not None),
            "scalar_offset": scalar_offset.get(t.name, count),
            "qr_mod": (c if t.operation == "mult" else -c) if qr else 0,
            "qr_offset": remainder_offset.get(t.name, 0),
            "is_mix": int(is_mix),
            "mix_mask": mask,
            "mix_shift": shift,
            "mix_mul1": mul1,
            "mix_mul2": mul2,
        }
        for name in INDEX_FIELDS:
            fields[name].append(values[name])
    return CompressedEmbeddings(
        *pack_rows(torch.cat(blocks), precision),
        scalars if precision == "fp32" else scalars.half(),
        precision,
        dim,
        list(feature_names),
        {name: torch.tensor(v, dtype=torch.int64) for name, v in fields.items()},
    )
