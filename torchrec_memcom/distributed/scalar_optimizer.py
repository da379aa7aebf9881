"""The scalars' fused optimizer, as TorchRec's CombinedOptimizer sees it.

The scalars update in backward (``scalar_update``), so ``step`` and ``zero_grad`` do nothing;
this optimizer makes their learning rates (one param group per table, which LR schedulers scale
like the tables') and their Adagrad state visible, saved and loaded like FBGEMM's fused
optimizers' are.
"""

from typing import Any, Callable, Dict

from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.optim.fused import FusedOptimizer


class EntityWeightOptimizer(FusedOptimizer):
    """The fused optimizer of the scalars: one lr per table in ``param_groups``, Adagrad state.

    Args:
        params: per parameter key (``entity_weights.T``), the table's scalars.
        lrs: per parameter key, the scalars' lr.
        momentum: per parameter key, the scalars' Adagrad state (empty for SGD).
        on_load: run after ``load_state_dict`` (hands loaded state to replicas).

    Example::

        optimizer = EntityWeightOptimizer({"entity_weights.t0": w}, {"entity_weights.t0": 0.1}, {}, lambda: None)
        optimizer.param_groups[0]["lr"]  # 0.1, read by the in-backward update at every step
    """

    def __init__(
        self,
        params: Dict[str, ShardedTensor],
        lrs: Dict[str, float],
        momentum: Dict[str, ShardedTensor],
        on_load: Callable[[], None],
    ) -> None:
        self._on_load = on_load
        state = {params[key]: {"momentum1": m} for key, m in momentum.items()}
        # one group per table: its scalars' lr (schedulers scale each group alike)
        groups = [{"params": [p], "lr": lrs[key]} for key, p in params.items()]
        super().__init__(params, state, groups)

    def load_state_dict(self, state_dict: Any) -> None:
        """Load, then run ``on_load``."""
        super().load_state_dict(state_dict)
        self._on_load()

    def step(self, closure: Any = None) -> None:
        """No-op: updates happen in backward."""

    def zero_grad(self, set_to_none: bool = False) -> None:
        """No-op: no gradient is ever stored."""
