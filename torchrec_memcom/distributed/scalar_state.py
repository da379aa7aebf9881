"""The scalars' state dict: each table as one ``(n,)`` ShardedTensor indexed by slot.

A rank stores a table's scalars by row block (entry ``k * r + row - o``), not by slot, so no
stock sharding spec describes them: the ShardedTensor is built by hand, its local shards the
contiguous runs of slots of this rank's block (``TableLayout.slot_pieces``), viewed in place. A
replicated block shows only its owner's (lowest rank's) copy, so each slot appears once whatever
the sharding, and a checkpoint reshards like any other.
"""

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import (
    ShardedTensorMetadata,
    TensorProperties,
)

from torchrec_memcom.distributed.scalar_layout import RowBlock, TableLayout


def sharded_tensor(
    layout: TableLayout,
    local: Optional[torch.Tensor],
    rank: int,
    dtype: torch.dtype,
    process_group: Optional[dist.ProcessGroup],
) -> ShardedTensor:
    """``(n,)`` ShardedTensor of a table whose local shards are views of ``local``, this rank's
    storage of the table (needed where this rank owns a block)."""
    metadata, shards = [], []
    for block in layout.blocks:
        owner, device = block.ranks[0], block.devices[0]
        for start, offset, length in layout.slot_pieces(block):
            meta = ShardMetadata([start], [length], f"rank:{owner}/{device}")
            metadata.append(meta)
            if owner == rank:
                assert local is not None
                shards.append(Shard(local.detach()[offset : offset + length], meta))
    global_meta = ShardedTensorMetadata(
        metadata,
        torch.Size([layout.table.num_embeddings]),
        TensorProperties(dtype=dtype, requires_grad=False),
    )
    # torch's own constructor from given global metadata (the public `init_from_local_shards`
    # would gather every rank's shards to infer it); TorchRec builds its ShardedTensors alike
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, global_meta, process_group=process_group)


@torch.no_grad()
def copy_block(layout: TableLayout, block: RowBlock, local: torch.Tensor, value: Any) -> None:
    """Fill ``local``, the storage of ``block``, from a full ``(n,)`` tensor (all its slots) or
    a ShardedTensor of ``(n,)`` (the slots of its local shards)."""
    if isinstance(value, ShardedTensor):
        pieces = {(s, ln): offset for s, offset, ln in layout.slot_pieces(block)}
        for shard in value.local_shards():
            start, length = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
            offset = pieces[(start, length)]
            local[offset : offset + length].copy_(shard.tensor)
        return
    for start, offset, length in layout.slot_pieces(block):
        local[offset : offset + length].copy_(value[start : start + length])
