"""A DMP or planner not given our sharders says so and names the fix, on 2 gloo ranks."""

import warnings

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_multiprocess
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_memcom import CompressionSpec, MEmComConfig, compress

FIX = r"give the sharders compress\(\) returns to the planner and to DistributedModelParallel"


def _model() -> torch.nn.Module:
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
        for i, n in enumerate([1000, 50])
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    return DLRM(
        embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8], over_arch_layer_sizes=[8, 1]
    )


def _body(rank: int, world_size: int) -> None:
    model, sharders = compress(_model(), CompressionSpec(params=MEmComConfig(ratio=4), min_rows=100))
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu"))
    pg = dist.GroupMember.WORLD

    # planned with our sharders, DMP without them: TorchRec's KeyError names the fix
    plan = planner.collective_plan(model, sharders, pg)
    assert "sparse_arch.embedding_bag_collection" in plan.plan
    with pytest.raises(KeyError, match=FIX):
        DistributedModelParallel(model, device=torch.device("cpu"), plan=plan)

    # planned without them: DMP keeps the collection whole on every rank; its first training
    # forward warns, naming the fix (replicated training is correct, only not sharded)
    plan = planner.collective_plan(model, get_default_sharders(), pg)
    assert "sparse_arch.embedding_bag_collection" not in plan.plan
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1])
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dmp(torch.randn(2, 4), kjt).sum().backward()
        dmp(torch.randn(2, 4), kjt)  # once per collection
    replicated = [w for w in caught if "trains unsharded on 2 ranks" in str(w.message)]
    assert len(replicated) == 1 and "['t0', 't1']" in str(replicated[0].message)


def test_missing_sharders_name_the_fix() -> None:
    run_multiprocess(_body, 2)
