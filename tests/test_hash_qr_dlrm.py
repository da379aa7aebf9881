"""TorchRec's DLRM trains on hash and QR collections: its loss falls over a few steps,
unsharded and sharded by the planner in TorchRec's sparse-dist pipeline."""

from typing import Callable, Dict, List

import pytest
import torch
import torch.distributed as dist
from conftest import random_kjt
from dist_utils import run_multiprocess
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.keyed import KeyedOptimizerWrapper

from torchrec_memcom.distributed.hash_embeddingbag import HashEmbeddingBagCollectionSharder
from torchrec_memcom.distributed.qr_embeddingbag import QREmbeddingBagCollectionSharder
from torchrec_memcom.modules.hash_embedding_bag import HashConfig, HashEmbeddingBagCollection
from torchrec_memcom.modules.qr_embedding_bag import QRConfig, QREmbeddingBagCollection

DIM, BATCH, DENSE = 8, 64, 4
TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=n, feature_names=[f"f{i}"])
    for i, n in enumerate([5000, 800, 50])
]
BUILDERS: Dict[str, Callable[[List[EmbeddingBagConfig]], nn.Module]] = {
    "hash": lambda t: HashEmbeddingBagCollection(t, HashConfig(ratio=8, min_rows=100)),
    "qr_mult": lambda t: QREmbeddingBagCollection(t, QRConfig(ratio=8, min_rows=100)),
    "qr_add": lambda t: QREmbeddingBagCollection(t, QRConfig(num_collisions=8, operation="add", min_rows=100)),
}
SHARDERS = {"hash": HashEmbeddingBagCollectionSharder, "qr_mult": QREmbeddingBagCollectionSharder}


def _dlrm(ebc: nn.Module) -> DLRM:
    torch.manual_seed(0)
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=DENSE,
        dense_arch_layer_sizes=[16, DIM],
        over_arch_layer_sizes=[16, 1],
    )


def _batch(seed: int, size: int) -> Batch:
    """Zero dense features: the labels must be learnt from the sparse features."""
    g = torch.Generator().manual_seed(seed)
    return Batch(
        dense_features=torch.zeros(size, DENSE),
        sparse_features=random_kjt(TABLES, size, seed=seed, max_len=2),
        labels=torch.randint(0, 2, (size,), generator=g).float(),
    )


@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_dlrm_loss_falls(method: str) -> None:
    model = _dlrm(BUILDERS[method](TABLES))
    batch = _batch(seed=1, size=BATCH)
    dense, sparse, labels = batch.dense_features, batch.sparse_features, batch.labels
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    losses = []
    for _ in range(15):
        loss = nn.functional.binary_cross_entropy_with_logits(model(dense, sparse).squeeze(-1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def _train_sharded(rank: int, world_size: int) -> None:
    """Planner-sharded DLRM: fused row-wise Adagrad on the tables, SGD on the dense part."""
    for method, make_sharder in SHARDERS.items():
        sharders = [make_sharder(fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1})]
        sharders += get_default_sharders()
        model = DLRMTrain(_dlrm(BUILDERS[method](TABLES)))
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=world_size, compute_device="cpu"), batch_size=16
        )
        plan = planner.collective_plan(model, sharders, dist.group.WORLD)
        dmp = DistributedModelParallel(
            model,
            env=ShardingEnv.from_process_group(dist.group.WORLD),
            plan=plan,
            sharders=sharders,
            device=torch.device("cpu"),
        )
        optimizer = KeyedOptimizerWrapper(dict(dmp.named_parameters()), lambda p: torch.optim.SGD(p, lr=0.1))
        pipeline = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"), execute_all_batches=True)
        batch = _batch(seed=rank, size=16)
        losses = [float(pipeline.progress(iter([batch]))[0]) for _ in range(20)]
        assert losses[-1] < 0.5 * losses[0], (method, losses)


def test_sharded_dlrm_loss_falls_in_the_sparse_dist_pipeline() -> None:
    run_multiprocess(_train_sharded, 2)


def test_qr_sharder_offers_the_stock_ec_types_but_data_parallel_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """QR's lookups are the stock EC's, less data-parallel on CPU (FBGEMM's CPU dense kernel
    pools them); a narrowed stock list (one sharding type, as speed.py's pinned arms offer)
    stays narrowed rather than failing on the missing type."""
    qr = QREmbeddingBagCollectionSharder()
    dp = ShardingType.DATA_PARALLEL.value
    assert qr.sharding_types("cpu") == [t for t in EmbeddingCollectionSharder().sharding_types("cpu") if t != dp]
    assert qr.sharding_types("cuda") == EmbeddingCollectionSharder().sharding_types("cuda")
    monkeypatch.setattr(EmbeddingCollectionSharder, "sharding_types", lambda self, device: ["table_wise"])
    assert qr.sharding_types("cpu") == ["table_wise"]
