"""The exported inference model: plain-torch modules that TorchScript compiles into one file.

Nothing here runs TorchRec or FBGEMM code: an edge box that loads the file has only torch. The
26 tables (stock, MEmCom, hashed or QR) become one row store plus per-feature index arithmetic,
so a batch costs the same few tensor ops whatever the number of features; budgeted tables, whose
tiers have dims of their own, get stores of their own (`TieredEmbeddings`). The dense MLPs are
TorchRec's own modules, compiled as they are; the interaction is rewritten here with the same
arithmetic, for TorchScript (DCN's cross net) and for speed (DLRM's pairwise products).
"""

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

# The multipliers of `torchrec_memcom.modules.hashing`'s mix bijection, which `CompressedEmbeddings`
# repeats in TorchScript (the mix-hash export tests pin the two together).
_MUL1 = 0x2545F4914F6CDD1D
_MUL2 = 0x7FB5D329728EA185

PRECISIONS = ("fp32", "fp16", "int8")
ID_MAPS = ("mod", "vocab", "none")
INDEX_FIELDS = (
    "num_embeddings", "div", "mod", "offset", "scalar_stride", "scalar_offset", "qr_mod", "qr_offset",
    "is_mix", "mix_mask", "mix_shift", "mix_mul1", "mix_mul2",
)
TIERED_FEATURE_FIELDS = ("num_embeddings", "remap_stride", "remap_offset", "tier_base", "starts")
TIER_FIELDS = ("tier_start", "tier_mod", "tier_slot", "tier_row", "scalar_stride", "scalar_offset")


