"""Sharded hash and QR collections equal unsharded ones: outputs, one optimizer step, state dict.

Two gloo ranks; every sharding type each sharder offers on CPU (QR: all but data-parallel),
with SGD and row-wise Adagrad.
"""

import copy
import dataclasses
from typing import Callable, Dict, List

import pytest
import torch
import torch.distributed as dist
from conftest import batch_slice, random_kjt, small_tables
from dist_utils import run_multiprocess
from sharded_utils import Wrapper, assert_state_matches
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import (
    ParameterShardingGenerator,
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from torchrec_memcom.distributed.hash_embeddingbag import HashEmbeddingBagCollectionSharder
from torchrec_memcom.distributed.qr_embeddingbag import QREmbeddingBagCollectionSharder
from torchrec_memcom.modules.hash_embedding_bag import HashConfig, HashEmbeddingBagCollection
from torchrec_memcom.modules.qr_embedding_bag import QRConfig, QREmbeddingBagCollection

BATCH, LR, EPS = 4, 0.1, 1e-8
FUSED = "fused"
KINDS: Dict[str, Callable[[], ParameterShardingGenerator]] = {
    "table_wise": lambda: table_wise(rank=1, compute_kernel=FUSED),
    "row_wise": lambda: row_wise(compute_kernel=FUSED),
    "column_wise": lambda: column_wise(ranks=[0, 1], compute_kernel=FUSED),
    "data_parallel": data_parallel,
}


def _tables() -> List[EmbeddingBagConfig]:
    """The shared small tables, one of them MEAN-pooled."""
    t0, t1, t2 = small_tables()
    return [t0, dataclasses.replace(t1, pooling=PoolingType.MEAN), t2]


@dataclasses.dataclass(frozen=True)
class Case:
    """A method under test: its module, its sharder, and the lookup tables of t0, t1 and t2."""

    build: Callable[[torch.device], nn.Module]
    sharder: Callable[..., ModuleSharder]
    t0: List[str]  # sharded with the type under test
    t1: List[str]
    t2: List[str]
    kinds: List[str]  # the sharding types that work on CPU

    @property
    def lookup_tables(self) -> List[str]:
        return self.t0 + self.t1 + self.t2


METHODS: Dict[str, Case] = {
    "hash": Case(
        lambda device: HashEmbeddingBagCollection(
            _tables(), {"t0": HashConfig(ratio=4), "t1": HashConfig(num_hash_rows=50, hash="mix")}, device=device
        ),
        HashEmbeddingBagCollectionSharder,
        ["t0"],
        ["t1"],
        ["t2"],
        list(KINDS),
    ),
    "qr": Case(
        lambda device: QREmbeddingBagCollection(
            _tables(), {"t0": QRConfig(num_collisions=8), "t1": QRConfig(ratio=5, operation="add")}, device=device
        ),
        QREmbeddingBagCollectionSharder,
        ["t0@q", "t0@r"],
        ["t1@q", "t1@r"],
        ["t2"],
        ["table_wise", "row_wise", "column_wise"],
    ),
}


def _plan(method: str, kind: str) -> Dict[str, ParameterShardingGenerator]:
    """The type under test on t0's lookup tables; t1's and t2's table-wise on both ranks."""
    case = METHODS[method]
    plan = {name: KINDS[kind]() for name in case.t0}
    plan.update({name: table_wise(rank=i % 2, compute_kernel=FUSED) for i, name in enumerate(case.t1)})
    plan.update({name: table_wise(rank=1, compute_kernel=FUSED) for name in case.t2})
    return plan


def _dmp(method: str, kind: str, optimizer: EmbOptimType, module: nn.Module) -> DistributedModelParallel:
    sharder = METHODS[method].sharder(fused_params={"optimizer": optimizer, "learning_rate": LR, "eps": EPS})
    world_size = dist.get_world_size()
    plan = construct_module_sharding_plan(
        module, _plan(method, kind), sharder=sharder, local_size=world_size, world_size=world_size, device_type="cpu"
    )
    return DistributedModelParallel(
        Wrapper(module),
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        plan=ShardingPlan({"ebc": plan}),
        sharders=[sharder],
        device=torch.device("cpu"),
    )


def _reference(method: str) -> nn.Module:
    torch.manual_seed(0)
    return METHODS[method].build(torch.device("cpu"))


def _expected_step(ref: nn.Module, method: str, kind: str, optimizer: EmbOptimType) -> None:
    """One step on the unsharded module: mean-over-ranks gradients (TorchRec's convention, DDP's
    for data-parallel tables), the fused optimizer on model-parallel tables, SGD on DP ones."""
    world_size = dist.get_world_size()
    tested = METHODS[method].t0
    with torch.no_grad():
        for name, p in ref.named_parameters():
            table = name.split(".")[1]
            g = p.grad / world_size
            if optimizer == EmbOptimType.EXACT_SGD or (kind == "data_parallel" and table in tested):
                p -= LR * g
                continue
            shards = world_size if kind == "column_wise" and table in tested else 1
            for cols, grad in zip(p.chunk(shards, dim=1), g.chunk(shards, dim=1)):
                state = (grad * grad).mean(dim=1, keepdim=True)
                cols -= LR * grad / (state.sqrt() + EPS)


def _prefixed(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {f"ebc.{k}": v for k, v in module.state_dict().items()}


def _sharded_equals_unsharded(rank: int, world_size: int, method: str, optimizers: List[EmbOptimType]) -> None:
    tables = _tables()
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    for optimizer in optimizers:
        for kind in METHODS[method].kinds:
            what = f"{method} {kind} {optimizer.name}"
            ref = _reference(method)
            # Sharding a module with values keeps them.
            dmp = _dmp(method, kind, optimizer, copy.deepcopy(ref))
            assert_state_matches(dmp, _prefixed(ref), f"{what} after sharding")
            assert dmp.module.ebc.cost() == ref.cost()

            kjt = random_kjt(tables, BATCH * world_size, seed=1)
            out = dmp(batch_slice(kjt, rank * BATCH, (rank + 1) * BATCH))
            ref_out = ref(kjt).to_dict()
            assert sorted(out) == sorted(ref_out)
            g = torch.Generator().manual_seed(2)
            loss, ref_loss = 0.0, 0.0
            for f in ref_out:
                weight = torch.randn(ref_out[f].shape, generator=g)
                torch.testing.assert_close(out[f], ref_out[f][mine], msg=f"{what}: output {f}")
                loss = loss + (out[f] * weight[mine]).sum()
                ref_loss = ref_loss + (ref_out[f] * weight).sum()
            loss.backward()
            ref_loss.backward()
            with torch.no_grad():  # the dense optimizer: plain SGD on what DDP averaged
                for p in dmp.parameters():
                    if p.grad is not None:
                        p -= LR * p.grad
            _expected_step(ref, method, kind, optimizer)
            stepped = _prefixed(ref)
            assert_state_matches(dmp, stepped, f"{what} after one step")

            # Save and load through DMP's own state dict into a model sharded from meta.
            other = _dmp(method, kind, optimizer, METHODS[method].build(torch.device("meta")))
            other.load_state_dict(dmp.state_dict())
            assert_state_matches(other, stepped, f"{what} state dict round trip")
            probe = batch_slice(random_kjt(tables, BATCH * world_size, seed=3), rank * BATCH, (rank + 1) * BATCH)
            for f, v in other(probe).items():
                torch.testing.assert_close(v, dmp(probe)[f], msg=f"{what}: reloaded output {f}")
    if method == "qr":  # FBGEMM's CPU dense kernel pools per-id lookups: refused, not wrong
        with pytest.raises(ValueError, match=r"\['t0@q', 't0@r'\]: on CPU they need the fused"):
            _dmp(method, "data_parallel", optimizers[0], METHODS[method].build(torch.device("meta")))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sharded_equals_unsharded(method: str) -> None:
    run_multiprocess(
        _sharded_equals_unsharded, 2, method, [EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ROWWISE_ADAGRAD]
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_planner_plans_every_lookup_table(method: str) -> None:
    """TorchRec's planner takes the sharders as they are, and keeps to what works on CPU."""
    case = METHODS[method]
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"), batch_size=BATCH)
    plan = planner.plan(Wrapper(case.build(torch.device("meta"))), [case.sharder()])
    assert set(plan.plan["ebc"]) == set(case.lookup_tables)
    for sharding in plan.plan["ebc"].values():
        assert sharding.sharding_type in case.kinds
        assert sharding.compute_kernel == FUSED or sharding.sharding_type == "data_parallel"
