"""Per-entity scalars of MEmCom, sharded with their shared table and updated sparsely in backward.

A table's slot ``s = k * m + row`` (``row < m``, ``k < K = ceil(n/m)``) is routed by ``input_dist``
to the rank holding shared ``row``, carrying ``k`` as the KJT weight (exact in fp32). A rank that
holds shared rows ``[o, o + r)`` stores the scalars of exactly those slots as a flat ``K * r``
vector, entry ``k * r + (row - o)``, so a lookup needs no further communication:

- table-wise / row-wise: every slot lives on one rank; the fused optimizer updates touched
  entries in backward, as FBGEMM does for embedding rows.
- column-wise: each column shard needs every scalar, so the ranks holding shards of the table keep
  replicas and sum their partial gradients (a sparse all-gather of the touched entries only)
  before the identical update; the state dict shows the lowest such rank's copy.
- data-parallel: a small replicated table; the scalars are a dense parameter trained by the dense
  optimizer under DDP, exactly like the DP table itself.

The state dict shows each table's scalars as one ShardedTensor ``entity_weights.T`` of shape
``(n,)`` indexed by slot, whatever the sharding.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import (
    ShardedTensorMetadata,
    TensorProperties,
)
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import ParameterSharding, ShardingType
from torchrec.optim.fused import EmptyFusedOptimizer, FusedOptimizer

from torchrec_memcom.modules.memcom_config import MEmComConfig, ScalarRule
from torchrec_memcom.modules.memcom_embedding_bag import NEUTRAL_OPTIONS, MEmComTable

COLUMN_SHARDED = {ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value}
ROW_SHARDED = {
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
}
FUSED_KERNELS = {
    EmbeddingComputeKernel.FUSED.value,
    EmbeddingComputeKernel.FUSED_UVM.value,
    EmbeddingComputeKernel.FUSED_UVM_CACHING.value,
}
SUPPORTED_SHARDING_TYPES = sorted(COLUMN_SHARDED | ROW_SHARDED | {ShardingType.DATA_PARALLEL.value})
# Optimizers the in-backward update of the scalars implements. For one scalar per row,
# row-wise Adagrad and exact Adagrad are the same update.
ADAGRAD = {EmbOptimType.EXACT_ADAGRAD, EmbOptimType.EXACT_ROWWISE_ADAGRAD}
SUPPORTED_OPTIMIZERS = ADAGRAD | {EmbOptimType.EXACT_SGD}


@dataclasses.dataclass(frozen=True)
class RowBlock:
    """Shared rows ``[offset, offset + rows)`` of a table and the ranks that hold them."""

    offset: int
    rows: int
    ranks: Tuple[int, ...]
    devices: Tuple[str, ...]


@dataclasses.dataclass
class TableLayout:
    """Where a table's scalars live: its row blocks, and how this rank trains its block."""

    table: MEmComTable
    sharding_type: str
    blocks: List[RowBlock]
    optimizer: Optional[Dict[str, Any]]  # fused params; None for data-parallel
    rule: Optional[ScalarRule] = None  # the scalars' update; None for data-parallel

    @property
    def dense(self) -> bool:
        return self.sharding_type == ShardingType.DATA_PARALLEL.value

    @property
    def replicated(self) -> bool:
        return any(len(b.ranks) > 1 for b in self.blocks) and not self.dense

    def local_block(self, rank: int) -> Optional[RowBlock]:
        return next((b for b in self.blocks if rank in b.ranks), None)

    def storage_size(self, block: RowBlock) -> int:
        return self.table.num_slot_blocks * block.rows

    def slot_pieces(self, block: RowBlock) -> List[Tuple[int, int, int]]:
        """``(global slot offset, storage offset, length)`` of each contiguous run of slots."""
        t = self.table
        if block.rows == t.hash_rows:
            return [(0, 0, t.num_embeddings)]
        pieces = []
        for k in range(t.num_slot_blocks):
            start = k * t.hash_rows + block.offset
            length = min(block.rows, t.num_embeddings - start)
            if length > 0:
                pieces.append((start, k * block.rows, length))
        return pieces


