"""What the sharded-equals-unsharded tests share: a model wrapper and the state comparison."""

from typing import Dict

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor


class Wrapper(nn.Module):
    """Returns tensors, as a real model does (DDP looks for tensors in the output)."""

    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt):  # type: ignore[no-untyped-def]
        return self.ebc(kjt).to_dict()


def assert_state_matches(module: nn.Module, full: Dict[str, torch.Tensor], what: str) -> None:
    """``module``'s state dict has ``full``'s keys, and each local shard (or replica), on
    whatever device, equals its slice of the full (CPU) tensor."""
    state = module.state_dict()
    assert set(state) == set(full), f"{what}: keys {sorted(state)} != {sorted(full)}"
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                index = tuple(
                    slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
                )
                torch.testing.assert_close(shard.tensor.cpu(), full[key][index], msg=lambda m: f"{what}: {key}: {m}")
        else:
            torch.testing.assert_close(value.cpu(), full[key], msg=f"{what}: {key}")
