"""TorchRec's own managed collisions (``ManagedCollisionEmbeddingBagCollection``, MCH with LFU
eviction) as a method of ``compress()``, for the benchmarks: the in-ecosystem alternative a
TorchRec user would compare against, sized to the same bytes as the other methods at a ratio.

It is registered by the benchmarks only (``register()``), not shipped as a method: it changes
which ids share rows while training (evictions), so a model trained with it is not what our
export and budget tools handle. Sharded as TorchRec shards it (row-wise: its
``ManagedCollisionCollectionSharder`` takes nothing else), inside our mixed collection by the
wrapper every compressed collection shares, which returns the pooled ``KeyedTensor`` alone.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Type

import torch
from torchrec.distributed.embedding_types import KJTList, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.mc_embeddingbag import (
    ManagedCollisionEmbeddingBagCollectionContext,
    ManagedCollisionEmbeddingBagCollectionSharder,
    ShardedManagedCollisionEmbeddingBagCollection,
)
from torchrec.distributed.types import LazyAwaitable, ParameterSharding, ShardingEnv, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.distributed.compressed_embeddingbag import ShardedCompressedCollection

NAME = "managed_collision"
# Per slot besides its row, what MCHManagedCollisionModule keeps with LFU eviction: the sorted
# raw id, the remapped id, the count and the last access iteration (int64 each); per table, its
# output segments (1,025 int64) and iteration counter (one int64).
SLOT_STATE_BYTES = 4 * 8
TABLE_STATE_BYTES = (1025 + 1) * 8


@dataclasses.dataclass
class MCConfig:
    """``ratio``: the table's fp32 bytes over those of the slots (rows plus their MCH state)."""

    ratio: float = 16.0
    eviction_interval: int = 1

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"MCConfig.ratio must be >= 1, got {self.ratio}")


