"""Copy full (unsharded) tensors into a sharded state dict, as the planner placed them."""

from typing import Any, Mapping

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor


@torch.no_grad()
def copy_full_tensor(dst: Any, src: torch.Tensor) -> None:
    """Fill ``dst`` (a ShardedTensor's local shards, or a plain tensor) from the full ``src``."""
    if isinstance(dst, ShardedTensor):
        for shard in dst.local_shards():
            index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
            shard.tensor.copy_(src[index])
    else:
        dst.copy_(src)


def load_full_state_dict(module: torch.nn.Module, full: Mapping[str, torch.Tensor]) -> None:
    """Load an unsharded state dict into a sharded model (DMP or a sharded module).

    Fills every local shard in place, then calls ``load_state_dict`` so that modules holding
    replicas (MEmCom column-wise scalars) receive them too.
    """
    state = module.state_dict()
    missing = sorted(set(state) - set(full))
    if missing:
        raise KeyError(f"state dict lacks {missing}")
    for key, dst in state.items():
        copy_full_tensor(dst, full[key].to(_device_of(dst)))
    module.load_state_dict(state)


def _device_of(t: Any) -> torch.device:
    if isinstance(t, ShardedTensor):
        shards = t.local_shards()
        return shards[0].tensor.device if shards else torch.device("cpu")
    return t.device