def table_layout(
    table: MEmComTable,
    sharding: ParameterSharding,
    world_size: int,
    device: torch.device,
    fused_params: Optional[Dict[str, Any]],
    spec: Optional[MEmComConfig] = None,
) -> TableLayout:
    """Row blocks of a table from its ParameterSharding (column shards of a row range merge),
    and the scalars' update: the table's fused optimizer with ``spec``'s scalar settings."""
    if sharding.sharding_type not in SUPPORTED_SHARDING_TYPES:
        raise ValueError(
            f"table {table.name!r}: sharding type {sharding.sharding_type} is not supported for "
            f"MEmCom tables; use one of {SUPPORTED_SHARDING_TYPES}"
        )
    if sharding.sharding_type == ShardingType.DATA_PARALLEL.value:
        ranks = tuple(range(world_size))
        devices = tuple(_device_str(device, r) for r in ranks)
        return TableLayout(table, sharding.sharding_type, [RowBlock(0, table.hash_rows, ranks, devices)], None)
    if sharding.compute_kernel not in FUSED_KERNELS:
        raise ValueError(
            f"table {table.name!r}: model-parallel MEmCom tables train in backward and need a "
            f"fused compute kernel ({sorted(FUSED_KERNELS)}), got {sharding.compute_kernel!r}"
        )
    assert sharding.sharding_spec is not None
    by_rows: Dict[Tuple[int, int], Dict[int, str]] = {}
    for shard in sharding.sharding_spec.shards:
        key = (shard.shard_offsets[0], shard.shard_sizes[0])
        placement = shard.placement
        by_rows.setdefault(key, {})[placement.rank()] = str(placement.device())
    blocks = [
        RowBlock(offset, rows, tuple(sorted(rd)), tuple(rd[r] for r in sorted(rd)))
        for (offset, rows), rd in sorted(by_rows.items())
    ]
    optimizer = dict(fused_params or {})
    opt = optimizer.get("optimizer", EmbOptimType.EXACT_SGD)
    if opt not in SUPPORTED_OPTIMIZERS:
        raise ValueError(
            f"table {table.name!r}: MEmCom per-entity scalars are trained in backward with SGD or "
            f"(row-wise) Adagrad; the table's fused optimizer is {opt}"
        )
    unsupported = {k: v for k, v in optimizer.items() if k in NEUTRAL_OPTIONS and v != NEUTRAL_OPTIONS[k]}
    if unsupported:
        raise ValueError(
            f"table {table.name!r}: the in-backward update of MEmCom per-entity scalars implements "
            f"plain SGD/Adagrad (lr, eps) only; unsupported optimizer options {unsupported}"
        )
    rule = (spec or MEmComConfig(num_hash_rows=1)).scalar_rule(
        opt in ADAGRAD, float(optimizer.get("learning_rate", 0.01)), float(optimizer.get("eps", 1e-8))
    )
    return TableLayout(table, sharding.sharding_type, blocks, optimizer, rule)


def _device_str(device: torch.device, rank: int) -> str:
    if device.type == "cpu":
        return "cpu"
    local = torch.cuda.device_count() if device.type == "cuda" else 1
    return f"{device.type}:{rank % max(local, 1)}"


class _FusedLookup(torch.autograd.Function):
    """Gathers fused scalars; its backward hands the gradients to the in-backward update."""

    @staticmethod
    def forward(
        ctx: Any,
        anchor: torch.Tensor,
        owner: "ShardedEntityWeights",
        scales: List[float],
        *indices: torch.Tensor,
    ) -> Tuple[torch.Tensor, ...]:
        ctx.owner, ctx.scales = owner, scales
        ctx.save_for_backward(*indices)
        return (anchor.new_zeros(()), *[owner.fused.detach().index_select(0, idx) for idx in indices])

    @staticmethod
    def backward(ctx: Any, _anchor_grad: torch.Tensor, *grads: torch.Tensor) -> Tuple[None, ...]:
        idx = _cat(list(ctx.saved_tensors))
        grad = _cat([g if s == 1 else g / s for g, s in zip(grads, ctx.scales)])
        ctx.owner.apply_gradients(idx, grad)
        return (None,) * (3 + len(grads))


