"""The planner sees what MEmCom tables really hold: shared rows plus per-entity scalars."""

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_memcom import MEmComConfig, MEmComEmbeddingBagCollection, MEmComEmbeddingBagCollectionSharder
from torchrec_memcom.distributed.planner import EntityWeightStorageEstimator, memcom_planner

TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n, feature_names=[f"f{i}"])
    for i, n in enumerate([20_000, 50_000, 300])
]


def _options(optimizer: EmbOptimType):
    """Every sharding option the enumerator makes, with stock storage, then with ours."""
    module = MEmComEmbeddingBagCollection(TABLES, MEmComConfig(ratio=8, min_rows=1000), device=torch.device("meta"))
    sharder = MEmComEmbeddingBagCollectionSharder(fused_params={"optimizer": optimizer, "learning_rate": 0.1})
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
