"""From a trained (unsharded) embedding collection to row stores in an inference precision.

Reads the tables out of the collections `compress` builds (stock, MEmCom, hashed, QR, budgeted,
and mixes of them), then packs them for `CompressedEmbeddings` (budgeted tables:
`TieredEmbeddings`) in the precision asked for.
"""

import itertools
from typing import Any, Dict, Iterator, List, Tuple, Union, cast

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm, used to quantize)
import torch
from torch import Tensor, nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface

import torchrec_memcom.methods  # noqa: F401,E402  (registers the methods, whose tables export reads)
from torchrec_memcom.inference.records import AnyTable, BudgetedTableExport, TableExport, TierExport  # noqa: F401
from torchrec_memcom.inference.stores import (
    INDEX_FIELDS,
    TIER_FIELDS,
    TIERED_FEATURE_FIELDS,
    CompressedEmbeddings,
    JoinedEmbeddings,
    TieredEmbeddings,
    TierSlot,
    mix_params,
)
from torchrec_memcom.modules.mixed_embedding_bag import MixedEmbeddingBagCollection
from torchrec_memcom.registry import method_names, method_of_collection

FP16_MAX = 65504.0
# A row store ``build_stores`` makes: the plain tables' or the budgeted ones' of one dim.
Store = Union[CompressedEmbeddings, TieredEmbeddings]


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked (the message says why and what to do)."""


def _leaves(collection: nn.Module) -> Iterator[EmbeddingBagCollectionInterface]:
    """The collections holding the tables: a mixed collection's children, else ``collection``."""
    if isinstance(collection, MixedEmbeddingBagCollection):
        for child in collection.collections:
            yield from _leaves(child)
    else:
        yield cast(EmbeddingBagCollectionInterface, collection)


def _detached(t: AnyTable) -> None:
    """Detach ``t``'s tensors to contiguous float32 in place (ranks to int64)."""
    parts = [t] if isinstance(t, TableExport) else t.tiers
    for part in parts:
        for name in ("weight", "scalars", "remainder", "projection"):
            value = getattr(part, name, None)
            if value is not None:
                setattr(part, name, value.detach().float().contiguous())
    if isinstance(t, BudgetedTableExport) and t.ranks is not None:
        t.ranks = t.ranks.detach().long()


def collect_tables(collection: nn.Module) -> List[AnyTable]:
    """Every table of ``collection`` (a model's EBC after ``compress``), detached float32."""
    out: List[AnyTable] = []
    for c in _leaves(collection):
        configs = c.embedding_bag_configs()
        method = method_of_collection(c)
        if type(c) is EmbeddingBagCollection:
            out.extend(
                TableExport(
                    cfg.name, list(cfg.feature_names), "none", cfg.num_embeddings, c.embedding_bags[cfg.name].weight
                )
                for cfg in configs
            )
        elif method is not None and method.export is not None:
            out.extend(method.export(c))
        else:
            names = [cfg.name for cfg in configs]
            raise ExportError(
                f"tables {names} are held by {type(c).__name__}, which export does not support "
                f"(it exports the methods {method_names(with_none=True)})"
            )
    for t in out:
        _detached(t)
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


def build_stores(tables: List[AnyTable], feature_names: List[str], precision: str) -> List[Store]:
    """The row stores of ``feature_names``: per embedding dim, a ``CompressedEmbeddings`` of
    their stock, MEmCom, hashed and QR tables and a ``TieredEmbeddings`` of their budgeted ones,
    in the order of their first features, each holding its features in ``feature_names`` order."""
    by_feature: Dict[str, AnyTable] = {}
    for t in tables:
        for f in t.features:
            if f in by_feature:
                raise ExportError(
                    f"feature {f!r} is read by tables {by_feature[f].name!r} and {t.name!r}; "
                    f"inference needs one table per feature"
                )
            by_feature[f] = t
    unknown = [f for f in feature_names if f not in by_feature]
    if unknown:
        raise ExportError(f"features {unknown} have no table")
    groups: Dict[Tuple[bool, int], List[str]] = {}
    for f in feature_names:
        t = by_feature[f]
        groups.setdefault((isinstance(t, BudgetedTableExport), t.embedding_dim), []).append(f)
    stores: List[Store] = []
    for (budgeted, dim), features in groups.items():
        names = {by_feature[f].name for f in features}
        group = [t for t in tables if t.name in names]
        # the group's tables are all budgeted or none (grouped by that)
        if budgeted:
            stores.append(tiered_store(cast(List[BudgetedTableExport], group), features, precision, dim))
        else:
            stores.append(row_store(cast(List[TableExport], group), features, precision, dim))
    return stores


