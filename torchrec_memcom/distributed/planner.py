"""Planner support: reserve what collections replicate on every rank (budgeted ones' ranks
and projections), as their sharders' ``replicated_bytes`` hook counts it.

Our sharders report each table's true bytes to TorchRec's stock estimators themselves
(``CollectionSharder.shardable_parameters``); what no table holds is reserved here.
"""

import copy
from typing import Any, Dict, List, Optional, Type

from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, Storage, StorageReservation
from torchrec.distributed.types import ModuleSharder


def replicated_bytes(module: nn.Module, sharders: List[ModuleSharder[nn.Module]], parameter_multiplier: float) -> int:
    """Bytes every rank holds of ``module``'s collections whatever the plan: the sum, over the
    submodules a sharder shards (by exact type, as DMP picks), of that sharder's
    ``replicated_bytes`` (the hook a sharder of a collection with replicated state defines),
    dense parameters counted ``parameter_multiplier`` times as TorchRec counts them."""
    by_type: Dict[Type[nn.Module], ModuleSharder[nn.Module]] = {}
    for s in sharders:
        by_type.setdefault(s.module_type, s)
    total = 0
    for m in module.modules():
        hook = getattr(by_type.get(type(m)), "replicated_bytes", None)
        if hook is not None:
            total += hook(m, parameter_multiplier)
    return total


class ReplicatedStateReservation(HeuristicalStorageReservation):
    """TorchRec's heuristic reservation, plus what budgeted collections replicate on every rank.

    The stock reservation takes a shardable module's whole state out of the dense estimate and
    leaves it to the sharding options, which see only the tier tables: the remap buffers and
    projections would be counted nowhere. They are reserved on every device, like dense state.

    Args:
        percentage, parameter_multiplier, dense_tensor_estimate: as for TorchRec's
            ``HeuristicalStorageReservation``.

    Example::

        reservation = ReplicatedStateReservation(percentage=0.15)  # what memcom_planner uses
        planner = EmbeddingShardingPlanner(topology, batch_size=512, storage_reservation=reservation)
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
        # the stock reservation's own multiplier and last topology (it keeps them only privately)
        extra = replicated_bytes(module, sharders, self._parameter_multiplier)
        on_hbm = topology.compute_device in {"cuda", "mtia"}
        for device in reserved.devices:
            device.storage -= Storage(hbm=extra if on_hbm else 0, ddr=0 if on_hbm else extra)
        self._last_reserved_topology = copy.deepcopy(reserved)
        return reserved


def memcom_planner(
    topology: Topology,
    batch_size: int,
    storage_reservation: Optional[StorageReservation] = None,
    **planner_kwargs: Any,
) -> EmbeddingShardingPlanner:
    """TorchRec's planner with ``ReplicatedStateReservation`` (the stock heuristic reservation,
    15% as the stock default, plus what budgeted collections replicate on every rank) unless
    ``storage_reservation`` is given. Any other ``EmbeddingShardingPlanner`` argument
    (constraints, proposer, enumerator, ...) passes through: our sharders report their tables'
    true bytes (``shardable_parameters``), so the stock estimators need no help."""
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        storage_reservation=storage_reservation or ReplicatedStateReservation(percentage=0.15),
        **planner_kwargs,
    )
