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

from torchrec_memcom.modules.memcom_embedding_bag import MEmComTable

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
) -> TableLayout:
    """Row blocks of a table from its ParameterSharding (column shards of a row range merge)."""
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
    for shard in sharding.sharding_spec.shards:  # type: ignore[attr-defined]
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
    return TableLayout(table, sharding.sharding_type, blocks, optimizer)


def _device_str(device: torch.device, rank: int) -> str:
    if device.type == "cpu":
        return "cpu"
    local = torch.cuda.device_count() if device.type == "cuda" else 1
    return f"{device.type}:{rank % max(local, 1)}"


class _FusedLookup(torch.autograd.Function):
    """Gathers fused scalars; its backward hands the gradients to the in-backward update."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        anchor: torch.Tensor,
        owner: "ShardedEntityWeights",
        tables: List[str],
        scales: List[float],
        *indices: torch.Tensor,
    ) -> Tuple[torch.Tensor, ...]:
        ctx.owner, ctx.tables, ctx.scales = owner, tables, scales
        ctx.save_for_backward(*indices)
        outs = [owner.storage[name][idx] for name, idx in zip(tables, indices)]
        return (anchor.new_zeros(()), *outs)

    @staticmethod
    def backward(ctx: Any, _anchor_grad: torch.Tensor, *grads: torch.Tensor) -> Tuple[None, ...]:
        ctx.owner.apply_gradients(
            [(t, i, g / s) for t, i, g, s in zip(ctx.tables, ctx.saved_tensors, grads, ctx.scales)]
        )
        return (None,) * (4 + len(grads))


class ShardedEntityWeights(nn.Module):
    """This rank's scalars of every compressed table, their state dict and their update."""

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
        self.momentum: Dict[str, torch.Tensor] = {}
        for name, layout in layouts.items():
            block = layout.local_block(rank)
            if block is None:
                continue
            param = nn.Parameter(
                torch.empty(layout.storage_size(block), device=device), requires_grad=layout.dense
            )
            if not layout.dense:
                # Trained in backward: keep it out of the dense optimizer (TorchRec's convention).
                param._in_backward_optimizers = [EmptyFusedOptimizer()]  # type: ignore[attr-defined]
                if layout.optimizer.get("optimizer") in ADAGRAD:  # type: ignore[union-attr]
                    self.momentum[name] = torch.zeros_like(param, requires_grad=False)
            # Registered directly (not in a ParameterDict child) so that only the
            # `entity_weights.T` ShardedTensors below reach the state dict.
            self.register_parameter(f"storage_{name}", param)
        # One collective per backward syncs column-wise replicas; a group of its own keeps it
        # from interleaving with TorchRec's and DDP's collectives on the main group.
        self._sync_group: Optional[dist.ProcessGroup] = None
        if any(layout.replicated for layout in layouts.values()):
            self._sync_group = dist.new_group(backend=dist.get_backend(process_group))
        self._anchor = torch.zeros((), device=device, requires_grad=True)
        self._optimizer = _EntityWeightOptimizer(self)

    @property
    def storage(self) -> Dict[str, nn.Parameter]:
        """This rank's flat scalar storage per table it holds."""
        return {n[len("storage_") :]: p for n, p in self._parameters.items() if p is not None}

    # ---- lookup -------------------------------------------------------------------------

    def index(self, name: str, k: torch.Tensor, local_rows: torch.Tensor) -> torch.Tensor:
        """Storage entry of slots arriving as (``k`` weight, local shared row)."""
        layout = self.layouts[name]
        block = layout.local_block(self._rank)
        assert block is not None
        return k.to(torch.int64) * block.rows + local_rows

    def lookup(
        self, requests: Sequence[Tuple[str, torch.Tensor, float]]
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Scalars for ``(table, storage index, gradient scale)`` requests, plus an anchor.

        TorchRec scales per-sample-weight gradients of model-parallel lookups by the world size
        (for DDP-averaged feature processors); dividing by that scale keeps the scalars on the
        same gradient convention as their shared rows. Add ``0 * anchor`` to the module output:
        it makes backward reach the update on every rank, even one without local lookups, so
        the replica sync never waits on a missing rank.
        """
        out: List[Optional[torch.Tensor]] = [None] * len(requests)
        fused = []
        for i, (name, idx, _) in enumerate(requests):
            if self.layouts[name].dense:
                out[i] = self.storage[name][idx]
            else:
                fused.append(i)
        anchor, *fused_out = _FusedLookup.apply(
            self._anchor,
            self,
            [requests[i][0] for i in fused],
            [requests[i][2] for i in fused],
            *[requests[i][1] for i in fused],
        )
        for i, w in zip(fused, fused_out):
            out[i] = w
        return anchor, out  # type: ignore[return-value]

    # ---- in-backward update ---------------------------------------------------------------

    @torch.no_grad()
    def apply_gradients(self, grads: List[Tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        """Sum gradients per touched entry (across replicas too) and update those entries."""
        by_table: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        for name, idx, grad in grads:
            by_table.setdefault(name, []).append((idx, grad))
        if self._sync_group is not None:
            by_table = self._sync_replicas(by_table)
        for name, pieces in by_table.items():
            idx = torch.cat([p[0] for p in pieces])
            grad = torch.cat([p[1] for p in pieces])
            unique, inverse = torch.unique(idx, return_inverse=True)
            summed = torch.zeros(unique.numel(), dtype=grad.dtype, device=grad.device)
            summed.index_add_(0, inverse, grad)
            self._update(name, unique, summed)

    def _sync_replicas(
        self, by_table: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]]
    ) -> Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]]:
        """All-gather (table, entry, grad) of replicated tables; each holder keeps its tables'."""
        names = [n for n, layout in self.layouts.items() if layout.replicated]
        device = self._anchor.device
        table_ids, idxs, vals = [], [], []
        for t, name in enumerate(names):
            for idx, grad in by_table.pop(name, []):
                table_ids.append(torch.full_like(idx, t))
                idxs.append(idx)
                vals.append(grad.to(torch.float32))
        if idxs:
            local = torch.stack([torch.cat(table_ids), torch.cat(idxs)]).to(torch.float64)
            local = torch.cat([local, torch.cat(vals).to(torch.float64)[None]])
        else:
            local = torch.zeros((3, 0), dtype=torch.float64, device=device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self._world_size)]
        dist.all_gather(sizes, torch.tensor([local.shape[1]], device=device), group=self._sync_group)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros((3, longest), dtype=torch.float64, device=device)
        padded[:, : local.shape[1]] = local
        gathered = [torch.empty_like(padded) for _ in range(self._world_size)]
        dist.all_gather(gathered, padded, group=self._sync_group)
        everything = torch.cat([g[:, : int(s.item())] for g, s in zip(gathered, sizes)], dim=1)
        for t, name in enumerate(names):
            if name not in self.storage:
                continue
            mine = everything[0] == t
            by_table[name] = [
                (everything[1, mine].to(torch.int64), everything[2, mine].to(torch.float32))
            ]
        return by_table

    def _update(self, name: str, idx: torch.Tensor, grad: torch.Tensor) -> None:
        params = self.layouts[name].optimizer
        assert params is not None
        lr = self._optimizer.lr(name)
        w = self.storage[name]
        if name in self.momentum:
            state = self.momentum[name]
            state[idx] += grad * grad
            w[idx] -= lr * grad / (state[idx].sqrt() + params.get("eps", 1e-8))
        else:
            w[idx] -= lr * grad

    # ---- state dict ------------------------------------------------------------------------

    def sharded(self, name: str, local: torch.Tensor) -> ShardedTensor:
        """A ``(n,)`` ShardedTensor whose local shards are views of ``local`` (storage or state)."""
        layout = self.layouts[name]
        metadata, shards = [], []
        for block in layout.blocks:
            owner, device = block.ranks[0], block.devices[0]
            for start, offset, length in layout.slot_pieces(block):
                meta = ShardMetadata([start], [length], f"rank:{owner}/{device}")
                metadata.append(meta)
                if owner == self._rank:
                    shards.append(Shard(local.detach()[offset : offset + length], meta))
        global_meta = ShardedTensorMetadata(
            metadata,
            torch.Size([layout.table.num_embeddings]),
            TensorProperties(dtype=local.dtype, requires_grad=False),
        )
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, global_meta, process_group=self._process_group
        )

    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name, layout in self.layouts.items():
            local = self.storage[name] if name in self.storage else torch.empty(0)
            destination[prefix + name] = self.sharded(name, local)

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
            self.load_table(name, state_dict[key], self.storage.get(name))

    @torch.no_grad()
    def load_table(self, name: str, value: Any, local: Optional[torch.Tensor]) -> None:
        """Fill this rank's entries from a full ``(n,)`` tensor or a ShardedTensor of ``(n,)``.

        A ShardedTensor carries only the owner's copy of replicated blocks: holders then receive
        it by broadcast, so every rank must call this in the same order (load_state_dict does).
        """
        layout = self.layouts[name]
        n = layout.table.num_embeddings
        if tuple(value.shape) != (n,):
            raise ValueError(f"entity_weights.{name}: expected shape ({n},), got {tuple(value.shape)}")
        block = layout.local_block(self._rank)
        if not isinstance(value, ShardedTensor):
            if local is not None and block is not None:
                for start, offset, length in layout.slot_pieces(block):
                    local[offset : offset + length].copy_(value[start : start + length])
            return
        if local is not None:
            for shard in value.local_shards():
                start, length = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
                for s, offset, ln in layout.slot_pieces(block):  # type: ignore[arg-type]
                    if s == start and ln == length:
                        local[offset : offset + ln].copy_(shard.tensor)
        self.broadcast_replicas(name, local)

    def broadcast_replicas(self, name: str, local: Optional[torch.Tensor]) -> None:
        """Copy the owner's entries of every replicated block to the other holders."""
        layout = self.layouts[name]
        block = layout.local_block(self._rank)
        group = self._process_group if layout.dense else self._sync_group
        for b in layout.blocks:
            if len(b.ranks) > 1:
                mine = local is not None and block == b
                buf = local if mine else torch.empty(layout.storage_size(b), device=self._anchor.device)
                dist.broadcast(buf, src=b.ranks[0], group=group)

    @property
    def fused_optimizer(self) -> "_EntityWeightOptimizer":
        return self._optimizer


