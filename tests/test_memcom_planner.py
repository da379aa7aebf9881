"""The planner sees what MEmCom tables really hold: shared rows plus per-entity scalars."""

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from torchrec_memcom import MEmComConfig, MEmComEmbeddingBagCollection, MEmComEmbeddingBagCollectionSharder
from torchrec_memcom.distributed.budgeted_embeddingbag import BudgetedEmbeddingBagCollectionSharder
from torchrec_memcom.modules.budget_config import Allocation, TableAllocation, Tier
from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection
from torchrec_memcom.distributed.planner import (
    EntityWeightStorageEstimator,
    ReplicatedStateReservation,
    memcom_planner,
)

TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n, feature_names=[f"f{i}"])
    for i, n in enumerate([20_000, 50_000, 300])
]


def _options(optimizer: EmbOptimType):
    """Every sharding option the enumerator makes, with stock storage, then with ours."""
    module = MEmComEmbeddingBagCollection(TABLES, MEmComConfig(ratio=8, min_rows=1000), device=torch.device("meta"))
    sharder = MEmComEmbeddingBagCollectionSharder(
        fused_params={"optimizer": optimizer, "learning_rate": 0.1}, column_wise=True
    )
    topology = Topology(world_size=2, local_world_size=2, compute_device="cpu")
    enumerator = EmbeddingEnumerator(topology, batch_size=32, estimator=[EmbeddingStorageEstimator(topology)])
    options = enumerator.enumerate(module, [sharder])
    stock = {id(o): [s.storage.ddr for s in o.shards] for o in options}
    # the enumerator's snapshot of the sharder's fused params, as the planner passes it
    EntityWeightStorageEstimator(topology).estimate(options, enumerator._sharder_data_map)
    return module, options, stock


@pytest.mark.parametrize("optimizer, copies", [(EmbOptimType.EXACT_SGD, 1), (EmbOptimType.EXACT_ROWWISE_ADAGRAD, 2)])
def test_storage_counts_the_scalars_of_each_shard(optimizer: EmbOptimType, copies: int) -> None:
    module, options, stock = _options(optimizer)
    tables = {t.name: t for t in module.tables}
    seen = set()
    for option in options:
        table = tables[option.name]
        for shard, before in zip(option.shards, stock[id(option)]):
            added = shard.storage.ddr - before
            if not table.compressed:
                assert added == 0
                continue
            if option.sharding_type in (ShardingType.COLUMN_WISE.value, ShardingType.DATA_PARALLEL.value):
                scalars = table.num_embeddings  # a full replica on the shard's rank
            else:
                scalars = table.num_slot_blocks * shard.size[0]
            assert added == scalars * 4 * copies, (option.name, option.sharding_type)
            seen.add(option.sharding_type)
    assert {ShardingType.ROW_WISE.value, ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value} <= seen
    # the row shards of a table cover all its scalars once (K * m >= n, with < m padding)
    for option in options:
        t = tables[option.name]
        if t.compressed and option.sharding_type == ShardingType.ROW_WISE.value:
            rows = sum(s.size[0] for s in option.shards)
            assert rows == t.hash_rows and 0 <= t.num_slot_blocks * rows - t.num_embeddings < rows


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


@pytest.mark.parametrize("optimizer, copies", [(torch.optim.SGD, 1), (RowWiseAdagrad, 2), (torch.optim.Adagrad, 2)])
def test_storage_reads_the_optimizer_applied_in_backward(optimizer: type, copies: int) -> None:
    """With no fused params on the sharder (the training app's case), the optimizer that
    apply_optimizer_in_backward attached to each weight decides whether Adagrad state counts."""
    module = MEmComEmbeddingBagCollection(TABLES, MEmComConfig(ratio=8, min_rows=1000), device=torch.device("meta"))
    apply_optimizer_in_backward(optimizer, list(module.embedding_bags.parameters()), {"lr": 0.1})
    sharder = MEmComEmbeddingBagCollectionSharder()
    topology = Topology(world_size=2, local_world_size=2, compute_device="cpu")
    enumerator = EmbeddingEnumerator(topology, batch_size=32, estimator=[EmbeddingStorageEstimator(topology)])
    options = [o for o in enumerator.enumerate(module, [sharder]) if o.sharding_type == ShardingType.TABLE_WISE.value]
    stock = [o.shards[0].storage.ddr for o in options]
    EntityWeightStorageEstimator(topology).estimate(options, enumerator._sharder_data_map)
    for option, before in zip(options, stock):
        table = next(t for t in module.tables if t.name == option.name)
        scalars = table.num_embeddings if table.compressed else 0
        assert option.shards[0].storage.ddr - before == scalars * 4 * copies


