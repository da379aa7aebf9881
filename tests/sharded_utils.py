"""What the sharded-equals-unsharded tests share: a model wrapper, the state and output
comparisons, and the backward and dense step both sides take."""

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
                index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                torch.testing.assert_close(shard.tensor.cpu(), full[key][index], msg=lambda m: f"{what}: {key}: {m}")  # noqa: B023  (assert_close calls msg at once)
        else:
            torch.testing.assert_close(value.cpu(), full[key], msg=f"{what}: {key}")


def assert_outputs_match(out: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], mine: slice, what: str) -> None:
    """``out`` (this rank's examples ``mine``, on any device) equals ``ref`` (every example),
    feature by feature: by key, never by position."""
    assert sorted(out) == sorted(ref), f"{what}: keys {sorted(out)} != {sorted(ref)}"
    for f in ref:
        torch.testing.assert_close(
            out[f].detach().cpu(),
            ref[f][mine].detach(),
            msg=lambda m: f"{what}: feature {f}: {m}",  # noqa: B023  (assert_close calls msg at once)
        )


def backward_both(out: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], mine: slice) -> None:
    """Backward of the same random weighting of every output, this rank's share on the sharded
    side, all examples on the unsharded one."""
    g = torch.Generator().manual_seed(2)
    device = next(iter(out.values())).device
    loss, ref_loss = torch.zeros((), device=device), torch.zeros(())
    for f in sorted(ref):
        weight = torch.randn(ref[f].shape, generator=g)
        loss = loss + (out[f] * weight[mine].to(device)).sum()
        ref_loss = ref_loss + (ref[f] * weight).sum()
    loss.backward()
    ref_loss.backward()


def sgd_on_dense(module: nn.Module, lr: float) -> None:
    """The dense optimizer of a sharded model: plain SGD on what DDP averaged (fused tables
    stepped in backward have no ``.grad``)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= lr * p.grad
