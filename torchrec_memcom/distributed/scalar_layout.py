"""Where a sharded MEmCom table's per-entity scalars live: which ranks, and where in their storage.

A table's slot ``s = k * m + row`` (``row < m``, ``k < K = ceil(n/m)``) is routed to the rank
holding shared ``row``, so the scalars follow the row sharding of the shared table: a
``RowBlock`` is a range of shared rows and the ranks holding it (several for column-wise shards,
which replicate it; all for data-parallel). A rank holding rows ``[o, o + r)`` stores the scalars
of exactly those slots as a flat ``K * r`` vector, entry ``k * r + (row - o)``, so a lookup needs
no further communication. ``table_layout`` reads the blocks from a table's ParameterSharding and
refuses what the in-backward update does not implement; ``LocalLayout`` places this rank's blocks
of all tables in two flat tensors.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import ParameterSharding, ShardingType

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
    """Shared rows ``[offset, offset + rows)`` of a table and the ranks that hold them: the unit
    the scalars follow (a slot lives with its shared row).

    Args:
        offset: the block's first shared row.
        rows: its shared rows.
        ranks: the ranks that hold it (several for column-wise replicas, all for data-parallel).
        devices: each rank's device (``"cpu"``, ``"cuda:0"``), in ``ranks``' order.

    Example::

        RowBlock(offset=50, rows=50, ranks=(1,), devices=("cpu",))  # rows 50..99 on rank 1
    """

    offset: int
    rows: int
    ranks: Tuple[int, ...]
    devices: Tuple[str, ...]


@dataclasses.dataclass
class TableLayout:
    """Where a table's scalars live: its row blocks, and how this rank trains its block
    (``table_layout`` reads it from the table's ``ParameterSharding``).

    Args:
        table: the MEmCom table.
        sharding_type: its sharding type (TorchRec's ``ShardingType`` value).
        blocks: its row blocks.
        optimizer: the fused params of its optimizer; None for data-parallel.
        rule: the scalars' update; None for data-parallel.

    Example::

        table = MEmComTable("t0", num_embeddings=1000, embedding_dim=16, hash_rows=100, hash="mod", compressed=True)
        blocks = [RowBlock(0, 50, (0,), ("cpu",)), RowBlock(50, 50, (1,), ("cpu",))]
        layout = TableLayout(table, "row_wise", blocks, {"learning_rate": 0.1}, ScalarRule(False, 0.1, 1e-8))
        block = layout.local_block(1)
        layout.storage_size(block)  # 500: K = 10 slots per shared row, 50 rows
    """

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

    @property
    def fused_rule(self) -> ScalarRule:
        """The in-backward update of a model-parallel table's scalars (data-parallel ones have none)."""
        assert self.rule is not None, f"table {self.table.name!r}: data-parallel scalars train with the dense optimizer"
        return self.rule

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


class LocalLayout:
    """Where this rank's blocks sit: fused tables' in one flat tensor, data-parallel ones' in another.

    One flat tensor per kind makes a lookup one gather per KJT and the update one scatter per
    step, whatever the number of tables.

    Args:
        layouts: every table's layout.
        rank: this rank.
        device: where ``starts`` lives (with the scalars).

    Example::

        local = LocalLayout(layouts, rank, device)
        fused = torch.empty(local.sizes["fused"], device=device)
        scalars_of_t0 = local.view("t0", fused)
    """

    def __init__(self, layouts: Dict[str, TableLayout], rank: int, device: torch.device) -> None:
        # table -> (start, size) in the flat tensor of its kind
        self.slices: Dict[str, Tuple[int, int]] = {}
        self.sizes = {"fused": 0, "dense": 0}
        for name, layout in layouts.items():
            block = layout.local_block(rank)
            if block is not None:
                kind = "dense" if layout.dense else "fused"
                self.slices[name] = (self.sizes[kind], layout.storage_size(block))
                self.sizes[kind] += layout.storage_size(block)
        # the fused tables this rank holds, in flat order, and where each starts
        self.fused = [n for n in self.slices if not layouts[n].dense]
        self.starts = torch.tensor([self.slices[n][0] for n in self.fused], dtype=torch.int64, device=device)

    def view(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """``name``'s part of ``flat`` (the flat tensor of its kind, or one shaped like it)."""
        start, size = self.slices[name]
        return flat.narrow(0, start, size)

    def table_of(self, idx: torch.Tensor) -> torch.Tensor:
        """Position in ``fused`` of the table each index of the fused flat tensor belongs to."""
        return torch.searchsorted(self.starts, idx, right=True) - 1