def test_storage_counts_the_scalars_of_budgeted_memcom_tails() -> None:
    """A budgeted table's MEmCom tail tier holds per-id scalars the stock estimator cannot see."""
    tables = [EmbeddingBagConfig(name="t0", embedding_dim=16, num_embeddings=1000, feature_names=["f0"])]
    allocation = Allocation({"t0": TableAllocation((Tier(100, 16), Tier(300, 8), Tier(600, 4, hash_rows=37)))})
    module = BudgetedEmbeddingBagCollection(
        tables, budget_ratio=1.5, frequencies={"t0": torch.arange(1000, 0, -1)}, allocation=allocation,
        device=torch.device("meta"),
    )
    sharder = BudgetedEmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1}
    )
    topology = Topology(world_size=2, local_world_size=2, compute_device="cpu")
    enumerator = EmbeddingEnumerator(topology, batch_size=32, estimator=[EmbeddingStorageEstimator(topology)])
    options = [o for o in enumerator.enumerate(module, [sharder]) if o.sharding_type == ShardingType.TABLE_WISE.value]
    stock = {o.name: o.shards[0].storage.ddr for o in options}
    EntityWeightStorageEstimator(topology).estimate(options, enumerator._sharder_data_map)
    added = {o.name: o.shards[0].storage.ddr - stock[o.name] for o in options}
    # the tail's 600 ids in ceil(600 / 37) = 17 slot blocks of 37 rows: scalars + Adagrad state
    assert added == {"t0@tier0": 0, "t0@tier1": 0, "t0@tier2": 17 * 37 * 4 * 2}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_reservation_holds_what_budgeted_collections_replicate(device: str) -> None:
    """Every rank keeps the id ranks and the projections of a budgeted collection whatever the
    plan: reserved on every device on top of TorchRec's own reservation, by the budget's count."""
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=1000, feature_names=[f"f{i}"])
        for i in range(2)
    ]
    allocation = Allocation({
        t.name: TableAllocation((Tier(100, 16), Tier(300, 8), Tier(600, 4, hash_rows=37))) for t in tables
    })
    frequencies = {"t0": torch.randperm(1000, generator=torch.Generator().manual_seed(0)) + 1,  # ranks != ids
                   "t1": torch.arange(1000, 0, -1)}  # already in rank order: no remap kept
    module = BudgetedEmbeddingBagCollection(
        tables, budget_ratio=1.5, frequencies=frequencies, allocation=allocation, device=torch.device("meta"),
    )
    sharders = [BudgetedEmbeddingBagCollectionSharder()]
    cap = {"hbm_cap": 2**30} if device == "cuda" else {"ddr_cap": 2**30}
    topology = Topology(world_size=2, local_world_size=2, compute_device=device, **cap)
    stock = HeuristicalStorageReservation(percentage=0.15).reserve(topology, 32, module, sharders)
    ours = ReplicatedStateReservation(percentage=0.15).reserve(topology, 32, module, sharders)
    bytes_ = {t.name: t.bytes for t in module.tables}
    assert bytes_["t0"].remap == 1000 * 4 and bytes_["t1"].remap == 0
    expected = sum(b.remap + 6 * b.projections for b in bytes_.values())  # projections: dense, 6x as TorchRec's
    assert sum(b.projections for b in bytes_.values()) == 2 * (16 * 8 + 16 * 4) * 4
    for a, b in zip(stock.devices, ours.devices):
        held = a.storage - b.storage
        assert (held.hbm, held.ddr) == ((expected, 0) if device == "cuda" else (0, expected))
    planner = memcom_planner(topology, 32)
    assert isinstance(planner._storage_reservation, ReplicatedStateReservation)
    assert set(planner.plan(module, sharders).plan[""]) == {f"t{i}@tier{j}" for i in range(2) for j in range(3)}