def join_stores(stores: List[Store], feature_names: List[str]) -> nn.Module:
    """The lookup of ids ``[B, F]`` of ``feature_names`` (one per feature, in this order) from
    ``build_stores``' stores of one dim: the only store, or the plain and the tiered one joined."""
    dims = sorted({s.dim for s in stores})
    if len(dims) != 1:
        raise ExportError(f"all tables must share one embedding dim (DLRM's rule), got {dims}")
    stores = [
        s
        if s.feature_names == [f for f in feature_names if f in s.feature_names]
        else s.reordered([f for f in feature_names if f in s.feature_names])
        for s in stores
    ]
    if len(stores) == 1:
        return stores[0]
    plain, tiered = stores if isinstance(stores[1], TieredEmbeddings) else stores[::-1]
    assert isinstance(plain, CompressedEmbeddings) and isinstance(tiered, TieredEmbeddings)
    return JoinedEmbeddings(plain, tiered, [feature_names.index(f) for f in tiered.feature_names])


def build_embeddings(tables: List[AnyTable], feature_names: List[str], precision: str) -> nn.Module:
    """The lookup of ids ``[B, F]`` of ``feature_names``: a ``CompressedEmbeddings`` of the
    tables; with budgeted tables, a ``TieredEmbeddings`` of those, joined to one of the others
    if there are any."""
    dims = {t.embedding_dim for t in tables}
    if len(dims) != 1:
        raise ExportError(f"all tables must share one embedding dim (DLRM's rule), got {sorted(dims)}")
    return join_stores(build_stores(tables, feature_names, precision), feature_names)


def row_store(tables: List[TableExport], feature_names: List[str], precision: str, dim: int) -> CompressedEmbeddings:
    """One row store (all tables, then QR remainder tables) and the per-feature index of ``feature_names``."""
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
    fields: Dict[str, List[int]] = {name: [] for name in INDEX_FIELDS}
    for f in feature_names:
        t = by_feature[f]
        n = t.num_embeddings
        is_mix = t.hash == "mix"
        mask, shift, mul1, mul2 = mix_params(n) if is_mix else (0, 1, 1, 1)
        qr = t.remainder is not None
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


def _index_dtype(largest: int) -> torch.dtype:
    """The smallest signed integer type that holds ``0 .. largest``."""
    return next(t for t in (torch.int8, torch.int16, torch.int32, torch.int64) if largest <= torch.iinfo(t).max)


