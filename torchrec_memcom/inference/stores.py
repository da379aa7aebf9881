"""Row stores of trained tables in an inference precision: plain torch that TorchScript compiles.

Nothing here runs TorchRec or FBGEMM code: a box that loads a scripted model has only torch.
`CompressedEmbeddings` holds stock, MEmCom, hashed and QR tables as one row store plus
per-feature index arithmetic, so a lookup costs the same few tensor ops whatever the number of
features; budgeted tables, whose tiers have dims of their own, get stores of their own
(`TieredEmbeddings`). Each store reads either one id per feature (``[B, F]``, the Criteo export)
or a flat list of ids with the feature of each (the pooled collections of `inference_model`).
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

# The multipliers of `torchrec_memcom.modules.hashing`'s mix bijection, which `CompressedEmbeddings`
# repeats in TorchScript (the mix-hash export tests pin the two together).
_MUL1 = 0x2545F4914F6CDD1D
_MUL2 = 0x7FB5D329728EA185

PRECISIONS = ("fp32", "fp16", "int8")
INDEX_FIELDS = (
    "num_embeddings",
    "div",
    "mod",
    "offset",
    "scalar_stride",
    "scalar_offset",
    "qr_mod",
    "qr_offset",
    "is_mix",
    "mix_mask",
    "mix_shift",
    "mix_mul1",
    "mix_mul2",
)
TIERED_FEATURE_FIELDS = ("num_embeddings", "remap_stride", "remap_offset", "tier_base", "starts")
# A store's tensors by the last part of their name; the others are its per-feature index.
STORE_GROUPS = {
    "rows": "tables",
    "scale_bias": "tables",
    "scalars": "entity_scalars",
    "projections": "projections",
    "remap": "remap",
}
TIER_FIELDS = ("tier_start", "tier_mod", "tier_slot", "tier_row", "scalar_stride", "scalar_offset")


def mix_params(num_embeddings: int) -> Tuple[int, int, int, int]:
    """(mask, shift, mul1, mul2) of the mix bijection of ``[0, 2**bits)`` for a table of ``n`` ids."""
    bits = max(1, (num_embeddings - 1).bit_length())
    mask = (1 << bits) - 1
    return mask, max(1, bits // 2), (_MUL1 & mask) | 1, (_MUL2 & mask) | 1


def store_bytes(tensors: Dict[str, Tensor]) -> Dict[str, int]:
    """Bytes of stores' tensors (by name) per ``STORE_GROUPS`` group, the rest as ``feature_index``."""
    out = dict.fromkeys([*dict.fromkeys(STORE_GROUPS.values()), "feature_index"], 0)
    for name, t in tensors.items():
        out[STORE_GROUPS.get(name.rsplit(".", 1)[-1], "feature_index")] += t.numel() * t.element_size()
    return out


def mix_bits(x: Tensor, shift: Tensor, mask: Tensor, mul1: Tensor, mul2: Tensor) -> Tensor:
    """One pass of the mix bijection of ``[0, mask]`` (`torchrec_memcom.modules.hashing`'s)."""
    for mul in (mul1, mul2):
        x = x ^ (x >> shift)
        x = (x * mul) & mask
    return x ^ (x >> shift)


def mix_walks(num_embeddings: int, chunk: int = 1 << 22) -> int:
    """Cycle-walking passes the worst id of ``[0, n)`` needs to come back into range: the mix
    slot costs this fixed number of passes (no data-dependent loop, so it exports)."""
    mask, shift, mul1, mul2 = (torch.tensor(v) for v in mix_params(num_embeddings))
    walks = 0
    for start in range(0, num_embeddings, chunk):
        out = mix_bits(torch.arange(start, min(start + chunk, num_embeddings)), shift, mask, mul1, mul2)
        passes = 0
        outside = out >= num_embeddings
        while bool(outside.any()):
            out = torch.where(outside, mix_bits(out, shift, mask, mul1, mul2), out)
            outside = out >= num_embeddings
            passes += 1
        walks = max(walks, passes)
    return walks


def check_shape(ids: Tensor, num_features: int) -> None:
    """Raise unless ``ids`` is int64 ``[batch, num_features]``."""
    if ids.dim() != 2 or ids.size(1) != num_features or ids.dtype != torch.int64:
        raise ValueError(
            "ids must be int64 [batch, {}] (one id per feature), got {} {}".format(
                num_features, ids.dtype, list(ids.shape)
            )
        )