class _EntityWeightOptimizer(FusedOptimizer):
    """The fused optimizer of the scalars: lr per table in ``param_groups``, Adagrad state."""

    def __init__(self, weights: ShardedEntityWeights) -> None:
        self._weights = weights
        fused = {n: l for n, l in weights.layouts.items() if not l.dense}
        params = {
            f"entity_weights.{n}": weights.sharded(n, weights.storage[n] if n in weights.storage else torch.empty(0))
            for n in fused
        }
        state = {
            params[f"entity_weights.{n}"]: {
                "momentum1": weights.sharded(n, weights.momentum[n] if n in weights.momentum else torch.empty(0))
            }
            for n, l in fused.items()
            if l.optimizer.get("optimizer") in ADAGRAD  # type: ignore[union-attr]
        }
        groups = [
            {
                "params": [params[f"entity_weights.{n}"]],
                "lr": float(l.optimizer.get("learning_rate", 0.01)),  # type: ignore[union-attr]
                "table": n,
            }
            for n, l in fused.items()
        ]
        super().__init__(params, state, groups)

    def lr(self, table: str) -> float:
        return next(g["lr"] for g in self.param_groups if g["table"] == table)

    def load_state_dict(self, state_dict: Any) -> None:
        """Load, then hand the owner's Adagrad state of column-wise replicas to every holder."""
        super().load_state_dict(state_dict)
        w = self._weights
        for name, layout in w.layouts.items():
            if layout.replicated and layout.optimizer.get("optimizer") in ADAGRAD:  # type: ignore[union-attr]
                w.broadcast_replicas(name, w.momentum.get(name))

    def step(self, closure: Any = None) -> None:
        """No-op: updates happen in backward."""

    def zero_grad(self, set_to_none: bool = False) -> None:
        """No-op: no gradient is ever stored."""
