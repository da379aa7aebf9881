"""TorchRec's stock planner sees what MEmCom tables really hold: shared rows, per-entity scalars
and the optimizer state of both; memcom_planner takes the user's planner arguments."""

import dataclasses
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_multiprocess
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from sharded_utils import Wrapper
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from torchrec_memcom import MEmComConfig, MEmComEmbeddingBagCollection, MEmComEmbeddingBagCollectionSharder
from torchrec_memcom.distributed.budgeted_embeddingbag import BudgetedEmbeddingBagCollectionSharder
from torchrec_memcom.distributed.planner import ReplicatedStateReservation, memcom_planner
from torchrec_memcom.modules.budget_allocation import Allocation, TableAllocation, Tier
from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection

TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n, feature_names=[f"f{i}"])
    for i, n in enumerate([20_000, 50_000, 300])
]


def _local_bytes(state: Dict[str, Any]) -> int:
    """Bytes of this rank's local shards of every ShardedTensor in a (nested) state dict."""
    total = 0
    for value in state.values():
        if isinstance(value, dict):
            total += _local_bytes(value)
        elif isinstance(value, ShardedTensor):
            total += sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
    return total


def _shard_storage(module: nn.Module, sharder: Any, kind: str, topology: Topology) -> List[int]:
    """DDR of each shard of the one table of ``module`` as TorchRec's stock planner sizes it."""
    constraints = {
        n: ParameterConstraints(sharding_types=[kind], compute_kernels=["fused"])
        for n in sharder.shardable_parameters(module)
    }
    options = EmbeddingEnumerator(topology, BATCH, constraints=constraints).enumerate(module, [sharder])
    assert len(options) == 1
    return [s.storage.ddr for s in options[0].shards]


CASES = [  # (sharding type, optimizer applied in backward or None for the sharder's fused SGD)
    ("table_wise", RowWiseAdagrad),
    ("row_wise", RowWiseAdagrad),
    ("row_wise", None),
    ("table_wise", torch.optim.Adagrad),
]
BATCH = 32


def _storage_equals_allocation(rank: int, world_size: int) -> None:
    topology = Topology(world_size=world_size, local_world_size=world_size, compute_device="cpu")
    table = EmbeddingBagConfig(name="t0", embedding_dim=16, num_embeddings=20_000, feature_names=["f0"])
    for kind, optimizer in CASES:
        module = MEmComEmbeddingBagCollection([table], MEmComConfig(ratio=8))
        if optimizer is not None:
            apply_optimizer_in_backward(optimizer, module.parameters(), {"lr": 0.1})
        sharder = MEmComEmbeddingBagCollectionSharder(fused_params={"learning_rate": 0.1})
        storage = _shard_storage(module, sharder, kind, topology)
        # The stock planner's input/output share of a shard: a plain table of the shared shape
        # (left uncompressed, so planned as TorchRec plans any table), trained without state.
        m = module.tables[0].hash_rows
        plain = MEmComEmbeddingBagCollection(
            [dataclasses.replace(table, num_embeddings=m)],
            MEmComConfig(num_hash_rows=1, min_rows=m + 1),
            device=torch.device("meta"),
        )
        stock_storage = _shard_storage(plain, MEmComEmbeddingBagCollectionSharder(), kind, topology)
        plan = EmbeddingShardingPlanner(
            topology, BATCH, constraints={"t0": ParameterConstraints(sharding_types=[kind], compute_kernels=["fused"])}
        ).plan(module, [sharder])
        dmp = DistributedModelParallel(
            Wrapper(module),
            env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
            device=torch.device("cpu"),
            plan=ShardingPlan({"ebc": plan.plan[""]}),
            sharders=[sharder],
        )
        sharded = get_unwrapped_module(dmp).ebc
        held = _local_bytes(sharded.state_dict()) + _local_bytes(sharded.fused_optimizer.state_dict()["state"])
        shards = plan.plan[""]["t0"].sharding_spec.shards
        mine = [i for i, s in enumerate(shards) if s.placement.rank() == rank]
        rows = sum(shards[i].shard_sizes[0] for i in mine)
        io = sum(stock_storage[i] for i in mine) - rows * 16 * 4  # the stock shards' minus their weights
        assert sum(storage[i] for i in mine) == io + held, (kind, optimizer, rank)
        assert held > 0 or not mine