def mix_params(num_embeddings: int) -> Tuple[int, int, int, int]:
    """(mask, shift, mul1, mul2) of the mix bijection of ``[0, 2**bits)`` for a table of ``n`` ids."""
    bits = max(1, (num_embeddings - 1).bit_length())
    mask = (1 << bits) - 1
    return mask, max(1, bits // 2), (_MUL1 & mask) | 1, (_MUL2 & mask) | 1


def check_shape(ids: Tensor, num_features: int) -> None:
    """Raise unless ``ids`` is int64 ``[batch, num_features]``."""
    if ids.dim() != 2 or ids.size(1) != num_features or ids.dtype != torch.int64:
        raise ValueError(
            "ids must be int64 [batch, {}] (one id per feature), got {} {}".format(
                num_features, ids.dtype, list(ids.shape)
            )
        )


def check_ids(ids: Tensor, num_embeddings: Tensor, feature_names: List[str]) -> None:
    """Raise naming the feature for ids outside ``[0, n)`` (they would read other tables)."""
    check_shape(ids, len(feature_names))
    bad = (ids < 0) | (ids >= num_embeddings)
    if bool(bad.any()):
        at = torch.nonzero(bad)[0]
        f = int(at[1])
        raise ValueError(
            "feature {}: id {} (row {}) is outside [0, {})".format(
                feature_names[f], int(ids[at[0], f]), int(at[0]), int(num_embeddings[f])
            )
        )


def gather_rows(rows: Tensor, scale_bias: Tensor, precision: str, at: Tensor, weights: Optional[Tensor]) -> Tensor:
    """Float32 rows ``at`` of a row store, each times its weight if given. For int8 the weight
    scales the row's scale and bias, so the ``[N, d]`` codes are touched once."""
    picked = rows.index_select(0, at)
    if precision == "int8":
        sb = scale_bias.index_select(0, at).float()
        if weights is not None:
            sb = sb * weights.unsqueeze(1)
        return picked.float() * sb[:, :1] + sb[:, 1:]  # faster than addcmul here
    out = picked.float() if precision == "fp16" else picked
    return out if weights is None else out * weights.unsqueeze(1)


class CompressedEmbeddings(nn.Module):
    """Ids ``[B, F]`` (one per feature) -> embeddings ``[B, F, d]`` from one row store.

    Per feature ``f``: slot ``s = id`` (or the mix bijection), row ``(s // div[f]) % mod[f] +
    offset[f]`` of ``rows``; MEmCom features scale it by ``scalars[s + scalar_offset[f]]``, QR
    features multiply (or add) row ``s % qr_mod[f] + qr_offset[f]``. ``rows`` is float32,
    float16, or int8 row-wise: uint8 codes ``[R, d]`` with an fp16 ``(scale, bias)`` per row in
    ``scale_bias`` (the numbers of FBGEMM's fused rows, TorchRec's INT8 tables, kept as two
    tensors). They are dequantized here in plain torch, after the gather, because the edge box
    that loads the file has no FBGEMM.
    """

    precision: torch.jit.Final[str]
    dim: torch.jit.Final[int]
    num_features: torch.jit.Final[int]
    has_mix: torch.jit.Final[bool]
    has_div: torch.jit.Final[bool]
    has_scalars: torch.jit.Final[bool]
    has_qr: torch.jit.Final[bool]

    def __init__(
        self,
        rows: Tensor,
        scale_bias: Tensor,
        scalars: Tensor,
        precision: str,
        dim: int,
        feature_names: List[str],
        index: Dict[str, Tensor],
    ) -> None:
        """``index``: per feature (``[F]`` each) the fields of ``INDEX_FIELDS``.

        ``div``, ``mod``, ``offset``: the row; ``scalar_stride`` 1 and ``scalar_offset`` for
        MEmCom features (``scalars`` ends with a 1.0 that the others read with stride 0);
        ``qr_mod`` 0 (not QR), ``c`` (QR, multiply) or ``-c`` (QR, add) with ``qr_offset``;
        ``is_mix`` and the mix bijection's ``mix_mask``, ``mix_shift``, ``mix_mul1``, ``mix_mul2``.
        """
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        missing = set(INDEX_FIELDS) - set(index)
        if missing:
            raise ValueError(f"index lacks {sorted(missing)}")
        self.precision = precision
        self.dim = dim
        self.num_features = len(feature_names)
        self.feature_names = feature_names
        self.register_buffer("rows", rows)
        self.register_buffer("scale_bias", scale_bias)
        self.register_buffer("scalars", scalars)
        for name in INDEX_FIELDS:
            values = index[name].clone()
            self.register_buffer(name, values.bool() if name == "is_mix" else values.long())
        self.has_mix = bool(index["is_mix"].any())
        self.has_div = bool((index["div"] != 1).any())
        self.has_scalars = bool((index["scalar_stride"] != 0).any())
        self.has_qr = bool((index["qr_mod"] != 0).any())

    def _mix_bits(self, x: Tensor) -> Tensor:
        for mul in (self.mix_mul1, self.mix_mul2):
            x = x ^ (x >> self.mix_shift)
            x = (x * mul) & self.mix_mask
        return x ^ (x >> self.mix_shift)

    def slots(self, ids: Tensor) -> Tensor:
        """The MEmCom/hash slot of every id: the id, or its mix bijection (cycle-walked into range)."""
        if not self.has_mix:
            return ids
        out = self._mix_bits(ids)
        outside = self.is_mix & (out >= self.num_embeddings)
        while bool(outside.any()):
            out = torch.where(outside, self._mix_bits(out), out)
            outside = self.is_mix & (out >= self.num_embeddings)
        return torch.where(self.is_mix, out, ids)

    def forward(self, ids: Tensor) -> Tensor:
        check_ids(ids, self.num_embeddings, self.feature_names)
        batch = ids.size(0)
        slot = self.slots(ids)
        quotient = torch.div(slot, self.div, rounding_mode="floor") if self.has_div else slot
        weights: Optional[Tensor] = None
        if self.has_scalars:
            weights = self.scalars.index_select(0, (slot * self.scalar_stride + self.scalar_offset).flatten()).float()
        at = ((quotient % self.mod) + self.offset).flatten()
        emb = gather_rows(self.rows, self.scale_bias, self.precision, at, weights)
        emb = emb.view(batch, self.num_features, self.dim)
        if self.has_qr:
            qr_mod = self.qr_mod.abs().clamp(min=1)
            at = ((slot % qr_mod) + self.qr_offset).flatten()
            other = gather_rows(self.rows, self.scale_bias, self.precision, at, None)
            other = other.view(batch, self.num_features, self.dim)
            mult = (self.qr_mod > 0).view(1, -1, 1)
            add = (self.qr_mod < 0).view(1, -1, 1)
            emb = torch.where(mult, emb * other, torch.where(add, emb + other, emb))
        return emb


class TierSlot(nn.Module):
    """The rows of one tier position of all budgeted tables: the ``k``-th tier of dim ``dim`` of
    each table that has one, in one row store (``rows`` and, for int8, ``scale_bias``).

    ``column``: where the slot's vectors sit side by side for the projections; -1 for a slot at
    the model dim, whose tiers have no projection.
    """

    index: torch.jit.Final[int]
    column: torch.jit.Final[int]
    dim: torch.jit.Final[int]
    precision: torch.jit.Final[str]

    def __init__(self, index: int, column: int, rows: Tensor, scale_bias: Tensor, precision: str) -> None:
        super().__init__()
        self.index = index
        self.column = column
        self.dim = rows.shape[1]
        self.precision = precision
        self.register_buffer("rows", rows)
        self.register_buffer("scale_bias", scale_bias)

    def forward(self, slot: Tensor, at: Tensor, weights: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """The entries whose tier is in this slot, and their rows ``at`` (times ``weights``)."""
        picked = torch.nonzero(slot == self.index).squeeze(1)
        scale = None if weights is None else weights.index_select(0, picked)
        return picked, gather_rows(self.rows, self.scale_bias, self.precision, at.index_select(0, picked), scale)


class TieredEmbeddings(nn.Module):
    """Ids ``[B, F]`` of budgeted tables' features -> embeddings ``[B, F, d]``.

    ``BudgetedEmbeddingBagCollection`` for bags of one id. Per feature ``f``: the id's frequency
    rank ``r`` is ``remap[id * remap_stride[f] + remap_offset[f]]`` (stride 0: the id itself, the
    table's ids being in rank order already); its tier ``g = tier_base[f] + #{starts[f] <= r}``
    (``starts``: the table's tier starts after the first, padded with ``n``); its row in the
    tier ``r - tier_start[g]``, stored at ``row % tier_mod[g]`` (a MEmCom tier's shared rows; else
    ``tier_mod`` is the tier's rows), row ``tier_row[g] + stored`` of slot ``tier_slot[g]``,
    times ``scalars[row * scalar_stride[g] + scalar_offset[g]]`` (MEmCom tiers; the others read
    the trailing 1.0); these per-tier fields are the columns of ``tier_index``. A row of a tier at
    the model dim is the embedding; the other slots' rows sit side by side (``[W]``, 0 but in the
    entry's own slot) and go through ``projections[f]`` (``[W, d]``: the table's tier
    projections, transposed, at their slots' columns): the module's projection of its tiers'
    pools side by side, with identity for tiers at ``d``.
    """

    num_features: torch.jit.Final[int]
    dim: torch.jit.Final[int]
    has_remap: torch.jit.Final[bool]
    has_scalars: torch.jit.Final[bool]
    has_projections: torch.jit.Final[bool]

    def __init__(
        self,
        slots: List[TierSlot],
        scalars: Tensor,
        remap: Tensor,
        projections: Tensor,
        feature_names: List[str],
        features: Dict[str, Tensor],
        tiers: Dict[str, Tensor],
    ) -> None:
        """``features``: ``[F]`` each of ``TIERED_FEATURE_FIELDS`` (``starts`` ``[F, K - 1]``);
        ``tiers``: ``[G]`` each of ``TIER_FIELDS``; ``projections`` ``[F, W, d]``."""
        super().__init__()
        missing = (set(TIERED_FEATURE_FIELDS) - set(features)) | (set(TIER_FIELDS) - set(tiers))
        if missing:
            raise ValueError(f"index lacks {sorted(missing)}")
        self.num_features = len(feature_names)
        self.dim = projections.shape[2]
        self.feature_names = feature_names
        self.slots = nn.ModuleList(slots)
        self.register_buffer("scalars", scalars)
        self.register_buffer("remap", remap)
        self.register_buffer("projections", projections)
        for name in TIERED_FEATURE_FIELDS:
            self.register_buffer(name, features[name].clone().long())
        # one row per tier, the fields in TIER_FIELDS order: one gather per batch finds them all
        self.register_buffer("tier_index", torch.stack([tiers[name].long() for name in TIER_FIELDS], 1))
        self.has_remap = bool((features["remap_stride"] != 0).any())
        self.has_scalars = bool((tiers["scalar_stride"] != 0).any())
        self.has_projections = projections.shape[1] > 0

    def forward(self, ids: Tensor) -> Tensor:
        check_ids(ids, self.num_embeddings, self.feature_names)
        batch = ids.size(0)
        rank = ids
        if self.has_remap:
            at = (ids * self.remap_stride + self.remap_offset).flatten()
            rank = torch.where(self.remap_stride > 0, self.remap.index_select(0, at).view(batch, -1).long(), ids)
        tier = (self.tier_base + (rank.unsqueeze(2) >= self.starts).sum(2)).flatten()
        index = self.tier_index.index_select(0, tier)  # [B * F, 6]: the TIER_FIELDS of each entry's tier
        row = rank.flatten() - index[:, 0]
        at = index[:, 3] + row % index[:, 1]
        slot = index[:, 2]
        weights: Optional[Tensor] = None
        if self.has_scalars:
            weights = self.scalars.index_select(0, row * index[:, 4] + index[:, 5]).float()
        out = torch.zeros(batch * self.num_features, self.dim, device=ids.device)
        side_by_side = torch.zeros(batch * self.num_features, self.projections.size(1), device=ids.device)
        for tier_slot in self.slots:
            picked, values = tier_slot(slot, at, weights)
            if tier_slot.column < 0:
                out.index_copy_(0, picked, values)
            else:
                side_by_side.narrow(1, tier_slot.column, tier_slot.dim).index_copy_(0, picked, values)
        out = out.view(batch, self.num_features, self.dim)
        if self.has_projections:
            side = side_by_side.view(batch, self.num_features, -1).transpose(0, 1)
            out = out + torch.bmm(side, self.projections).transpose(0, 1)
        return out


class JoinedEmbeddings(nn.Module):
    """Ids ``[B, F]`` -> ``[B, F, d]``: budgeted tables' features (``tiered_columns``) from a
    ``TieredEmbeddings``, the others from a ``CompressedEmbeddings``, put back in feature order."""

    num_features: torch.jit.Final[int]

    def __init__(self, plain: CompressedEmbeddings, tiered: TieredEmbeddings, tiered_columns: List[int]) -> None:
        super().__init__()
        self.num_features = plain.num_features + tiered.num_features
        self.plain = plain
        self.tiered = tiered
        plain_columns = [i for i in range(self.num_features) if i not in tiered_columns]
        self.register_buffer("plain_columns", torch.tensor(plain_columns, dtype=torch.int64))
        self.register_buffer("tiered_columns", torch.tensor(tiered_columns, dtype=torch.int64))
        self.register_buffer("order", torch.argsort(torch.tensor(plain_columns + tiered_columns)))

    def forward(self, ids: Tensor) -> Tensor:
        check_shape(ids, self.num_features)
        plain = self.plain(ids.index_select(1, self.plain_columns))
        tiered = self.tiered(ids.index_select(1, self.tiered_columns))
        return torch.cat((plain, tiered), 1).index_select(1, self.order)


class RawIdMap(nn.Module):
    """Raw Criteo categorical values -> table ids, the mapping the data folder was made with.

    ``mod`` (``memcom data convert``'s default): ``id = value % num_embeddings`` with ``value``
    read as uint64 (the int64 input's bits), as the converter does. ``vocab`` (frequency mode, or
    synthetic data): sorted keys ``(feature << 32) | value`` and their ids; values not in it get
    id 0 (frequency mode's rare id). ``none``: left out at export; raw values are refused.
    """

    kind: torch.jit.Final[str]

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
    instead of 2-D advanced indexing: the same values, several times faster on CPU."""

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
    ParameterList with a loop variable)."""

    num_layers: torch.jit.Final[int]

    def __init__(self, crossnet: nn.Module) -> None:
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
