"""A DLRM with budgeted tables trains: unsharded (as the search's labeler trains it) and under
DMP with a plan from TorchRec's planner and the fused sparse optimizer, on 2 gloo ranks."""

from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist
from dist_utils import run_multiprocess
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_memcom.budget.labeler import TrainSettings, train_and_evaluate
from torchrec_memcom.distributed.budgeted_embeddingbag import (
    BudgetedEmbeddingBagCollectionSharder,
    ShardedBudgetedEmbeddingBagCollection,
)
from torchrec_memcom.methods.budgeted import budgeted_collection
from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection

SIZES = {"a": 2000, "b": 800, "c": 50}
DIM, DENSE = 16, 4


def toy_data(batches: int, batch_size: int, seed: int) -> Tuple[List[Batch], Dict[str, torch.Tensor]]:
    """Batches whose click probability is a logistic function of per-id effects (Zipf-popular
    ids, ids scattered over the id space) and the dense features; and the train id counts."""
    model = np.random.default_rng(0)
    effects = {f: model.normal(0, 1.2, n) for f, n in SIZES.items()}
    popularity = {f: model.permutation(n) for f, n in SIZES.items()}
    weights = model.normal(0, 0.5, DENSE)
    rng = np.random.default_rng(seed)
    counts = {f: np.zeros(n, dtype=np.int64) for f, n in SIZES.items()}
    out = []
    for _ in range(batches):
        ids = {}
        for f, n in SIZES.items():
            p = 1.0 / np.arange(1, n + 1) ** 1.1
            ids[f] = popularity[f][rng.choice(n, batch_size, p=p / p.sum())]
            np.add.at(counts[f], ids[f], 1)
        dense = rng.normal(0, 1, (batch_size, DENSE))
        logit = sum(effects[f][ids[f]] for f in SIZES) + dense @ weights - 0.5
        labels = rng.random(batch_size) < 1 / (1 + np.exp(-logit))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(SIZES),
            values=torch.from_numpy(np.concatenate([ids[f] for f in SIZES])),
            lengths=torch.ones(len(SIZES) * batch_size, dtype=torch.int64),
        )
        out.append(Batch(torch.from_numpy(dense).float(), kjt, torch.from_numpy(labels).float()))
    return out, {f: torch.from_numpy(c) for f, c in counts.items()}


def tables() -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=n, feature_names=[f])
        for f, n in SIZES.items()
    ]


def test_dlrm_with_budgeted_tables_trains() -> None:
    train, counts = toy_data(60, 256, seed=1)
    val, _ = toy_data(8, 512, seed=2)

    def build() -> BudgetedEmbeddingBagCollection:
        return budgeted_collection(tables(), budget_ratio=4, frequencies=counts, tail=True)

    module = build()
    assert any(len(t.tiers) > 1 for t in module.tables)
    result = train_and_evaluate(
        build, train, val, TrainSettings(steps=120, lr=0.1, dense_arch_layer_sizes=(16,), over_arch_layer_sizes=(16, 1))
    )
    assert result["train_loss"] < result["first_loss"] - 0.05, result
    assert result["auc"] > 0.7, result


def _dmp_trains(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, counts = toy_data(30, 128, seed=1)
    ebc = budgeted_collection(
        tables(),
        budget_ratio=4,
        frequencies=counts,
        tail=True,
        optimizer="rowwise_adagrad",
        device=torch.device("meta"),
    )
    model = DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=DENSE,
            dense_arch_layer_sizes=[16, DIM],
            over_arch_layer_sizes=[16, 1],
        )
    )
    sharder = BudgetedEmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8}
    )
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu"))
    plan = planner.collective_plan(model, [sharder], dist.group.WORLD)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        plan=plan,
        sharders=[sharder],
        device=torch.device("cpu"),
    )
    sharded = [m for m in dmp.modules() if isinstance(m, ShardedBudgetedEmbeddingBagCollection)]
    assert len(sharded) == 1 and sharded[0].cost()["total"]["bytes"] <= sharded[0].cost()["total"]["budget_bytes"]
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.Adagrad(p, lr=0.1)
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    losses = []
    for _epoch in range(2):
        for b in train:
            mine = Batch(
                b.dense_features[rank::world_size],
                _rows(b.sparse_features, rank, world_size),
                b.labels[rank::world_size],
            )
            loss, _ = dmp(mine)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first - 0.03, (first, last)
    # every rank ends with the same projections (DDP-averaged dense parameters)
    for name, p in sharded[0].projections.named_parameters():
        copies = [torch.empty_like(p) for _ in range(world_size)]
        dist.all_gather(copies, p.detach())
        torch.testing.assert_close(copies[0], copies[-1], msg=name)


def _rows(kjt: KeyedJaggedTensor, rank: int, world_size: int) -> KeyedJaggedTensor:
    """Examples ``rank, rank + world_size, ...`` of a one-id-per-feature KJT."""
    d = kjt.to_dict()
    values = [d[k].values()[rank::world_size] for k in kjt.keys()]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=torch.cat(values), lengths=torch.ones(sum(len(v) for v in values), dtype=torch.int64)
    )


def test_dlrm_with_budgeted_tables_trains_under_dmp_with_a_planned_sharding() -> None:
    run_multiprocess(_dmp_trains, 2)
