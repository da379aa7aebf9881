"""Sharded mixed collection and its sharder, in the shape of TorchRec's FP-EBC and MC-EBC ones.

``MixedEmbeddingBagCollection`` is sharded as one module, so TorchRec's train pipeline sees one
sharded module taking the batch KJT and pipelines it (children sharded on their own would take
``features.permute(...)``, which the pipeline does not pipeline). Each child is sharded by its
own sharder and kept at ``collections.<i>``: state-dict keys, parameter names and fused
optimizer keys stay the unsharded ones. ``input_dist`` splits the KJT by key and runs each
child's; their splits awaitables are returned as one, which the pipeline fuses with the other
modules' splits all-to-all. ``compute`` and ``output_dist`` run per child; the output is joined
by key, in config order.
"""

import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

import torch
from torch import nn
from torchrec.distributed.embedding_sharding import EmbeddingShardingContext, KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, KJTList, ShardedEmbeddingModule
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ModuleSharder,
    Multistreamable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardedModule,
    ShardingEnv,
)
from torchrec.distributed.utils import append_prefix
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.modules.mixed_embedding_bag import MixedEmbeddingBagCollection, join_by_key


@dataclasses.dataclass
class MixedEmbeddingBagCollectionContext(Multistreamable):
    """Per-batch state: each child's context, and their sharding contexts in one list (TorchRec's
    splits and tensor awaitables fill them by position, one per distributed input).

    Args:
        children: each child's own context, in the children's order.
        sharding_contexts: the children's sharding contexts, concatenated.
        inputs_per_child: how many distributed inputs (KJTs) each child's ``input_dist`` made,
            to split them back per child.
    """

    children: List[Multistreamable] = dataclasses.field(default_factory=list)
    sharding_contexts: List[Optional[EmbeddingShardingContext]] = dataclasses.field(default_factory=list)
    inputs_per_child: List[int] = dataclasses.field(default_factory=list)

    def record_stream(self, stream: torch.Stream) -> None:
        for ctx in self.children:
            ctx.record_stream(stream)


class _JoinedByKey(LazyAwaitable[KeyedTensor]):
    """The children's output awaitables as one KeyedTensor (no TorchRec awaitable joins
    KeyedTensors by key)."""

    def __init__(self, awaitables: List[LazyAwaitable[KeyedTensor]], keys: List[str], dims: List[int]) -> None:
        super().__init__()
        self._awaitables = awaitables
        self._keys = keys
        self._dims = dims

    def _wait_impl(self) -> KeyedTensor:
        return join_by_key([a.wait() for a in self._awaitables], self._keys, self._dims)


def _split(items: List[Any], counts: List[int]) -> List[List[Any]]:
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [list(items[s : s + n]) for s, n in zip(starts, counts)]


class ShardedMixedEmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, List[Any], KeyedTensor, MixedEmbeddingBagCollectionContext],
    FusedOptimizerModule,
):
    """Sharded ``MixedEmbeddingBagCollection``: each child sharded by its sharder, one input
    distribution for all of them, outputs joined by key.

    DMP builds it (through ``MixedEmbeddingBagCollectionSharder``); it is not built by hand.

    Args:
        module: the unsharded mixed collection.
        table_name_to_parameter_sharding: the plan of all its tables (each child's shardable
            parameters: ``T``, ``T@q``/``T@r``, ``T@tier<j>``).
        sharders: the sharder of each child's type.
        env, device, qcomm_codecs_registry, module_fqn: as for TorchRec's sharded modules.

    Example::

        children = [MEmComEmbeddingBagCollectionSharder(), HashEmbeddingBagCollectionSharder()]
        sharders = [MixedEmbeddingBagCollectionSharder(children), *get_default_sharders()]
        plan = memcom_planner(topology, batch_size=512).collective_plan(model, sharders, pg)
        dmp = DistributedModelParallel(model, plan=plan, sharders=sharders)
        dmp.module.ebc  # this class, where model.ebc was a MixedEmbeddingBagCollection of the two
    """

    def __init__(
        self,
        module: MixedEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        sharders: Dict[Type[nn.Module], ModuleSharder[nn.Module]],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._module_fqn = module_fqn
        children: List[ShardedModule[Any, Any, Any, Any]] = []
        for i, child in enumerate(module.collections):
            sharder = child_sharder(sharders, child)
            tables = sharder.shardable_parameters(child)
            unplanned = sorted(set(tables) - set(table_name_to_parameter_sharding))
            if unplanned:
                raise ValueError(f"{module_fqn or 'mixed collection'}: the plan lacks tables {unplanned}")
            children.append(
                sharder.shard(
                    child,
                    {name: table_name_to_parameter_sharding[name] for name in tables},
                    env,
                    device,
                    append_prefix(module_fqn or "", f"collections.{i}"),
                )
            )
        # the unsharded module's attribute: keys stay `collections.<i>.<the child's own keys>`
        self.collections = nn.ModuleList(children)
        self._children = children  # the same modules, typed (ModuleList items are plain modules)
        # per distributed input, its lookup (ShardedEmbeddingModule.prefetch pairs them)
        self._lookups = [lookup for child in children for lookup in child._lookups]
        self._features = module.child_features()
        self._keys, self._dims = module.output_keys()
        self._orders: Dict[Tuple[str, ...], Tuple[List[int], List[int]]] = {}
        self._optim = CombinedOptimizer(
            [
                (f"collections.{i}", child.fused_optimizer)
                for i, child in enumerate(children)
                if isinstance(child, FusedOptimizerModule)
            ]
        )

    def extra_repr(self) -> str:
        """Nothing of its own: each child (printed below) shows its lookups."""
        return ""

    def create_context(self) -> MixedEmbeddingBagCollectionContext:
        return MixedEmbeddingBagCollectionContext(children=[c.create_context() for c in self._children])

    def _order(self, keys: List[str]) -> Tuple[List[int], List[int]]:
        """The permutation grouping the incoming keys by child, and how many each child takes
        (cached per key order)."""
        key = tuple(keys)
        if key not in self._orders:
            position = {k: i for i, k in enumerate(keys)}
            missing = sorted({f for feats in self._features for f in feats} - set(position))
            if missing:
                raise ValueError(f"{self._module_fqn or 'mixed collection'}: the KJT lacks features {missing}")
            self._orders[key] = (
                [position[f] for feats in self._features for f in feats],
                [len(f) for f in self._features],
            )
        return self._orders[key]

    def input_dist(
        self, ctx: MixedEmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        """Each child's input distribution on its features, as one splits awaitable."""
        order, counts = self._order(features.keys())
        with torch.no_grad():
            parts = features.permute(order).split(counts)
        awaitables = []
        for child, child_ctx, part in zip(self._children, ctx.children, parts):
            request = child.input_dist(child_ctx, part)
            if not isinstance(request, KJTListSplitsAwaitable):
                raise TypeError(
                    f"{type(child).__name__}.input_dist returned a {type(request).__name__}; a mixed "
                    f"collection joins KJTListSplitsAwaitables (those of TorchRec's sharded EBC/EC)"
                )
            awaitables += request.awaitables
            ctx.inputs_per_child.append(len(request.awaitables))
            ctx.sharding_contexts += getattr(child_ctx, "sharding_contexts", [])
        return KJTListSplitsAwaitable(awaitables, ctx, self._module_fqn)

    def _per_child(self, ctx: MixedEmbeddingBagCollectionContext, dist_input: KJTList) -> List[KJTList]:
        return [KJTList(part) for part in _split(list(dist_input), ctx.inputs_per_child)]

    def compute(self, ctx: MixedEmbeddingBagCollectionContext, dist_input: KJTList) -> List[Any]:
        return [
            child.compute(child_ctx, part)
            for child, child_ctx, part in zip(self._children, ctx.children, self._per_child(ctx, dist_input))
        ]

    def output_dist(self, ctx: MixedEmbeddingBagCollectionContext, output: List[Any]) -> LazyAwaitable[KeyedTensor]:
        return _JoinedByKey(
            [child.output_dist(child_ctx, out) for child, child_ctx, out in zip(self._children, ctx.children, output)],
            self._keys,
            self._dims,
        )

    def compute_and_output_dist(
        self, ctx: MixedEmbeddingBagCollectionContext, input: KJTList
    ) -> LazyAwaitable[KeyedTensor]:
        return _JoinedByKey(
            [
                child.compute_and_output_dist(child_ctx, part)
                for child, child_ctx, part in zip(self._children, ctx.children, self._per_child(ctx, input))
            ],
            self._keys,
            self._dims,
        )

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._optim

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        """Each child's (its dense parameters, such as budgeted projections, are left to DDP)."""
        for i, child in enumerate(self._children):
            yield from child.sharded_parameter_names(append_prefix(prefix, f"collections.{i}"))

    @property
    def unsharded_module_type(self) -> Type[MixedEmbeddingBagCollection]:
        return MixedEmbeddingBagCollection


def child_sharder(
    sharders: Dict[Type[nn.Module], ModuleSharder[nn.Module]], child: nn.Module
) -> ModuleSharder[nn.Module]:
    """The sharder of ``child``'s exact type (as DMP picks them), or an error naming it."""
    if type(child) not in sharders:
        raise ValueError(
            f"mixed collection: no sharder for its child {type(child).__name__}; the mixed sharder "
            f"holds sharders for {sorted(t.__name__ for t in sharders)}"
        )
    return sharders[type(child)]


class MixedEmbeddingBagCollectionSharder(BaseEmbeddingSharder[MixedEmbeddingBagCollection]):
    """Shards ``MixedEmbeddingBagCollection`` as one module, each child by its own sharder.

    The planner plans the children's tables as this module's (one plan keyed by the mixed
    module's path); it is offered the sharding types and kernels every child sharder takes, so
    each plan it makes shards. A hand-written plan may give a table any type its child's sharder
    takes.

    Args:
        sharders: the sharders of the children's types (``compress()`` passes its own).
        fused_params: as for TorchRec's sharders (the planner reads them).

    Example::

        sharder = MixedEmbeddingBagCollectionSharder(
            [QREmbeddingBagCollectionSharder(fused_params=fp), HashEmbeddingBagCollectionSharder(fused_params=fp)],
            fused_params=fp,
        )
    """

    def __init__(
        self,
        sharders: List[ModuleSharder[nn.Module]],
        fused_params: Optional[Dict[str, Any]] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._sharders: Dict[Type[nn.Module], ModuleSharder[nn.Module]] = {s.module_type: s for s in sharders}

    def _with_self(self) -> Dict[Type[nn.Module], ModuleSharder[nn.Module]]:
        """The children's sharders, and this one for mixed children (``qr_collection``'s)."""
        return {**self._sharders, MixedEmbeddingBagCollection: self}

    def shard(
        self,
        module: MixedEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedMixedEmbeddingBagCollection:
        return ShardedMixedEmbeddingBagCollection(
            module, params, self._with_self(), env, device, self.qcomm_codecs_registry, module_fqn
        )

    def shardable_parameters(self, module: MixedEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        """Every child's, by table name (lookup tables' names are unique across children)."""
        out: Dict[str, nn.Parameter] = {}
        for child in module.collections:
            tables = child_sharder(self._with_self(), child).shardable_parameters(child)
            repeated = sorted(set(tables) & set(out))
            if repeated:
                raise ValueError(f"mixed collection: tables {repeated} are in two of its children")
            out.update(tables)
        return out

    def sharding_types(self, compute_device_type: str) -> List[str]:
        """The types all child sharders take, in the first one's order."""
        per_sharder = [s.sharding_types(compute_device_type) for s in self._sharders.values()]
        return [t for t in per_sharder[0] if all(t in types for types in per_sharder[1:])]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        """The kernels all child sharders take for ``sharding_type``."""
        per_sharder = [s.compute_kernels(sharding_type, compute_device_type) for s in self._sharders.values()]
        return [k for k in per_sharder[0] if all(k in kernels for kernels in per_sharder[1:])]

    @property
    def module_type(self) -> Type[MixedEmbeddingBagCollection]:
        return MixedEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> Type[ShardedMixedEmbeddingBagCollection]:
        return ShardedMixedEmbeddingBagCollection
