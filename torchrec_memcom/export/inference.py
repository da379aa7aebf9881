"""The exported Criteo DLRM: plain-torch modules that TorchScript compiles into one file.

Nothing here runs TorchRec or FBGEMM code: an edge box that loads the file has only torch. The
26 tables are one of `torchrec_memcom.inference`'s row stores (`CompressedEmbeddings`, or
`TieredEmbeddings` for budgeted tables), read one id per feature; the dense MLPs are TorchRec's
own modules, compiled as they are; the interaction is rewritten here with the same arithmetic,
for TorchScript (DCN's cross net) and for speed (DLRM's pairwise products).
"""

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Tuple, Union

import torch
from torch import Tensor, nn

from torchrec_memcom.inference.stores import PRECISIONS  # noqa: F401  (the CLI's choices)

if TYPE_CHECKING:  # for its type only: the exported file runs no TorchRec code
    from torchrec.modules.crossnet import LowRankCrossNet

ID_MAPS = ("mod", "vocab", "none")


class RawIdMap(nn.Module):
    """Raw Criteo categorical values -> table ids, the mapping the data folder was made with.

    ``mod`` (``memcom data convert``'s default): ``id = value % num_embeddings`` with ``value``
    read as uint64 (the int64 input's bits), as the converter does. ``vocab`` (frequency mode, or
    synthetic data): sorted keys ``(feature << 32) | value`` and their ids; values not in it get
    id 0 (frequency mode's rare id). ``none``: left out at export; raw values are refused.

    Args:
        kind: "mod", "vocab" or "none".
        modulus: int64 ``[F]``, each feature's ``num_embeddings`` (``mod``).
        keys: int64, the sorted vocabulary keys (``vocab``; else empty).
        ids: the table id of each key (``vocab``; else empty).

    Example::

        empty = torch.zeros(0, dtype=torch.int64)
        id_map = RawIdMap("mod", torch.full((26,), 1000), empty, empty.int())
        id_map(torch.tensor([[0x68FD1E64] * 26]))  # [[852] * 26]: 0x68FD1E64 % 1000
    """

    kind: torch.jit.Final[str]
    # buffers, registered in __init__, declared for type checkers
    modulus: Tensor
    carry: Tensor
    keys: Tensor
    ids: Tensor
    feature_bits: Tensor

    def __init__(self, kind: str, modulus: Tensor, keys: Tensor, ids: Tensor) -> None:
        super().__init__()
        if kind not in ID_MAPS:
            raise ValueError(f"id map kind must be one of {ID_MAPS}, got {kind!r}")
        self.kind = kind
        self.register_buffer("modulus", modulus)
        # 2**63 % n: what the sign bit of an int64 input adds to its uint64 value, modulo n
        self.register_buffer("carry", (0x7FFFFFFFFFFFFFFF % modulus + 1) % modulus)
        self.register_buffer("keys", keys)
        self.register_buffer("ids", ids)
        self.register_buffer("feature_bits", torch.arange(len(modulus), dtype=torch.int64) << 32)

    def forward(self, raw: Tensor) -> Tensor:
        if self.kind == "none":
            raise RuntimeError(
                "this model was exported without its raw-id map (--no-raw-ids): map raw values to "
                "table ids yourself and call forward(dense, ids)"
            )
        if self.kind == "mod":
            low = (raw & 0x7FFFFFFFFFFFFFFF) % self.modulus  # the uint64 value less its top bit
            return torch.where(raw < 0, (low + self.carry) % self.modulus, low)
        known = (raw >= 0) & (raw < 4294967296)
        query = self.feature_bits | (raw & 0xFFFFFFFF)
        pos = torch.searchsorted(self.keys, query).clamp(max=self.keys.numel() - 1)
        hit = known & (self.keys[pos] == query)
        return torch.where(hit, self.ids[pos].long(), torch.zeros_like(raw))


class FlatInteractionArch(nn.Module):
    """TorchRec's DLRM ``InteractionArch`` (dot products of every pair of the dense and sparse
    embeddings), taking the upper triangle with one ``index_select`` of the flattened products
    instead of 2-D advanced indexing: the same values, several times faster on CPU.

    Args:
        triu_indices: the stock arch's ``triu_indices`` (the pairs, ``[2, P]``).
        num_sparse_features: ``F``, the sparse features.

    Example::

        arch = InteractionArch(num_sparse_features=26)
        flat = FlatInteractionArch(arch.triu_indices, num_sparse_features=26)
        flat(dense, sparse)  # equal to arch(dense, sparse): [B, d + 27 * 26 / 2]
    """

    pairs: Tensor  # a buffer, registered in __init__, declared for type checkers

    def __init__(self, triu_indices: Tensor, num_sparse_features: int) -> None:
        super().__init__()
        self.register_buffer("pairs", triu_indices[0] * (num_sparse_features + 1) + triu_indices[1])

    def forward(self, dense_features: Tensor, sparse_features: Tensor) -> Tensor:
        combined = torch.cat((dense_features.unsqueeze(1), sparse_features), dim=1)
        interactions = torch.bmm(combined, combined.transpose(1, 2))
        return torch.cat((dense_features, interactions.flatten(1).index_select(1, self.pairs)), dim=1)


