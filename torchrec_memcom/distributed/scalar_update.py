"""The in-backward update of the fused scalars, as FBGEMM trains embedding rows.

Model-parallel scalars store no gradient: ``FusedLookup`` gathers them in forward and its
backward hands the touched entries and their gradients straight to an update, which
``sparse_step`` implements (SGD, or Adagrad with its sum of squares) at the rates ``StepRates``
reads from the tables' optimizer param groups, so LR schedulers apply to the scalars too.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from torchrec_memcom.distributed.scalar_layout import LocalLayout

# lr or eps of an update: one number for all entries, or one per entry
Rate = Union[float, torch.Tensor]


class FusedLookup(torch.autograd.Function):
    """Gathers fused scalars; its backward hands the gradients to the in-backward update.

    ``apply(anchor, flat, update, scales, *indices)`` returns a zero scalar that carries the
    anchor's gradient path, then ``flat[idx]`` per index tensor; backward calls
    ``update(idx, grad)`` once with all indices and their gradients (divided by ``scales``),
    empty where there were no indices, so that a rank without lookups still joins the
    replicas' sync.

    Args:
        anchor: a scalar that requires grad: the gradient path of a rank without lookups.
        flat: the fused scalars (no gradient of their own).
        update: called in backward with all indices and their gradients.
        scales: per index tensor, what to divide its gradient by.
        indices: the entries of ``flat`` to gather, one tensor per lookup.

    Example::

        anchor = torch.zeros((), requires_grad=True)
        zero, values = FusedLookup.apply(anchor, torch.arange(5.0), update, [1.0], torch.tensor([0, 3]))
        (zero + values.sum()).backward()  # update(tensor([0, 3]), tensor([1., 1.]))
    """

    @staticmethod
    def forward(
        ctx: Any,
        anchor: torch.Tensor,
        flat: torch.Tensor,
        update: Callable[[torch.Tensor, torch.Tensor], None],
        scales: List[float],
        *indices: torch.Tensor,
    ) -> Tuple[torch.Tensor, ...]:
        ctx.update, ctx.scales = update, scales
        ctx.dtype, ctx.device = flat.dtype, flat.device
        ctx.save_for_backward(*indices)
        return (anchor.new_zeros(()), *[flat.detach().index_select(0, idx) for idx in indices])

    @staticmethod
    def backward(ctx: Any, _anchor_grad: torch.Tensor, *grads: torch.Tensor) -> Tuple[None, ...]:
        if grads:
            idx = _cat(list(ctx.saved_tensors))
            grad = _cat([g if s == 1 else g / s for g, s in zip(grads, ctx.scales)])
        else:
            idx = torch.empty(0, dtype=torch.int64, device=ctx.device)
            grad = torch.empty(0, dtype=ctx.dtype, device=ctx.device)
        ctx.update(idx, grad)
        return (None,) * (4 + len(grads))


def _cat(tensors: List[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


@torch.no_grad()
def sparse_step(
    weights: torch.Tensor,
    state: Optional[torch.Tensor],
    idx: torch.Tensor,
    grad: torch.Tensor,
    lr: Rate,
    eps: Rate,
) -> None:
    """Update the entries ``idx`` of ``weights`` by their summed ``grad`` (an index may repeat):
    SGD if ``state`` is None, else Adagrad with ``state`` the sums of squared gradients."""
    grad = grad.to(weights.dtype)
    if state is None:  # SGD: index_add_ sums duplicates itself, no dedup needed
        weights.index_add_(0, idx, grad * -lr)
        return
    # Adagrad needs each entry's summed gradient before its state update. The touched state
    # entries hold the sums meanwhile: no sort to find distinct ids and no buffer of n. An
    # id met several times then gets the same values written several times.
    old = state.index_select(0, idx)
    summed = state.index_fill_(0, idx, 0).index_add_(0, idx, grad).index_select(0, idx)
    new = old.addcmul_(summed, summed)
    state.index_copy_(0, idx, new)
    step = summed.div_(new.sqrt_().add_(eps)).mul_(-lr)
    weights.index_copy_(0, idx, weights.index_select(0, idx).add_(step))


class StepRates:
    """lr and eps of the update of this rank's fused tables, as numbers when they all share
    them, else per entry of the fused flat tensor.

    Args:
        local: this rank's flat layout.
        groups: per table of ``local.fused``, its param group in the scalars' optimizer.
        eps: per table of ``local.fused``, its Adagrad eps.
        dtype: dtype of the scalars.

    Example::

        rates = StepRates(local, [0, 1], [1e-8, 1e-3], torch.float32)
        lr, eps = rates(idx, optimizer.param_groups)
    """

    def __init__(self, local: LocalLayout, groups: List[int], eps: List[float], dtype: torch.dtype) -> None:
        self._local = local
        self._groups = groups
        self._eps = torch.tensor(eps, dtype=dtype, device=local.starts.device)
        self._uniform_eps = len(set(eps)) <= 1
        self._eps_value = float(eps[0]) if eps else 0.0

    def __call__(self, idx: torch.Tensor, param_groups: Sequence[Dict[str, Any]]) -> Tuple[Rate, Rate]:
        """``(lr, eps)`` for the entries ``idx``, lr as the param groups say now."""
        lrs = [param_groups[g]["lr"] for g in self._groups]
        if len(set(lrs)) == 1 and self._uniform_eps:
            return float(lrs[0]), self._eps_value
        table = self._local.table_of(idx)
        return torch.tensor(lrs, dtype=self._eps.dtype, device=idx.device)[table], self._eps[table]