def check_ids(ids: Tensor, num_embeddings: Tensor, feature_names: List[str]) -> None:
    """Raise naming the feature for ids ``[B, F]`` outside ``[0, n)`` (they would read other tables)."""
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


def check_entries(ids: Tensor, feature: Tensor, num_embeddings: Tensor, feature_names: List[str]) -> None:
    """Raise naming the feature for flat ids (``feature``: the index of each one's feature)
    outside ``[0, n)``. Under ``torch.export`` the check is an assert op of the graph, whose
    message cannot name the feature (a data-dependent raise does not export)."""
    bad = (ids < 0) | (ids >= num_embeddings.index_select(0, feature))
    if not torch.jit.is_scripting():
        if torch.compiler.is_compiling():
            torch._assert_async(torch.logical_not(bad.any()), "ids outside [0, n) of their features' tables")
            return
    if bool(bad.any()):
        at = int(torch.nonzero(bad)[0])
        f = int(feature[at])
        raise ValueError(
            "feature {}: id {} is outside [0, {}) of its table".format(
                feature_names[f], int(ids[at]), int(num_embeddings[f])
            )
        )


def for_entries(field: Tensor, feature: Optional[Tensor], ids: Tensor) -> Tensor:
    """A per-feature field ``[F]`` for each id: broadcast over ids ``[B, F]`` (``feature``
    None), or gathered by the feature of each of the flat ids."""
    return field.expand_as(ids) if feature is None else field.index_select(0, feature)


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
    """Ids ``[B, F]`` (one per feature) -> embeddings ``[B, F, d]`` from one row store; or
    flat ids, with the feature and bag of each, -> their bags' sum pools (``pooled``).

    Per feature ``f``: slot ``s = id`` (or the mix bijection), row ``(s // div[f]) % mod[f] +
    offset[f]`` of ``rows``; MEmCom features scale it by ``scalars[s + scalar_offset[f]]``, QR
    features multiply (or add) row ``s % qr_mod[f] + qr_offset[f]``. ``rows`` is float32,
    float16, or int8 row-wise: uint8 codes ``[R, d]`` with an fp16 ``(scale, bias)`` per row in
    ``scale_bias`` (the numbers of FBGEMM's fused rows, TorchRec's INT8 tables, kept as two
    tensors). They are dequantized here in plain torch, after the gather, because the edge box
    that loads the file has no FBGEMM.

    Args:
        rows: every table's rows, then QR remainder tables' (codes ``[R, d]`` for int8).
        scale_bias: int8 rows' fp16 ``(scale, bias)``, ``[R, 2]`` (empty otherwise).
        scalars: MEmCom features' scalars, ending with a 1.0 that the others read with stride 0.
        precision: ``fp32``, ``fp16`` or ``int8``.
        dim: ``d``.
        feature_names: the features, in the order of the input's columns.
        index: per feature (``[F]`` each) the fields of ``INDEX_FIELDS``: ``div``, ``mod``,
            ``offset``: the row; ``scalar_stride`` 1 and ``scalar_offset`` for MEmCom features;
            ``qr_mod`` 0 (not QR), ``c`` (QR, multiply) or ``-c`` (QR, add) with ``qr_offset``;
            ``is_mix`` and the mix bijection's ``mix_mask``, ``mix_shift``, ``mix_mul1``, ``mix_mul2``.
        walks: the mix hash's cycle-walking passes under ``torch.export`` (default: counted here).

    Example::

        store = row_store([TableExport("t0", ["f0"], "none", 4, torch.randn(4, 8))], ["f0"], "int8", 8)
        store(torch.tensor([[1], [3]]))  # [2, 1, 8]: rows 1 and 3, dequantized
    """

    precision: torch.jit.Final[str]
    dim: torch.jit.Final[int]
    num_features: torch.jit.Final[int]
    has_mix: torch.jit.Final[bool]
    has_div: torch.jit.Final[bool]
    has_scalars: torch.jit.Final[bool]
    has_qr: torch.jit.Final[bool]
    walks: torch.jit.Final[int]
    # buffers, registered in __init__, declared for type checkers
    rows: Tensor
    scale_bias: Tensor
    scalars: Tensor
    num_embeddings: Tensor
    div: Tensor
    mod: Tensor
    offset: Tensor
    scalar_stride: Tensor
    scalar_offset: Tensor
    qr_mod: Tensor
    qr_offset: Tensor
    is_mix: Tensor
    mix_mask: Tensor
    mix_shift: Tensor
    mix_mul1: Tensor
    mix_mul2: Tensor

    def __init__(
        self,
        rows: Tensor,
        scale_bias: Tensor,
        scalars: Tensor,
        precision: str,
        dim: int,
        feature_names: List[str],
        index: Dict[str, Tensor],
        walks: Optional[int] = None,
    ) -> None:
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
        mixed = {int(n) for n, m in zip(index["num_embeddings"], index["is_mix"]) if m}
        self.walks = max((mix_walks(n) for n in mixed), default=0) if walks is None else walks

    def reordered(self, feature_names: List[str]) -> "CompressedEmbeddings":
        """This store with its features in the order ``feature_names`` (its own, permuted)."""
        order = torch.tensor([self.feature_names.index(f) for f in feature_names], device=self.rows.device)
        index = {name: getattr(self, name).index_select(0, order) for name in INDEX_FIELDS}
        return CompressedEmbeddings(
            self.rows, self.scale_bias, self.scalars, self.precision, self.dim, feature_names, index, self.walks
        )

    def slots(self, ids: Tensor, feature: Optional[Tensor] = None) -> Tensor:
        """The MEmCom/hash slot of every id: the id, or its mix bijection, cycle-walked into range
        (under ``torch.export``: in the fixed number of passes the worst id of any table needs,
        ``walks``)."""
        if not self.has_mix:
            return ids
        shift = for_entries(self.mix_shift, feature, ids)
        mask = for_entries(self.mix_mask, feature, ids)
        mul1 = for_entries(self.mix_mul1, feature, ids)
        mul2 = for_entries(self.mix_mul2, feature, ids)
        is_mix = for_entries(self.is_mix, feature, ids)
        n = for_entries(self.num_embeddings, feature, ids)
        out = mix_bits(ids, shift, mask, mul1, mul2)
        if not torch.jit.is_scripting():
            if torch.compiler.is_compiling():  # torch.export: no data-dependent loop
                for _ in range(self.walks):
                    out = torch.where(is_mix & (out >= n), mix_bits(out, shift, mask, mul1, mul2), out)
                return torch.where(is_mix, out, ids)
        outside = is_mix & (out >= n)
        while bool(outside.any()):  # usually fewer passes than the worst id's
            out = torch.where(outside, mix_bits(out, shift, mask, mul1, mul2), out)
            outside = is_mix & (out >= n)
        return torch.where(is_mix, out, ids)

    def entries(self, ids: Tensor, feature: Optional[Tensor] = None, weights: Optional[Tensor] = None) -> Tensor:
        """Float32 ``[ids.numel(), d]``: the embedding of every id, times its weight if given;
        ``ids [B, F]`` one per feature (``feature`` None) or flat with the feature of each."""
        slot = self.slots(ids, feature)
        quotient = torch.div(slot, for_entries(self.div, feature, ids), rounding_mode="floor") if self.has_div else slot
        scale = None if self.has_qr else weights  # QR's sum takes the weight after the product
        if self.has_scalars:
            at = slot * for_entries(self.scalar_stride, feature, ids) + for_entries(self.scalar_offset, feature, ids)
            scalars = self.scalars.index_select(0, at.flatten()).float()
            scale = scalars if scale is None else scalars * scale
        at = ((quotient % for_entries(self.mod, feature, ids)) + for_entries(self.offset, feature, ids)).flatten()
        emb = gather_rows(self.rows, self.scale_bias, self.precision, at, scale)
        if self.has_qr:
            qr_mod = for_entries(self.qr_mod, feature, ids)
            at = ((slot % qr_mod.abs().clamp(min=1)) + for_entries(self.qr_offset, feature, ids)).flatten()
            other = gather_rows(self.rows, self.scale_bias, self.precision, at, None)
            mult = (qr_mod > 0).flatten().unsqueeze(1)
            add = (qr_mod < 0).flatten().unsqueeze(1)
            emb = torch.where(mult, emb * other, torch.where(add, emb + other, emb))
            if weights is not None:
                emb = emb * weights.unsqueeze(1)
        return emb

    def pooled(self, ids: Tensor, feature: Tensor, weights: Optional[Tensor], bags: Tensor, batch: int) -> Tensor:
        """Sum pools ``[batch, F, d]`` of flat ids, id ``j`` in bag ``bags[j] = b * F + f``."""
        check_entries(ids, feature, self.num_embeddings, self.feature_names)
        out = torch.zeros(batch * self.num_features, self.dim, device=ids.device)
        return out.index_add_(0, bags, self.entries(ids, feature, weights)).view(batch, self.num_features, self.dim)

    def forward(self, ids: Tensor) -> Tensor:
        check_ids(ids, self.num_embeddings, self.feature_names)
        return self.entries(ids).view(ids.size(0), self.num_features, self.dim)


