"""The optimizer setups of TorchRec's own examples train our tables as an unsharded reference
doing the same updates, with no knowledge of our internals: on 2 gloo ranks, a few steps.

- golden training: ``apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters())``,
  the rest by a dense Adagrad over ``in_backward_optimizer_filter(model.named_parameters())``;
- the DLRM example: the same with ``torch.optim.Adagrad`` (lr, eps) in backward, planned by the
  stock ``EmbeddingShardingPlanner`` with its ``HeuristicalStorageReservation(0.05)``.

The reference: tables and per-entity scalars by the sparse rule, budgeted tables' projections
(dense parameters) and the dense arch by the dense optimizer; TorchRec's mean-over-ranks gradients.
"""

import copy
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
from conftest import batch_slice, random_kjt
from dist_utils import run_multiprocess
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_memcom import CompressionSpec, compress
from torchrec_memcom.distributed.budgeted_embeddingbag import BudgetedEmbeddingBagCollectionSharder
from torchrec_memcom.modules.budget_allocation import Allocation, TableAllocation, Tier
from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection

LR, EPS, STEPS, BATCH, DIM = 0.1, 1e-8, 3, 8, 8
TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=DIM, num_embeddings=1000, feature_names=["f0"]),
    EmbeddingBagConfig(name="t1", embedding_dim=DIM, num_embeddings=60, feature_names=["f1"]),
]
PATTERNS = {  # in-backward (sparse) optimizer and its kwargs; the dense one is Adagrad
    "golden": (RowWiseAdagrad, {"lr": LR}),
    "dlrm_example": (torch.optim.Adagrad, {"lr": LR, "eps": EPS}),
}


class Loss(nn.Module):
    """DLRM and a BCE loss (the mean over the batch), as DLRMTrain."""

    def __init__(self, model: DLRM) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense, sparse, labels):  # type: ignore[no-untyped-def]
        logits = self.model(dense, sparse).squeeze(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def _model(method: str, before_compress: Optional[Tuple[type, Dict[str, Any]]] = None) -> Tuple[Loss, List[Any]]:
    """The model (values on the CPU) and the sharders DMP needs for it; ``before_compress``: an
    in-backward optimizer the user attached to the stock tables before compress()."""
    torch.manual_seed(0)
    sharders = get_default_sharders()
    if method == "budgeted":
        allocation = Allocation(
            {
                "t0": TableAllocation((Tier(100, DIM), Tier(300, 4), Tier(600, 4, hash_rows=37))),
                "t1": TableAllocation((Tier(60, DIM),)),
            }
        )
        frequencies = {
            "t0": torch.randperm(1000, generator=torch.Generator().manual_seed(0)) + 1,
            "t1": torch.arange(60, 0, -1),
        }
        ebc: nn.Module = BudgetedEmbeddingBagCollection(
            TABLES, budget_ratio=1.2, frequencies=frequencies, allocation=allocation
        )
        sharders = [BudgetedEmbeddingBagCollectionSharder(), *sharders]
    else:
        ebc = EmbeddingBagCollection(TABLES)
    model = Loss(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=3,
            dense_arch_layer_sizes=[DIM],
            over_arch_layer_sizes=[4, 1],
        )
    )
    if before_compress is not None:
        apply_optimizer_in_backward(before_compress[0], model.model.sparse_arch.parameters(), before_compress[1])
    if method == "memcom":
        model, sharders = compress(model, CompressionSpec(method="memcom", params={"ratio": 4}, min_rows=100))
    with torch.no_grad():  # scalars away from their init, so that their gradients differ
        for name, p in model.named_parameters():
            if "entity_weights" in name:
                p.uniform_(0.5, 1.5)
    return model, sharders


def _batches() -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "dense": torch.randn(BATCH, 3, generator=g),
            "sparse": random_kjt(TABLES, BATCH, seed=10 + i),
            "labels": torch.randint(0, 2, (BATCH,), generator=g).float(),
        }
        for i in range(STEPS)
    ]


def _reference_step(ref: Loss, dense_opt: torch.optim.Optimizer, batch: Dict[str, Any]) -> None:
    ref(batch["dense"], batch["sparse"], batch["labels"]).backward()  # in-backward updates fire
    dense_opt.step()
    dense_opt.zero_grad()


def _train_both(rank: int, world_size: int, method: str, pattern: str, before_compress: bool = False) -> None:
    sparse_class, sparse_kwargs = PATTERNS[pattern]
    if before_compress:  # attached to the stock tables; compress() carries it over
        model, sharders = _model(method, PATTERNS[pattern])
        ref = _model(method)[0]
    else:
        model, sharders = _model(method)
        ref = copy.deepcopy(model)
        # the pattern, as the examples write it
        apply_optimizer_in_backward(sparse_class, model.model.sparse_arch.parameters(), sparse_kwargs)
    # the reference: the same sparse rule (FBGEMM's eps) on tables and scalars; projections dense
    sparse = [p for n, p in ref.model.sparse_arch.named_parameters() if "projections" not in n]
    apply_optimizer_in_backward(sparse_class, sparse, {**sparse_kwargs, "eps": EPS})
    ref_dense = torch.optim.Adagrad(
        [p for _, p in in_backward_optimizer_filter(ref.named_parameters())], lr=LR, eps=EPS
    )

    topology = Topology(world_size=world_size, local_world_size=world_size, compute_device="cpu")
    collection = model.model.sparse_arch.embedding_bag_collection
    names = next(s for s in sharders if s.module_type is type(collection)).shardable_parameters(collection)
    constraints = {  # model-parallel, as TorchRec's golden training gets on GPUs
        n: ParameterConstraints(
            sharding_types=["row_wise" if n.startswith("t0") else "table_wise"], compute_kernels=["fused"]
        )
        for n in names
    }
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=BATCH // world_size,
        constraints=constraints,
        storage_reservation=HeuristicalStorageReservation(percentage=0.05),
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=torch.device("cpu"),
        plan=plan,
        sharders=sharders,
    )
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adagrad(params, lr=LR, eps=EPS),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_optimizer])
    if method == "budgeted":  # the projections are dense: trained by the dense optimizer
        assert any("projections" in k for k in dense_optimizer.params)
    local = BATCH // world_size
    for batch in _batches():
        mine = slice(rank * local, (rank + 1) * local)
        loss = dmp(batch["dense"][mine], batch_slice(batch["sparse"], mine.start, mine.stop), batch["labels"][mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _reference_step(ref, ref_dense, batch)
    _assert_state_matches(dmp, ref.state_dict(), f"{method}/{pattern}")


def _assert_state_matches(dmp: nn.Module, full: Dict[str, torch.Tensor], what: str) -> None:
    checked = 0
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                torch.testing.assert_close(shard.tensor, full[key][index], msg=lambda m: f"{what}: {key}: {m}")  # noqa: B023  (assert_close calls msg at once)
                checked += 1
        elif value.is_floating_point():
            torch.testing.assert_close(value, full[key], msg=lambda m: f"{what}: {key}: {m}")  # noqa: B023  (assert_close calls msg at once)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("method", ["memcom", "budgeted"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_examples_optimizer_setup_trains_as_the_reference(method: str, pattern: str) -> None:
    run_multiprocess(_train_both, 2, method, pattern)


def test_optimizer_attached_before_compress_is_carried_over() -> None:
    """The DLRM example's optimizer attached before compress(): the new tables and their scalars
    train with it (not with TorchRec's default fused SGD at lr 0.01)."""
    run_multiprocess(_train_both, 2, "memcom", "dlrm_example", True)