def tiered_store(
    tables: List[BudgetedTableExport], feature_names: List[str], precision: str, dim: int
) -> TieredEmbeddings:
    """The budgeted tables as one ``TieredEmbeddings``: tier rows in ``precision``, in one store
    per slot (the ``k``-th tier of each dim of every table), MEmCom tiers' scalars (then a 1.0),
    the remapped tables' ranks in the smallest integer type that holds them, and per feature its
    table's projections at their slots' columns (fp32)."""
    placed = []  # (table, tier index, tier, slot key): a slot is (dim, k-th tier of that dim)
    for t in tables:
        for j, tier in enumerate(t.tiers):
            placed.append((t, j, tier, (tier.dim, sum(x.dim == tier.dim for x in t.tiers[:j]))))
    keys = sorted({key for *_, key in placed}, key=lambda k: (-k[0], k[1]))
    columns, width = {}, 0
    for key in keys:
        if key[0] != dim:
            columns[key], width = width, width + key[0]
    slot_rows: Dict[Tuple[int, int], List[Tensor]] = {key: [] for key in keys}
    slot_scale_bias: Dict[Tuple[int, int], List[Tensor]] = {key: [] for key in keys}
    tiers: Dict[str, List[int]] = {name: [] for name in TIER_FIELDS}
    first_tier: Dict[str, int] = {}
    scalars: List[Tensor] = []
    scalar_count = 0
    projections = {t.name: torch.zeros(width, dim) for t in tables}
    for t, j, tier, key in placed:
        first_tier.setdefault(t.name, len(tiers["tier_start"]))
        what = f"table {t.name} tier {j}"
        _check_values(what, tier.weight, precision)
        if tier.scalars is not None:
            _check_values(f"{what} (per-entity scalars)", tier.scalars, precision)
        if tier.projection is not None:
            _check_values(f"{what} (projection)", tier.projection, "fp32")
            projections[t.name][columns[key] : columns[key] + tier.dim] = tier.projection.t()
        codes, scale_bias = pack_rows(tier.weight, precision)
        fields = {
            "tier_start": sum(x.rows for x in t.tiers[:j]),
            "tier_mod": tier.weight.shape[0],
            "tier_slot": keys.index(key),
            "tier_row": sum(r.shape[0] for r in slot_rows[key]),
            "scalar_stride": int(tier.scalars is not None),
            "scalar_offset": scalar_count,
        }
        for name in TIER_FIELDS:
            tiers[name].append(fields[name])
        slot_rows[key].append(codes)
        slot_scale_bias[key].append(scale_bias)
        if tier.scalars is not None:
            scalars.append(tier.scalars)
            scalar_count += tier.scalars.numel()
    # tiers without scalars read the trailing 1.0
    tiers["scalar_offset"] = [o if s else scalar_count for o, s in zip(tiers["scalar_offset"], tiers["scalar_stride"])]
    ranks: List[Tensor] = []
    remap_offset: Dict[str, int] = {}
    for t in tables:
        if t.ranks is None:
            continue
        if t.ranks.shape != (t.num_embeddings,) or bool(((t.ranks < 0) | (t.ranks >= t.num_embeddings)).any()):
            raise ExportError(
                f"table {t.name}: its remap (the rank of every id) is not {t.num_embeddings} ranks "
                f"in [0, {t.num_embeddings}): the checkpoint is damaged"
            )
        remap_offset[t.name] = sum(r.numel() for r in ranks)
        ranks.append(t.ranks)
    starts_width = max(len(t.tiers) for t in tables) - 1
    by_feature = {f: t for t in tables for f in t.features}
    features: Dict[str, List[Any]] = {name: [] for name in TIERED_FEATURE_FIELDS}
    for f in feature_names:
        t = by_feature[f]
        later = list(itertools.accumulate(x.rows for x in t.tiers[:-1]))
        values = {
            "num_embeddings": t.num_embeddings,
            "remap_stride": int(t.ranks is not None),
            "remap_offset": remap_offset.get(t.name, 0),
            "tier_base": first_tier[t.name],
            "starts": later + [t.num_embeddings] * (starts_width - len(later)),
        }
        for name in TIERED_FEATURE_FIELDS:
            features[name].append(values[name])
    slots = [
        TierSlot(i, columns.get(key, -1), torch.cat(slot_rows[key]), torch.cat(slot_scale_bias[key]), precision)
        for i, key in enumerate(keys)
    ]
    remap = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64)
    scalar_store = torch.cat(scalars + [torch.ones(1)])
    return TieredEmbeddings(
        slots,
        scalar_store if precision == "fp32" else scalar_store.half(),
        remap.to(_index_dtype(max(t.num_embeddings for t in tables) - 1)),
        torch.stack([projections[by_feature[f].name] for f in feature_names]),
        list(feature_names),
        {
            name: torch.tensor(v, dtype=torch.int64).view(len(feature_names), starts_width)
            if name == "starts"
            else torch.tensor(v, dtype=torch.int64)
            for name, v in features.items()
        },
        {name: torch.tensor(v, dtype=torch.int64) for name, v in tiers.items()},
    )