class TierSlot(nn.Module):
    """The rows of one tier position of all budgeted tables: the ``k``-th tier of dim ``dim`` of
    each table that has one, in one row store (``rows`` and, for int8, ``scale_bias``).

    Args:
        index: the slot's number (``tier_slot`` of its tiers).
        column: where the slot's vectors sit side by side for the projections; -1 for a slot at
            the model dim, whose tiers have no projection.
        rows: the tiers' rows, one after another (codes ``[R, dim]`` for int8).
        scale_bias: int8 rows' fp16 ``(scale, bias)``, ``[R, 2]`` (empty otherwise).
        precision: ``fp32``, ``fp16`` or ``int8``.

    Example::

        slot = TierSlot(0, -1, torch.randn(100, 16), torch.zeros(0, 2, dtype=torch.float16), "fp32")
        picked, rows = slot(slot_of_entry, row_of_entry, None)  # the entries in slot 0, their rows
    """

    index: torch.jit.Final[int]
    column: torch.jit.Final[int]
    dim: torch.jit.Final[int]
    precision: torch.jit.Final[str]
    # buffers, registered in __init__, declared for type checkers
    rows: Tensor
    scale_bias: Tensor

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
    """Ids ``[B, F]`` of budgeted tables' features -> embeddings ``[B, F, d]``; or flat ids,
    with the feature and bag of each, -> their bags' sum pools (``pooled``).

    ``BudgetedEmbeddingBagCollection`` in plain torch. Per feature ``f``: the id's frequency
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

    Args:
        slots: the tier slots holding the rows.
        scalars: MEmCom tiers' scalars, ending with a 1.0 (``float16`` below fp32).
        remap: the ranks of the remapped tables' ids, one table after another.
        projections: ``[F, W, d]``, per feature.
        feature_names: the features, in the order of the input's columns.
        features: ``[F]`` each of ``TIERED_FEATURE_FIELDS`` (``starts`` ``[F, K - 1]``).
        tiers: ``[G]`` each of ``TIER_FIELDS``.

    Example::

        store = tiered_store(collect_tables(budgeted_ebc), ["f0"], "int8", 16)  # a TieredEmbeddings
        store(torch.tensor([[1], [3]]))  # [2, 1, 16]
    """

    num_features: torch.jit.Final[int]
    dim: torch.jit.Final[int]
    has_remap: torch.jit.Final[bool]
    has_scalars: torch.jit.Final[bool]
    has_projections: torch.jit.Final[bool]
    # buffers, registered in __init__, declared for type checkers
    scalars: Tensor
    remap: Tensor
    projections: Tensor
    num_embeddings: Tensor
    remap_stride: Tensor
    remap_offset: Tensor
    tier_base: Tensor
    starts: Tensor
    tier_index: Tensor

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

    def reordered(self, feature_names: List[str]) -> "TieredEmbeddings":
        """This store with its features in the order ``feature_names`` (its own, permuted)."""
        order = torch.tensor([self.feature_names.index(f) for f in feature_names], device=self.projections.device)
        features = {name: getattr(self, name).index_select(0, order) for name in TIERED_FEATURE_FIELDS}
        tiers = dict(zip(TIER_FIELDS, self.tier_index.unbind(1)))
        projections = self.projections.index_select(0, order)
        # nn.ModuleList iterates as Module (TorchScript allows only a bare ignore at a line's end)
        slots: List[TierSlot] = list(self.slots)  # type: ignore[arg-type]
        return TieredEmbeddings(slots, self.scalars, self.remap, projections, feature_names, features, tiers)

    def parts(
        self, ids: Tensor, feature: Optional[Tensor] = None, weights: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """The rows of every id (times its weight), ``[ids.numel(), d]`` for tiers at the model
        dim and ``[ids.numel(), W]`` side by side for the others (not yet projected); ``ids``
        ``[B, F]`` one per feature (``feature`` None) or flat with the feature of each."""
        rank = ids
        if self.has_remap:
            stride = for_entries(self.remap_stride, feature, ids)
            at = (ids * stride + for_entries(self.remap_offset, feature, ids)).flatten()
            rank = torch.where(stride > 0, self.remap.index_select(0, at).view_as(ids).long(), ids)
        starts = self.starts if feature is None else self.starts.index_select(0, feature)
        tier = (for_entries(self.tier_base, feature, ids) + (rank.unsqueeze(-1) >= starts).sum(-1)).flatten()
        index = self.tier_index.index_select(0, tier)  # [numel, 6]: the TIER_FIELDS of each entry's tier
        row = rank.flatten() - index[:, 0]
        at = index[:, 3] + row % index[:, 1]
        slot = index[:, 2]
        scale = weights
        if self.has_scalars:
            scalars = self.scalars.index_select(0, row * index[:, 4] + index[:, 5]).float()
            scale = scalars if scale is None else scalars * scale
        out = torch.zeros(ids.numel(), self.dim, device=ids.device)
        side_by_side = torch.zeros(ids.numel(), self.projections.size(1), device=ids.device)
        # nn.ModuleList iterates as Module (TorchScript allows only a bare ignore at a line's end)
        for tier_slot in self.slots:
            picked, values = tier_slot(slot, at, scale)
            if tier_slot.column < 0:  # type: ignore[operator]
                out.index_copy_(0, picked, values)
            else:
                side_by_side.narrow(1, tier_slot.column, tier_slot.dim).index_copy_(0, picked, values)  # type: ignore[call-overload]
        return out, side_by_side

    def project(self, out: Tensor, side_by_side: Tensor, batch: int) -> Tensor:
        """``[B, F, d]``: ``out + side_by_side @ projections[f]`` of parts ``[B * F, .]``."""
        out = out.view(batch, self.num_features, self.dim)
        if self.has_projections:
            side = side_by_side.view(batch, self.num_features, -1).transpose(0, 1)
            out = out + torch.bmm(side, self.projections).transpose(0, 1)
        return out

    def pooled(self, ids: Tensor, feature: Tensor, weights: Optional[Tensor], bags: Tensor, batch: int) -> Tensor:
        """Sum pools ``[batch, F, d]`` of flat ids, id ``j`` in bag ``bags[j] = b * F + f``: the
        parts pooled per bag, then projected (projections are linear: the module's order)."""
        check_entries(ids, feature, self.num_embeddings, self.feature_names)
        out, side_by_side = self.parts(ids, feature, weights)
        bag_count = batch * self.num_features
        out = torch.zeros(bag_count, self.dim, device=ids.device).index_add_(0, bags, out)
        side_by_side = torch.zeros(bag_count, side_by_side.size(1), device=ids.device).index_add_(0, bags, side_by_side)
        return self.project(out, side_by_side, batch)

    def forward(self, ids: Tensor) -> Tensor:
        check_ids(ids, self.num_embeddings, self.feature_names)
        return self.project(*self.parts(ids), ids.size(0))


class JoinedEmbeddings(nn.Module):
    """Ids ``[B, F]`` -> ``[B, F, d]``: budgeted tables' features (``tiered_columns``) from a
    ``TieredEmbeddings``, the others from a ``CompressedEmbeddings``, put back in feature order.

    Args:
        plain: the store of the features not budgeted.
        tiered: the store of the budgeted features.
        tiered_columns: the input columns of ``tiered``'s features.

    Example::

        joined = JoinedEmbeddings(plain, tiered, [1])  # column 1 budgeted, the others plain
        joined(torch.tensor([[3, 7, 2]]))  # [1, 3, d]
    """

    num_features: torch.jit.Final[int]
    # buffers, registered in __init__, declared for type checkers
    plain_columns: Tensor
    tiered_columns: Tensor
    order: Tensor

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
