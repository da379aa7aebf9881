"""Sharded budgeted tables equal unsharded ones under every sharding type and sparse optimizer
(SGD, row-wise Adagrad, Adagrad): outputs, one optimizer step, state dict; and the bytes the
sharded module holds equal the budget's arithmetic; on 2 gloo ranks."""

from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
from conftest import batch_slice, random_kjt, small_tables
from dist_utils import run_multiprocess
from sharded_utils import Wrapper
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
from torchrec.distributed.sharding_plan import (
    ParameterShardingGenerator,
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType

from torchrec_memcom.distributed.budgeted_embeddingbag import BudgetedEmbeddingBagCollectionSharder
from torchrec_memcom.distributed.state import load_full_state_dict
from torchrec_memcom.modules.budget_config import Allocation, TableAllocation, Tier
from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection

BATCH, LR, EPS, DIM = 4, 0.1, 1e-8, 16
FUSED = "fused"
# The type under test shards every tier of t0 (one MEmCom tier among them); the rest table-wise.
PLANS = {
    "table_wise": lambda: table_wise(rank=1, compute_kernel=FUSED),
    "row_wise": lambda: row_wise(compute_kernel=FUSED),
    "column_wise": lambda: column_wise(ranks=[0, 1], compute_kernel=FUSED),
    "data_parallel": data_parallel,
    "table_row_wise": lambda: _as(table_row_wise(host_index=0)),
    "table_column_wise": lambda: _as(column_wise(ranks=[0, 1]), ShardingType.TABLE_COLUMN_WISE),
}


def _as(generator: ParameterShardingGenerator, sharding_type: Optional[ShardingType] = None) -> ParameterShardingGenerator:
    """A plan generator whose shards use the fused kernel (table_row_wise takes no kernel), as
    ``sharding_type`` if given: TorchRec has no table-column-wise generator, and a table-column-wise
    plan is column shards on the ranks of one host (here both ranks)."""

    def generate(*args, **kwargs):  # type: ignore[no-untyped-def]
        sharding = generator(*args, **kwargs)
        sharding.compute_kernel = FUSED
        if sharding_type is not None:
            sharding.sharding_type = sharding_type.value
        return sharding

    return generate
ALLOCATION = Allocation(
    {
        "t0": TableAllocation((Tier(100, 16), Tier(300, 8), Tier(600, 8, hash_rows=50))),
        "t1": TableAllocation((Tier(50, 16), Tier(350, 8))),
        "t2": TableAllocation((Tier(60, 16),)),
    }
)
OPTIMIZER_NAMES = {
    EmbOptimType.EXACT_SGD: "sgd",
    EmbOptimType.EXACT_ROWWISE_ADAGRAD: "rowwise_adagrad",
    EmbOptimType.EXACT_ADAGRAD: "adagrad",
}


def _frequencies() -> Dict[str, torch.Tensor]:
    """t0 and t2 in random order (t0 keeps a remap), t1 already frequency-ranked (no remap)."""
    g = torch.Generator().manual_seed(7)
    return {
        "t0": torch.randint(0, 1000, (1000,), generator=g),
        "t1": torch.arange(400, 0, -1),
        "t2": torch.randint(0, 50, (60,), generator=g),
    }


def _module(device: torch.device, optimizer: str = "sgd") -> BudgetedEmbeddingBagCollection:
    return BudgetedEmbeddingBagCollection(
        small_tables(DIM), budget_ratio=1.5, frequencies=_frequencies(), allocation=ALLOCATION,
        optimizer=optimizer, device=device,
    )


def _reference(seed: int) -> BudgetedEmbeddingBagCollection:
    torch.manual_seed(seed)
    ref = _module(torch.device("cpu"))
    with torch.no_grad():
        for w in ref.entity_weights.values():
            w.uniform_(0.5, 1.5)
        for p in ref.projections.values():  # off the identity, so projection gradients matter
            p.weight.add_(0.3 * torch.randn_like(p.weight))
    return ref


def _dmp(kind: str, optimizer: EmbOptimType, world_size: int, budget_optimizer: Optional[str] = None) -> DistributedModelParallel:
    """DMP over the module on meta, sharded by the plan ``kind``; the budget counts the fused
    optimizer's state unless ``budget_optimizer`` says otherwise."""
    sharder = BudgetedEmbeddingBagCollectionSharder(
        fused_params={"optimizer": optimizer, "learning_rate": LR, "eps": EPS}
    )
    meta = _module(torch.device("meta"), budget_optimizer or OPTIMIZER_NAMES[optimizer])
    specs = {name: table_wise(rank=i % world_size, compute_kernel=FUSED) for i, name in enumerate(meta.embedding_bags)}
    specs.update({name: PLANS[kind]() for name in meta.embedding_bags if name.startswith("t0@")})
    plan = construct_module_sharding_plan(
        meta, specs, sharder=sharder, local_size=world_size, world_size=world_size, device_type="cpu"
    )
    return DistributedModelParallel(
        Wrapper(meta),
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        plan=ShardingPlan({"ebc": plan}),
        sharders=[sharder],
        device=torch.device("cpu"),
    )


def _expected_step(ref: nn.Module, kind: str, optimizer: EmbOptimType, world_size: int) -> None:
    """One step on the unsharded module: mean-over-ranks gradients, the fused optimizer on
    model-parallel tiers and scalars, plain SGD on projections and data-parallel t0 tiers."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            g = p.grad / world_size
            t0 = "t0@" in name
            dense = name.startswith("projections.") or (kind == "data_parallel" and t0)
            if dense or optimizer == EmbOptimType.EXACT_SGD:
                p -= LR * g
            elif optimizer == EmbOptimType.EXACT_ADAGRAD:  # per element, however it is sharded
                p -= LR * g / ((g * g).sqrt() + EPS)
            elif p.dim() == 2:  # row-wise Adagrad of a tier table, per column shard
                shards = world_size if kind in ("column_wise", "table_column_wise") and t0 else 1
                for cols, grad in zip(p.chunk(shards, dim=1), g.chunk(shards, dim=1)):
                    state = (grad * grad).mean(dim=1, keepdim=True)
                    cols -= LR * grad / (state.sqrt() + EPS)
            else:  # Adagrad of a scalar
                p -= LR * g / ((g * g).sqrt() + EPS)


def _assert_matches(dmp: DistributedModelParallel, full: Dict[str, torch.Tensor], what: str) -> None:
    """Every local shard, every column-wise scalar replica and every replicated tensor equals
    the full tensor's part."""
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                index = tuple(
                    slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
                )
                torch.testing.assert_close(shard.tensor, full[key][index], msg=lambda m: f"{what}: {key}: {m}")
        else:
            torch.testing.assert_close(value, full[key], msg=f"{what}: {key}")
    weights = get_unwrapped_module(dmp).ebc.entity_weights
    rank = dist.get_rank()
    for name, local in weights.storage.items():
        layout = weights.layouts[name]
        for start, offset, length in layout.slot_pieces(layout.local_block(rank)):
            torch.testing.assert_close(
                local.detach()[offset : offset + length],
                full[f"ebc.entity_weights.{name}"][start : start + length],
                msg=f"{what}: storage of {name} on rank {rank}",
            )


def _sharded_equals_unsharded(rank: int, world_size: int, optimizer: EmbOptimType, kinds: List[str]) -> None:
    torch.set_num_threads(1)
    tables = small_tables(DIM)
    for kind in kinds:
        dmp = _dmp(kind, optimizer, world_size)
        ref = _reference(seed=0)
        full = {f"ebc.{k}": v for k, v in ref.state_dict().items()}
        assert any(k.startswith("ebc.remap.") for k in full) and "ebc.remap.t1" not in full
        load_full_state_dict(dmp, full)
        _assert_matches(dmp, full, f"{kind} after load")

        kjt = random_kjt(tables, BATCH * world_size, seed=1)
        out = dmp(batch_slice(kjt, rank * BATCH, (rank + 1) * BATCH))
        ref_out = ref(kjt).to_dict()
        g = torch.Generator().manual_seed(2)
        loss, ref_loss = 0.0, 0.0
        for f in sorted(ref_out):
            weight = torch.randn(ref_out[f].shape, generator=g)
            mine = slice(rank * BATCH, (rank + 1) * BATCH)
            torch.testing.assert_close(out[f], ref_out[f][mine], msg=f"{kind}: output {f}")
            loss = loss + (out[f] * weight[mine]).sum()
            ref_loss = ref_loss + (ref_out[f] * weight).sum()
        loss.backward()
        ref_loss.backward()
        with torch.no_grad():  # the dense optimizer: plain SGD on what DDP averaged
            for p in dmp.parameters():
                if p.grad is not None:
                    p -= LR * p.grad
        _expected_step(ref, kind, optimizer, world_size)
        stepped = {f"ebc.{k}": v for k, v in ref.state_dict().items()}
        _assert_matches(dmp, stepped, f"{kind} after one step")

        other = _dmp(kind, optimizer, world_size)
        other.load_state_dict(dmp.state_dict())
        _assert_matches(other, stepped, f"{kind} state dict round trip")
        probe = random_kjt(tables, BATCH * world_size, seed=3)
        mine_probe = batch_slice(probe, rank * BATCH, (rank + 1) * BATCH)
        for f, v in other(mine_probe).items():
            torch.testing.assert_close(v, dmp(mine_probe)[f], msg=f"{kind}: reloaded output {f}")


@pytest.mark.parametrize("optimizer", list(OPTIMIZER_NAMES))
def test_sharded_equals_unsharded(optimizer: EmbOptimType) -> None:
    run_multiprocess(_sharded_equals_unsharded, 2, optimizer, list(PLANS))


def _local_bytes(value: object) -> int:
    if isinstance(value, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
    assert isinstance(value, torch.Tensor)
    return value.numel() * value.element_size()


def _bytes_held(rank: int, world_size: int, optimizers: List[EmbOptimType]) -> None:
    """Across ranks, the sharded module's state and the fused optimizer's state hold exactly the
    bytes the budget counts (table-wise and row-wise plans: nothing replicated but the small
    projections and rank buffers, counted once); a budget counting another optimizer's state
    than the fused one is refused."""
    torch.set_num_threads(1)
    for optimizer in optimizers:
        for kind in ("table_wise", "row_wise"):
            dmp = _dmp(kind, optimizer, world_size)
            module = _module(torch.device("meta"), OPTIMIZER_NAMES[optimizer])
            state = 0
            for key, value in dmp.state_dict().items():
                replicated = not isinstance(value, ShardedTensor)
                state += 0 if replicated and rank else _local_bytes(value)
            optimizer_state = sum(
                _local_bytes(v)
                for per_param in dmp.fused_optimizer.state_dict()["state"].values()
                for v in per_param.values()
                if isinstance(v, (ShardedTensor, torch.Tensor))
            )
            totals = torch.tensor([state, optimizer_state])
            dist.all_reduce(totals)
            what = f"{optimizer.name}, {kind}"
            assert int(totals[0]) == module.parameter_bytes(), what
            assert int(totals[1]) == module.optimizer_bytes(), what
            assert module.parameter_bytes() + module.optimizer_bytes() <= module.budget_limit, what
    # a budget that counts other state than the fused optimizer keeps is refused at sharding
    with pytest.raises(ValueError, match="budget counts adagrad state .* train with rowwise_adagrad"):
        _dmp("table_wise", EmbOptimType.EXACT_ROWWISE_ADAGRAD, world_size, budget_optimizer="adagrad")


def test_sharded_bytes_equal_the_budget_arithmetic() -> None:
    run_multiprocess(_bytes_held, 2, list(OPTIMIZER_NAMES))