class StackedLowRankCrossNet(nn.Module):
    """TorchRec's ``LowRankCrossNet`` (DLRM_DCN's interaction) with its per-layer kernels stacked
    into tensors: the same arithmetic, in a form TorchScript compiles (it cannot index a
    ParameterList with a loop variable).

    Args:
        crossnet: the trained ``LowRankCrossNet`` (its kernels are copied).

    Example::

        crossnet = LowRankCrossNet(in_features=64, num_layers=3, low_rank=8)
        torch.jit.script(StackedLowRankCrossNet(crossnet))(x)  # equal to crossnet(x)
    """

    num_layers: torch.jit.Final[int]

    def __init__(self, crossnet: "LowRankCrossNet") -> None:
        super().__init__()
        self.num_layers = len(crossnet.W_kernels)
        self.W_kernels = nn.Parameter(torch.stack([w.detach() for w in crossnet.W_kernels]))
        self.V_kernels = nn.Parameter(torch.stack([v.detach() for v in crossnet.V_kernels]))
        self.bias = nn.Parameter(torch.stack([b.detach() for b in crossnet.bias]))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in range(self.num_layers):
            x_v = torch.nn.functional.linear(x, self.V_kernels[layer])
            x = x0 * (torch.nn.functional.linear(x_v, self.W_kernels[layer]) + self.bias[layer]) + x
        return x


class InferenceDLRM(nn.Module):
    """The exported DLRM: ``forward(dense [B, 13] float32, ids [B, 26] int64) -> P(click) [B]``.

    ``dense`` is the data path's ``log(max(x, 0) + 1)``; ``ids`` are the table ids (what the
    Parquet shards hold). ``score_raw`` takes raw Criteo values instead and applies the same
    preprocessing as the data path; ``metadata`` is a JSON string describing the file.
    ``memcom export`` builds it from a checkpoint and compiles it.

    Args:
        embeddings: the row store: ids ``[B, F]`` -> embeddings ``[B, F, d]``.
        id_map: raw values -> table ids, for ``score_raw``.
        dense_arch: the trained DLRM's dense arch.
        inter_arch: its interaction (``FlatInteractionArch``, or DCN's with a
            ``StackedLowRankCrossNet``).
        over_arch: its over arch.
        num_dense: the dense features (13 for Criteo).
        metadata: the JSON string the file carries.

    Example::

        model = load_model("model.pt")
        model(dense, ids)  # P(click) [B]
        model.score_raw(batch.ints, batch.cats)  # of raw lines: a RawBatch of read_batches
        json.loads(model.metadata)["tables"]
    """

    def __init__(
        self,
        embeddings: nn.Module,
        id_map: RawIdMap,
        dense_arch: nn.Module,
        inter_arch: nn.Module,
        over_arch: nn.Module,
        num_dense: int,
        metadata: str,
    ) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.id_map = id_map
        self.dense_arch = dense_arch
        self.inter_arch = inter_arch
        self.over_arch = over_arch
        self.num_dense = num_dense
        self.metadata = metadata

    def forward(self, dense: Tensor, ids: Tensor) -> Tensor:
        if dense.dim() != 2 or dense.size(1) != self.num_dense or dense.size(0) != ids.size(0):
            raise ValueError(
                "dense must be float [batch, {}] with the batch of ids {}, got {}".format(
                    self.num_dense, list(ids.shape), list(dense.shape)
                )
            )
        sparse = self.embeddings(ids)
        logits = self.over_arch(self.inter_arch(self.dense_arch(dense.float()), sparse))
        return torch.sigmoid(logits.squeeze(-1))

    @torch.jit.export
    def preprocess(self, raw_ints: Tensor, raw_cats: Tensor) -> Tuple[Tensor, Tensor]:
        """Raw integer features ``[B, 13]`` and categorical values ``[B, 26]`` (int64; missing
        as 0, hex values above 2**63 as their int64 bits) -> ``(dense, ids)`` for ``forward``."""
        dense = torch.log1p(raw_ints.clamp(min=0).double()).float()
        return dense, self.id_map(raw_cats)

    @torch.jit.export
    def score_raw(self, raw_ints: Tensor, raw_cats: Tensor) -> Tensor:
        """P(click) of raw Criteo values: ``forward(*preprocess(raw_ints, raw_cats))``."""
        dense, ids = self.preprocess(raw_ints, raw_cats)
        return self.forward(dense, ids)

    @torch.jit.export
    def embed(self, ids: Tensor) -> Tensor:
        """The per-feature embeddings ``[B, 26, d]`` that ``forward`` feeds the interaction."""
        return self.embeddings(ids)


def load_model(path: Union[str, Path]) -> torch.jit.ScriptModule:
    """An exported file, with plain torch. (torch 2.13 marks TorchScript deprecated; it still
    loads in Python and in libtorch, which is what an edge box has, so the warning is muted.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")