def slots(num_embeddings: int, dim: int, ratio: float) -> int:
    """Slots at the bytes a ratio allows: ``n*d*4/ratio``, less the table's fixed MCH state, over
    a slot's row and MCH state; ``ValueError`` if not one fits."""
    budget = num_embeddings * dim * 4 / ratio - TABLE_STATE_BYTES
    count = int(budget // (dim * 4 + SLOT_STATE_BYTES))
    if count < 1:
        raise ValueError(
            f"managed collisions: {num_embeddings} rows at {ratio:g}x leave {budget:.0f} B after the table's "
            f"fixed MCH state ({TABLE_STATE_BYTES} B): not one slot"
        )
    return count


class ManagedCollisionBags(ManagedCollisionEmbeddingBagCollection):
    """An MC-EBC with the EBC interface (``forward`` -> KeyedTensor, ``embedding_bag_configs``
    the tables' own sizes), so that DLRM and our mixed collections take it as any collection.

    Args:
        tables: the tables, at their id counts (the input hash size).
        configs: each table's ``MCConfig``.
        device: where the slots live.
    """

    def __init__(self, tables: List[EmbeddingBagConfig], configs: Dict[str, MCConfig], device: torch.device):
        sized = [
            dataclasses.replace(t, num_embeddings=slots(t.num_embeddings, t.embedding_dim, configs[t.name].ratio))
            for t in tables
        ]
        modules = {
            t.name: MCHManagedCollisionModule(
                zch_size=s.num_embeddings,
                device=torch.device("cpu") if device.type == "meta" else device,
                eviction_policy=DistanceLFU_EvictionPolicy(),
                eviction_interval=configs[t.name].eviction_interval,
                input_hash_size=t.num_embeddings,
            )
            for t, s in zip(tables, sized)
        }
        super().__init__(
            EmbeddingBagCollection(sized, device=device),
            ManagedCollisionCollection(modules, sized),
            return_remapped_features=False,
        )
        self._configs = list(tables)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:  # type: ignore[override]
        return super().forward(features)[0]

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return self._embedding_module.device


class EvictingOnCpu(ShardedManagedCollisionEmbeddingBagCollection):
    """TorchRec's sharded MC-EBC, evicting on CPU too: FBGEMM 1.8.0 has no CPU kernel for the
    ``reset_weight_momentum`` its ``_evict`` (private: the one step that differs) calls, so on
    CPU the evicted slots' optimizer state is zeroed through FBGEMM's public
    ``split_optimizer_states`` views, and their rows re-initialized as TorchRec does."""

    def _evict(self, evictions_per_table: Dict[str, Optional[torch.Tensor]]) -> None:
        if self._device.type != "cpu":
            super()._evict(evictions_per_table)
            return
        with torch.no_grad():
            for table, slots in evictions_per_table.items():
                if slots is None:
                    continue
                tbe, index = self._table_to_tbe_and_index[table]
                states = tbe.split_optimizer_states() if tbe.optimizer.name != "EXACT_SGD" else []
                for state in states[int(index)] if states else []:
                    state[slots] = 0
                weight = self._embedding_module.embedding_bags.get_parameter(f"{table}.weight")
                init = self._embedding_module._table_name_to_config[table].init_fn
                weight.data[slots] = init(weight[slots])


class ShardedManagedCollisionBags(ShardedCompressedCollection[ManagedCollisionEmbeddingBagCollectionContext]):
    """TorchRec's sharded MC-EBC, held; its output's pooled ``KeyedTensor`` alone."""

    def __init__(
        self,
        module: ManagedCollisionBags,
        params: Dict[str, ParameterSharding],
        sharder: ManagedCollisionEmbeddingBagCollectionSharder,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        held = EvictingOnCpu(
            module,
            params,
            ebc_sharder=sharder._e_sharder,  # private: the stock sharder keeps no public handle on them
            mc_sharder=sharder._mc_sharder,
            env=env,
            device=device or torch.device("cpu"),
        )
        super().__init__(held, {}, sharder.qcomm_codecs_registry)

    def output_dist(
        self, ctx: ManagedCollisionEmbeddingBagCollectionContext, output: List[torch.Tensor]
    ) -> LazyAwaitable[KeyedTensor]:
        return self._embedding_module.output_dist(ctx, output)[0]  # (pooled, remapped ids: None)

    def compute_and_output_dist(
        self, ctx: ManagedCollisionEmbeddingBagCollectionContext, input: KJTList
    ) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))


class RowWiseEBCSharder(EmbeddingBagCollectionSharder):
    """The stock EBC sharder plus row-wise on CPU, the one type TorchRec's MC-EBC sharder takes
    (TorchRec 1.8.0 offers row-wise on CUDA only; its CPU kernels run it, as our hash sharder's)."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        return types if ShardingType.ROW_WISE.value in types else [*types, ShardingType.ROW_WISE.value]


class ManagedCollisionBagsSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """TorchRec's MC-EBC sharder (its EBC sharder offering row-wise on CPU too), for
    ``ManagedCollisionBags`` (DMP and our mixed sharder pick sharders by exact type)."""

    def __init__(self, fused_params: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(RowWiseEBCSharder(fused_params=fused_params), fused_params=fused_params)

    def shard(
        self,
        module: ManagedCollisionEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedEmbeddingModule:
        assert isinstance(module, ManagedCollisionBags)
        return ShardedManagedCollisionBags(module, params, self, env, device, module_fqn)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        """The EBC sharder's for this device (TorchRec's MC sharder lists UVM ones on CPU too)."""
        return self._e_sharder.compute_kernels(sharding_type, compute_device_type)

    @property
    def module_type(self) -> Type[ManagedCollisionBags]:  # type: ignore[override]
        return ManagedCollisionBags


def register() -> None:
    """Add the method to ``compress()``'s registry (once)."""
    from torchrec_memcom.registry import CompressionMethod, method_names, register_method

    if NAME not in method_names():
        register_method(
            CompressionMethod(
                name=NAME,
                config=MCConfig,
                collection=ManagedCollisionBags,
                build=ManagedCollisionBags,
                sharder=ManagedCollisionBagsSharder,
            )
        )
