"""Planner support: tell TorchRec's planner the true size of what our collections hold."""

import copy
from typing import Dict, List, Optional

from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import (
    EmbeddingPerfEstimator,
    EmbeddingStorageEstimator,
)
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    ShardEstimator,
    SharderDataMap,
    ShardingOption,
    Storage,
)
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.utils import sharder_name
from torchrec.distributed.types import ModuleSharder, ShardingType, get_tensor_size_bytes

from torchrec_memcom.distributed.collection_sharder import fused_optimizer
from torchrec_memcom.distributed.entity_weights import ADAGRAD, COLUMN_SHARDED
from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection
from torchrec_memcom.modules.memcom_embedding_bag import MEmComEmbeddingBagCollection

FP32_BYTES = 4


class EntityWeightStorageEstimator(ShardEstimator):
    """Adds each MEmCom shard's per-entity scalars (and Adagrad state) to its storage; the
    MEmCom tail tiers of budgeted tables too.

    The stock estimator sees only the shared ``m x d`` table. A row shard of ``r`` rows also
    holds ``K * r`` scalars (``K = ceil(n/m)``); a column shard or a data-parallel copy holds
    all ``n`` (its rank keeps a replica). Runs after the stock storage estimator.
    """

    def __init__(
        self, topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None
    ) -> None:
        self._topology = topology

    def estimate(
        self, sharding_options: list[ShardingOption], sharder_data_map: Optional[SharderDataMap] = None
    ) -> None:
        for option in sharding_options:
            # budgeted tables hold their tiers (a MEmCom tail among them) as a MEmCom collection
            owner = option.module[1]
            module = getattr(owner, "tier_collection", owner)
            if not isinstance(module, MEmComEmbeddingBagCollection):
                continue
            table = next(t for t in module.tables if t.name == option.name)
            if not table.compressed:
                continue
            sharder = (sharder_data_map or {}).get(sharder_name(type(owner)))
            optimizer = fused_optimizer(option.tensor, sharder.fused_params if sharder else None)
            copies = 2 if optimizer in ADAGRAD else 1  # (row-wise) Adagrad: one state float per scalar
            for shard in option.shards:
                if option.sharding_type in COLUMN_SHARDED or (
                    option.sharding_type == ShardingType.DATA_PARALLEL.value
                ):
                    entries = table.num_embeddings
                else:
                    entries = table.num_slot_blocks * shard.size[0]
                extra = entries * FP32_BYTES * copies
                on_hbm = self._topology.compute_device in {"cuda", "mtia"}
                assert shard.storage is not None
                shard.storage = shard.storage + Storage(
                    hbm=extra if on_hbm else 0, ddr=0 if on_hbm else extra
                )


def replicated_bytes(module: nn.Module, parameter_multiplier: float) -> int:
    """Bytes every rank holds of the budgeted collections in ``module`` whatever the plan: the
    id ranks (remap buffers) and the projections, dense parameters counted ``parameter_multiplier``
    times as TorchRec counts dense parameters (with their gradients and optimizer state)."""
    total = 0.0
    for m in module.modules():
        if isinstance(m, BudgetedEmbeddingBagCollection):
            total += sum(get_tensor_size_bytes(b) for b in m.remap.buffers())
            total += parameter_multiplier * sum(get_tensor_size_bytes(p) for p in m.projections.parameters())
    return round(total)


class ReplicatedStateReservation(HeuristicalStorageReservation):
    """TorchRec's heuristic reservation, plus what budgeted collections replicate on every rank.

    The stock reservation takes a shardable module's whole state out of the dense estimate and
    leaves it to the sharding options, which see only the tier tables: the remap buffers and
    projections would be counted nowhere. They are reserved on every device, like dense state.
    """

    def reserve(
        self,
        topology: Topology,
        batch_size: int,
        module: nn.Module,
        sharders: List[ModuleSharder[nn.Module]],
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
    ) -> Topology:
        reserved = super().reserve(topology, batch_size, module, sharders, constraints)
        extra = replicated_bytes(module, self._parameter_multiplier)
        on_hbm = topology.compute_device in {"cuda", "mtia"}
        for device in reserved.devices:
            device.storage -= Storage(hbm=extra if on_hbm else 0, ddr=0 if on_hbm else extra)
        self._last_reserved_topology = copy.deepcopy(reserved)
        return reserved


def memcom_planner(
    topology: Topology,
    batch_size: int,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
) -> EmbeddingShardingPlanner:
    """TorchRec's planner with the stock estimators plus the MEmCom scalars' storage, and the
    stock storage reservation plus what budgeted collections replicate on every rank."""
    estimators: list[ShardEstimator] = [
        EmbeddingPerfEstimator(topology=topology, constraints=constraints),
        EmbeddingStorageEstimator(topology=topology, constraints=constraints),
        EntityWeightStorageEstimator(topology=topology, constraints=constraints),
    ]
    enumerator = EmbeddingEnumerator(
        topology=topology, batch_size=batch_size, constraints=constraints, estimator=estimators
    )
    return EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, enumerator=enumerator, constraints=constraints,
        storage_reservation=ReplicatedStateReservation(percentage=0.15),  # the stock default's
    )
