"""The sharder shape all our EBC-like collections share: the stock EBC sharder, pointed at our
unsharded and sharded module types (DMP picks sharders by exact module type), whose sharded
module holds what the stock sharder makes of the tables; which FBGEMM optimizer their sharding
fuses into a table; and the tensors the planner sizes their tables by."""

from typing import Any, Dict, Optional, Type

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ParameterSharding, ShardingEnv
from torchrec.distributed.utils import optimizer_type_to_emb_opt_type


class CollectionSharder(EmbeddingBagCollectionSharder):
    """Subclasses name ``unsharded`` and ``sharded``; the sharded type takes ``(module, plan,
    held_sharder, env, device, module_fqn)``, as TorchRec's FP-EBC takes its EBC sharder.
    Shardable parameters: ``embedding_bags.T.weight``; planning as the stock EBC sharder's.

    One base, so that every collection plans and shards its tables as a stock EBC would.

    Args:
        fused_params, qcomm_codecs_registry: as for TorchRec's EBC sharder (and handed to the
            held one).

    Example::

        class MyCollectionSharder(CollectionSharder):
            unsharded = MyCollection
            sharded = ShardedMyCollection

        sharders = [MyCollectionSharder(fused_params=fused_params), *get_default_sharders()]
    """

    unsharded: Type[nn.Module]
    sharded: Type[ShardedEmbeddingModule]

    def held_sharder(self) -> BaseEmbeddingSharder:
        """The sharder of the tables the sharded module holds: the stock EBC one."""
        return EmbeddingBagCollectionSharder(
            fused_params=self.fused_params, qcomm_codecs_registry=self.qcomm_codecs_registry
        )

    def shard(
        self,
        module: Any,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedEmbeddingModule:
        return self.sharded(module, params, self.held_sharder(), env, device, module_fqn)

    def shardable_parameters(self, module: Any) -> Dict[str, nn.Parameter]:
        """Each table's weight; for a table with per-entity scalars, a ``PlannedTable`` of its
        shape that the planner (TorchRec's stock storage estimator, which sizes a shard by
        ``numel() * element_size()`` in proportion to its share of the shape) sees at the
        true bytes: weights, scalars and their optimizer state."""
        weights = {name: bag.weight for name, bag in module.embedding_bags.items()}
        for table in getattr(module, "scalar_tables", lambda: [])():
            weight = weights[table.name]
            weights[table.name] = PlannedTable(weight, table_bytes(table, fused_optimizer(weight, self.fused_params)))
        return weights

    @property
    def module_type(self) -> Type[nn.Module]:
        return self.unsharded

    @property
    def sharded_module_type(self) -> Type[ShardedEmbeddingModule]:
        return self.sharded


def fused_optimizer(weight: nn.Parameter, fused_params: Optional[Dict[str, Any]]) -> Optional[EmbOptimType]:
    """The FBGEMM optimizer TorchRec's sharding fuses into a table's backward: the one
    ``apply_optimizer_in_backward`` attached to its weight, else the sharder's fused params
    (None: unknown, or an optimizer FBGEMM cannot fuse)."""
    kwargs = getattr(weight, "_optimizer_kwargs", [{}])[0]
    if "optimizer" in kwargs:
        return kwargs["optimizer"]
    optimizer_class = getattr(weight, "_optimizer_classes", [None])[0]
    if optimizer_class is not None:
        try:
            return optimizer_type_to_emb_opt_type(optimizer_class)
        except ValueError:
            return None
    return (fused_params or {}).get("optimizer")


# Optimizer state FBGEMM keeps per table row, in floats, given the row's dim.
ROW_STATE = {
    EmbOptimType.EXACT_SGD: lambda d: 0,
    EmbOptimType.EXACT_ROWWISE_ADAGRAD: lambda d: 1,
    EmbOptimType.EXACT_ADAGRAD: lambda d: d,
}


def table_bytes(table: Any, optimizer: Optional[EmbOptimType]) -> int:
    """What a MEmCom table's shards hold in all, in bytes: per shared row its ``d`` weights and
    their state, and the ``K = ceil(n/m)`` scalars of its slots (with Adagrad state for Adagrad).
    None: TorchRec's default fused optimizer, SGD."""
    optimizer = optimizer or EmbOptimType.EXACT_SGD
    if optimizer not in ROW_STATE:
        raise ValueError(f"table {table.name!r}: MEmCom tables train with SGD or (row-wise) Adagrad; got {optimizer}")
    d = table.embedding_dim
    scalars = table.num_slot_blocks * (1 if optimizer == EmbOptimType.EXACT_SGD else 2)
    return table.hash_rows * (d + ROW_STATE[optimizer](d) + scalars) * 4


class PlannedTable(torch.Tensor):
    """A meta tensor of a table's shape and dtype whose ``numel() * element_size()`` is
    ``num_bytes``: what the planner should count for the whole table. It carries no
    ``_optimizer_classes`` (``num_bytes`` includes the optimizer state).

    Args:
        like: the table's weight (its shape and dtype).
        num_bytes: the table's true bytes (``table_bytes``).

    Example::

        planned = PlannedTable(torch.empty(100, 16), num_bytes=100 * 16 * 4 + 1000 * 4)
        planned.shape, planned.numel()  # (100, 16), 2600
    """

    # torch stubs type __torch_function__ as a method; this is torch's own way to disable it
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]
    _planned_numel: int

    @staticmethod
    def __new__(cls, like: torch.Tensor, num_bytes: int) -> "PlannedTable":
        t = torch.Tensor._make_subclass(cls, torch.empty(like.shape, dtype=like.dtype, device="meta"))
        t._planned_numel = -(-num_bytes // like.element_size())
        return t

    def numel(self) -> int:
        return self._planned_numel

    def __deepcopy__(self, memo: Dict[int, Any]) -> "PlannedTable":
        return PlannedTable(self, self.numel() * self.element_size())