def test_stock_planner_sees_what_the_sharded_module_holds() -> None:
    """TorchRec's own planner and estimators, with our sharder: each shard's storage is what the
    sharded module holds on its rank (shared rows, scalars, both optimizer states) plus the
    stock input/output share, for table- and row-wise, SGD and (row-wise) Adagrad."""
    run_multiprocess(_storage_equals_allocation, 2)


def test_memcom_planner_plans_memcom_tables_on_cpu() -> None:
    module = MEmComEmbeddingBagCollection(TABLES, MEmComConfig(ratio=8, min_rows=1000), device=torch.device("meta"))
    sharder = MEmComEmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1}
    )
    plan = memcom_planner(Topology(world_size=2, local_world_size=2, compute_device="cpu"), 32).plan(module, [sharder])
    assert set(plan.plan[""]) == {"t0", "t1", "t2"}
    # column-wise would replicate the scalars on every column-shard holder: not offered by default
    offered = sharder.sharding_types("cpu")
    assert ShardingType.COLUMN_WISE.value not in offered and ShardingType.ROW_WISE.value in offered
    assert all(p.sharding_type in offered for p in plan.plan[""].values())
    # the user's own planner arguments pass through
    reservation = HeuristicalStorageReservation(percentage=0.05)
    constraints = {"t1": ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value])}
    planner = memcom_planner(
        Topology(world_size=2, local_world_size=2, compute_device="cpu"),
        32,
        storage_reservation=reservation,
        constraints=constraints,
    )
    assert planner._storage_reservation is reservation
    assert planner.plan(module, [sharder]).plan[""]["t1"].sharding_type == ShardingType.TABLE_WISE.value


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_reservation_holds_what_budgeted_collections_replicate(device: str) -> None:
    """Every rank keeps the id ranks and the projections of a budgeted collection whatever the
    plan: reserved on every device on top of TorchRec's own reservation, by the budget's count."""
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=1000, feature_names=[f"f{i}"])
        for i in range(2)
    ]
    allocation = Allocation(
        {t.name: TableAllocation((Tier(100, 16), Tier(300, 8), Tier(600, 4, hash_rows=37))) for t in tables}
    )
    frequencies = {
        "t0": torch.randperm(1000, generator=torch.Generator().manual_seed(0)) + 1,  # ranks != ids
        "t1": torch.arange(1000, 0, -1),
    }  # already in rank order: no remap kept
    module = BudgetedEmbeddingBagCollection(
        tables,
        budget_ratio=1.5,
        frequencies=frequencies,
        allocation=allocation,
        device=torch.device("meta"),
    )
    sharders = [BudgetedEmbeddingBagCollectionSharder()]
    cap = {"hbm_cap": 2**30} if device == "cuda" else {"ddr_cap": 2**30}
    topology = Topology(world_size=2, local_world_size=2, compute_device=device, **cap)
    stock = HeuristicalStorageReservation(percentage=0.15).reserve(topology, 32, module, sharders)
    ours = ReplicatedStateReservation(percentage=0.15).reserve(topology, 32, module, sharders)
    # what every rank holds whatever the plan, counted from the module's own tensors
    state = module.state_dict()
    assert "remap.t0" in state and "remap.t1" not in state
    remap = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith("remap."))
    projections = sum(p.numel() * p.element_size() for p in module.projections.parameters())
    expected = remap + 6 * projections  # projections: dense, 6x as TorchRec's
    for a, b in zip(stock.devices, ours.devices):
        held = a.storage - b.storage
        assert (held.hbm, held.ddr) == ((expected, 0) if device == "cuda" else (0, expected))
    planner = memcom_planner(topology, 32)
    assert isinstance(planner._storage_reservation, ReplicatedStateReservation)
    assert set(planner.plan(module, sharders).plan[""]) == {f"t{i}@tier{j}" for i in range(2) for j in range(3)}