def _cat(tensors: List[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class ShardedEntityWeights(nn.Module):
    """This rank's scalars of every compressed table, their state dict and their update.

    All fused tables' scalars on this rank live in one flat tensor (``fused``), the
    data-parallel ones in another (``dense``), so a lookup is one gather per KJT and the
    update one scatter per step, whatever the number of tables.
    """

    def __init__(
        self,
        layouts: Dict[str, TableLayout],
        rank: int,
        world_size: int,
        device: torch.device,
        process_group: Optional[dist.ProcessGroup],
    ) -> None:
        super().__init__()
        self.layouts = layouts
        self._rank = rank
        self._world_size = world_size
        self._process_group = process_group
        # table -> (start, size) in the flat tensor of its kind
        self._slices: Dict[str, Tuple[int, int]] = {}
        sizes = {"fused": 0, "dense": 0}
        for name, layout in layouts.items():
            block = layout.local_block(rank)
            if block is not None:
                kind = "dense" if layout.dense else "fused"
                self._slices[name] = (sizes[kind], layout.storage_size(block))
                sizes[kind] += layout.storage_size(block)
        self.fused = nn.Parameter(torch.empty(sizes["fused"], device=device), requires_grad=False)
        # Trained in backward: keep it out of the dense optimizer (TorchRec's convention).
        self.fused._in_backward_optimizers = [EmptyFusedOptimizer()]  # type: ignore[attr-defined]
        self.dense = nn.Parameter(torch.empty(sizes["dense"], device=device))
        fused = [n for n, layout in layouts.items() if not layout.dense]
        kinds = {n: layouts[n].rule.adagrad for n in fused}  # type: ignore[union-attr]
        if len(set(kinds.values())) > 1:
            raise ValueError(
                f"the MEmCom tables of one collection must all train with SGD or all with "
                f"(row-wise) Adagrad; got Adagrad per table {kinds}"
            )
        adagrad = any(kinds.values())
        self.momentum: Optional[torch.Tensor] = torch.zeros_like(self.fused) if adagrad else None
        self._local_fused = [n for n in self._slices if not layouts[n].dense]
        # per local fused table: its param group (lr) in the fused optimizer, and its eps
        self._groups = [fused.index(n) for n in self._local_fused]
        self._eps = torch.tensor(
            [layouts[n].rule.eps for n in self._local_fused],
            dtype=self.fused.dtype,
            device=device,  # type: ignore[union-attr]
        )
        eps = {layouts[n].rule.eps for n in self._local_fused}  # type: ignore[union-attr]
        self._uniform_eps = len(eps) <= 1
        self._eps_value = float(next(iter(eps), 0.0))
        self._starts = torch.tensor([self._slices[n][0] for n in self._local_fused], dtype=torch.int64, device=device)
        replicated = [n for n, layout in layouts.items() if layout.replicated]
        self._replicated = torch.tensor(
            [replicated.index(n) if n in replicated else -1 for n in self._local_fused], device=device
        )
        # One collective per backward syncs column-wise replicas; a group of its own keeps it
        # from interleaving with TorchRec's and DDP's collectives on the main group.
        self._replicated_names = replicated
        self._sync_group: Optional[dist.ProcessGroup] = None
        if replicated:
            self._sync_group = dist.new_group(backend=dist.get_backend(process_group))
        self._anchor = torch.zeros((), device=device, requires_grad=True)
        self._optimizer = _EntityWeightOptimizer(self)

    @property
    def storage(self) -> Dict[str, torch.Tensor]:
        """Per table this rank holds: its ``K * r`` scalars (a view of the flat tensor)."""
        return {n: self._view(n, self.dense if self.layouts[n].dense else self.fused) for n in self._slices}

    def _view(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        start, size = self._slices[name]
        return flat.narrow(0, start, size)

    @property
    def needs_anchor(self) -> bool:
        """Whether outputs must carry the anchor (replicas sync in backward on every rank)."""
        return self._sync_group is not None

    # ---- lookup -------------------------------------------------------------------------

    def address(self, name: Optional[str]) -> Tuple[int, int, bool]:
        """``(start, rows)`` so that a slot arriving as (k, local row) sits at
        ``start + k * rows + row`` of its flat tensor, and whether the table is data-parallel;
        ``(0, 0, False)`` for a table without scalars on this rank."""
        if name is None or name not in self._slices:
            return 0, 0, False
        block = self.layouts[name].local_block(self._rank)
        assert block is not None
        return self._slices[name][0], block.rows, self.layouts[name].dense

    def lookup_dense(self, idx: torch.Tensor) -> torch.Tensor:
        return self.dense[idx]

    def lookup_fused(
        self, indices: Sequence[torch.Tensor], scales: Sequence[float]
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Fused scalars at ``indices``, and an anchor scalar.

        ``scales``: TorchRec scales per-sample-weight gradients of model-parallel lookups by
        the world size (for DDP-averaged feature processors); dividing by it keeps the scalars
        on the same gradient convention as their shared rows. With column-wise replicas, add
        ``0 * anchor`` to the module output: backward then reaches the update on every rank,
        even one without lookups, so the replica sync never waits on a missing rank.
        """
        anchor, *out = _FusedLookup.apply(self._anchor, self, list(scales), *indices)
        return anchor, out

    # ---- in-backward update ---------------------------------------------------------------

    @torch.no_grad()
    def apply_gradients(self, idx: torch.Tensor, grad: torch.Tensor) -> None:
        """Sum gradients per touched entry (across replicas too) and update those entries."""
        if self._sync_group is not None:
            idx, grad = self._sync_replicas(idx, grad)
        w = self.fused.data
        lr, eps = self._rates(idx)
        grad = grad.to(w.dtype)
        if self.momentum is None:  # SGD: index_add_ sums duplicates itself, no dedup needed
            w.index_add_(0, idx, grad * -lr)
            return
        # Adagrad needs each entry's summed gradient before its state update. The touched state
        # entries hold the sums meanwhile: no sort to find distinct ids and no buffer of n. An
        # id met several times then gets the same values written several times.
        state = self.momentum
        old = state.index_select(0, idx)
        summed = state.index_fill_(0, idx, 0).index_add_(0, idx, grad).index_select(0, idx)
        new = old.addcmul_(summed, summed)
        state.index_copy_(0, idx, new)
        step = summed.div_(new.sqrt_().add_(eps)).mul_(-lr)
        w.index_copy_(0, idx, w.index_select(0, idx).add_(step))

    def _rates(self, idx: torch.Tensor) -> Tuple[Any, Any]:
        """lr and eps of the update: numbers when every local table has the same, else per entry."""
        groups = self._optimizer.param_groups
        lrs = [groups[g]["lr"] for g in self._groups]
        if len(set(lrs)) == 1 and self._uniform_eps:
            return float(lrs[0]), self._eps_value
        table = self._table_of(idx)
        return torch.tensor(lrs, dtype=self.fused.dtype, device=idx.device)[table], self._eps[table]

    def _table_of(self, idx: torch.Tensor) -> torch.Tensor:
        """Position in ``_local_fused`` of the table each flat index belongs to."""
        return torch.searchsorted(self._starts, idx, right=True) - 1

    def _sync_replicas(self, idx: torch.Tensor, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """All-gather (table, entry, grad) of replicated tables; keep what this rank holds."""
        local_table = torch.searchsorted(self._starts, idx, right=True) - 1
        rep = self._replicated[local_table] if idx.numel() else idx
        shared = rep >= 0
        mine = torch.stack(
            [rep[shared].double(), (idx - self._starts[local_table])[shared].double(), grad[shared].double()]
        )
        keep_idx, keep_grad = idx[~shared], grad[~shared]
        device = self.fused.device
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self._world_size)]
        dist.all_gather(sizes, torch.tensor([mine.shape[1]], device=device), group=self._sync_group)
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros((3, longest), dtype=torch.float64, device=device)
        padded[:, : mine.shape[1]] = mine
        gathered = [torch.empty_like(padded) for _ in range(self._world_size)]
        dist.all_gather(gathered, padded, group=self._sync_group)
        everything = torch.cat([g[:, : int(s)] for g, s in zip(gathered, sizes)], dim=1)
        # Map each (replicated table, entry) to this rank's flat index, if it holds the table.
        start_of = torch.full((len(self._replicated_names),), -1, dtype=torch.int64, device=device)
        for i, name in enumerate(self._local_fused):
            if int(self._replicated[i]) >= 0:
                start_of[self._replicated[i]] = self._slices[name][0]
        start = start_of[everything[0].long()]
        held = start >= 0
        return (
            torch.cat([keep_idx, start[held] + everything[1, held].long()]),
            torch.cat([keep_grad, everything[2, held].to(keep_grad.dtype)]),
        )

    # ---- state dict ------------------------------------------------------------------------

    def sharded(self, name: str, flat: Optional[torch.Tensor]) -> ShardedTensor:
        """``(n,)`` ShardedTensor whose local shards are views of ``name``'s part of ``flat``."""
        layout = self.layouts[name]
        local = self._view(name, flat) if flat is not None and name in self._slices else None
        metadata, shards = [], []
        for block in layout.blocks:
            owner, device = block.ranks[0], block.devices[0]
            for start, offset, length in layout.slot_pieces(block):
                meta = ShardMetadata([start], [length], f"rank:{owner}/{device}")
                metadata.append(meta)
                if owner == self._rank:
                    assert local is not None
                    shards.append(Shard(local.detach()[offset : offset + length], meta))
        global_meta = ShardedTensorMetadata(
            metadata,
            torch.Size([layout.table.num_embeddings]),
            TensorProperties(dtype=self.fused.dtype, requires_grad=False),
        )
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, global_meta, process_group=self._process_group
        )

    def _flat_of(self, name: str) -> torch.Tensor:
        return self.dense if self.layouts[name].dense else self.fused

    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name in self.layouts:
            destination[prefix + name] = self.sharded(name, self._flat_of(name))

    def _load_from_state_dict(
        self,
        state_dict: Dict[str, Any],
        prefix: str,
        local_metadata: Dict[str, Any],
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
    ) -> None:
        for name in self.layouts:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            self.load_table(name, state_dict[key])

    @torch.no_grad()
    def load_table(self, name: str, value: Any) -> None:
        """Fill this rank's entries from a full ``(n,)`` tensor or a ShardedTensor of ``(n,)``.

        A ShardedTensor carries only the owner's copy of replicated blocks: holders then receive
        it by broadcast, so every rank must call this in the same order (load_state_dict does).
        """
        layout = self.layouts[name]
        n = layout.table.num_embeddings
        if tuple(value.shape) != (n,):
            raise ValueError(f"entity_weights.{name}: expected shape ({n},), got {tuple(value.shape)}")
        block = layout.local_block(self._rank)
        local = self._view(name, self._flat_of(name)).detach() if block is not None else None
        if not isinstance(value, ShardedTensor):
            if local is not None and block is not None:
                for start, offset, length in layout.slot_pieces(block):
                    local[offset : offset + length].copy_(value[start : start + length])
            return
        if local is not None and block is not None:
            pieces = {(s, ln): offset for s, offset, ln in layout.slot_pieces(block)}
            for shard in value.local_shards():
                start, length = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
                offset = pieces[(start, length)]
                local[offset : offset + length].copy_(shard.tensor)
        self.broadcast_replicas(name, local)

    def broadcast_replicas(self, name: str, local: Optional[torch.Tensor]) -> None:
        """Copy the owner's entries of every replicated block to the other holders."""
        layout = self.layouts[name]
        block = layout.local_block(self._rank)
        group = self._process_group if layout.dense else self._sync_group
        for b in layout.blocks:
            if len(b.ranks) > 1:
                mine = local is not None and block == b
                buf = local if mine else torch.empty(layout.storage_size(b), device=self.fused.device)
                dist.broadcast(buf, src=b.ranks[0], group=group)

    @property
    def fused_optimizer(self) -> "_EntityWeightOptimizer":
        return self._optimizer


class _EntityWeightOptimizer(FusedOptimizer):
    """The fused optimizer of the scalars: one lr in ``param_groups``, Adagrad state."""

    def __init__(self, weights: ShardedEntityWeights) -> None:
        self._weights = weights
        fused = [n for n, layout in weights.layouts.items() if not layout.dense]
        params = {f"entity_weights.{n}": weights.sharded(n, weights.fused) for n in fused}
        state = (
            {params[f"entity_weights.{n}"]: {"momentum1": weights.sharded(n, weights.momentum)} for n in fused}
            if weights.momentum is not None
            else {}
        )
        # one group per table: its scalars' lr (schedulers scale each group alike)
        groups = [
            {"params": [params[f"entity_weights.{n}"]], "lr": weights.layouts[n].rule.lr}  # type: ignore[union-attr]
            for n in fused
        ]
        super().__init__(params, state, groups)

    def load_state_dict(self, state_dict: Any) -> None:
        """Load, then hand the owner's Adagrad state of column-wise replicas to every holder."""
        super().load_state_dict(state_dict)
        w = self._weights
        for name in w._replicated_names:
            local = w._view(name, w.momentum) if w.momentum is not None and name in w._slices else None
            if w.layouts[name].optimizer.get("optimizer") in ADAGRAD:  # type: ignore[union-attr]
                w.broadcast_replicas(name, local)

    def step(self, closure: Any = None) -> None:
        """No-op: updates happen in backward."""

    def zero_grad(self, set_to_none: bool = False) -> None:
        """No-op: no gradient is ever stored."""
