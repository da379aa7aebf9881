"""Sharded MEmCom equals unsharded: outputs, one optimizer step, state dict, on 2 gloo ranks."""

from typing import Dict, List

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
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from torchrec_memcom import (
    MEmComConfig,
    MEmComEmbeddingBagCollection,
    MEmComEmbeddingBagCollectionSharder,
)
from torchrec_memcom.distributed.entity_weights import table_layout
from torchrec_memcom.distributed.state import load_full_state_dict
from torchrec_memcom.distributed.stock_views import kjt_with

BATCH, LR, EPS = 4, 0.1, 1e-8
# Each plan mixes the type under test (on the big compressed table t0) with table-wise tables.
FUSED = "fused"
PLANS = {
    "table_wise": lambda: table_wise(rank=1, compute_kernel=FUSED),
    "row_wise": lambda: row_wise(compute_kernel=FUSED),
    "column_wise": lambda: column_wise(ranks=[0, 1], compute_kernel=FUSED),
    "data_parallel": data_parallel,
    "table_row_wise": lambda: _fused(table_row_wise(host_index=0)),
}


def _fused(generator):  # type: ignore[no-untyped-def]
    """A plan generator whose shards use the fused kernel (table_row_wise takes no kernel)."""

    def fused(*args, **kwargs):  # type: ignore[no-untyped-def]
        sharding = generator(*args, **kwargs)
        sharding.compute_kernel = FUSED
        return sharding

    return fused
# t0: 128 rows do not divide its 1000 ids, so its last slot block is partial (104 of 128).
COMPRESSION = {"t0": MEmComConfig(num_hash_rows=128), "t1": MEmComConfig(num_hash_rows=50, hash="mix")}


def _reference(seed: int) -> MEmComEmbeddingBagCollection:
    torch.manual_seed(seed)
    ref = MEmComEmbeddingBagCollection(small_tables(), COMPRESSION)
    with torch.no_grad():
        for w in ref.entity_weights.values():
            w.uniform_(0.5, 1.5)
    return ref


def _dmp(kind: str, optimizer: EmbOptimType, world_size: int) -> DistributedModelParallel:
    sharder = MEmComEmbeddingBagCollectionSharder(
        fused_params={"optimizer": optimizer, "learning_rate": LR, "eps": EPS}
    )
    meta = MEmComEmbeddingBagCollection(small_tables(), COMPRESSION, device=torch.device("meta"))
    plan = construct_module_sharding_plan(
        meta,
        {
            "t0": PLANS[kind](),
            "t1": table_wise(rank=0, compute_kernel=FUSED),
            "t2": table_wise(rank=1, compute_kernel=FUSED),
        },
        sharder=sharder,
        local_size=world_size,
        world_size=world_size,
        device_type="cpu",
    )
    return DistributedModelParallel(
        Wrapper(meta),
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        plan=ShardingPlan({"ebc": plan}),
        sharders=[sharder],
        device=torch.device("cpu"),
    )


def _expected_step(ref: nn.Module, kind: str, optimizer: EmbOptimType, world_size: int) -> None:
    """What one step does to the unsharded module: mean-over-ranks gradients (TorchRec's
    convention), the fused optimizer on model-parallel tables, the dense one (SGD here) on DP."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            g = p.grad / world_size
            dense = kind == "data_parallel" and (name.endswith(".t0") or name.endswith("t0.weight"))
            if dense or optimizer == EmbOptimType.EXACT_SGD:
                p -= LR * g
            elif p.dim() == 2:  # row-wise Adagrad of a shared table, per column shard
                shards = world_size if kind == "column_wise" and name.endswith("t0.weight") else 1
                for cols, grad in zip(p.chunk(shards, dim=1), g.chunk(shards, dim=1)):
                    state = (grad * grad).mean(dim=1, keepdim=True)
                    cols -= LR * grad / (state.sqrt() + EPS)
            else:  # Adagrad of a scalar
                p -= LR * g / ((g * g).sqrt() + EPS)


def _assert_matches(dmp: DistributedModelParallel, full: Dict[str, torch.Tensor], what: str) -> None:
    """Every local shard, and every column-wise replica, equals the full tensor's slice."""
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                index = tuple(
                    slice(o, o + s)
                    for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
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
    tables = small_tables()
    for kind in kinds:
        dmp = _dmp(kind, optimizer, world_size)
        ref = _reference(seed=0)
        full = {f"ebc.{k}": v for k, v in ref.state_dict().items()}
        load_full_state_dict(dmp, full)
        _assert_matches(dmp, full, f"{kind} after load")

        kjt = random_kjt(tables, BATCH * world_size, seed=1)
        if kind == kinds[0]:  # a bad id is caught before input_dist, naming its feature
            bad = batch_slice(kjt, rank * BATCH, (rank + 1) * BATCH)
            values = bad.values().clone()
            values[-1] = 10**6  # outside every table
            with pytest.raises(ValueError, match=r"feature 'f\d': id 1000000 is outside"):
                dmp(kjt_with(bad, values, None))
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

        # Save and load through DMP's own state dict into a differently initialised model.
        other = _dmp(kind, optimizer, world_size)
        other.load_state_dict(dmp.state_dict())
        _assert_matches(other, stepped, f"{kind} state dict round trip")
        probe = random_kjt(tables, BATCH * world_size, seed=3)
        mine = batch_slice(probe, rank * BATCH, (rank + 1) * BATCH)
        for f, v in other(mine).items():
            torch.testing.assert_close(v, dmp(mine)[f], msg=f"{kind}: reloaded output {f}")


@pytest.mark.parametrize("optimizer", [EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ROWWISE_ADAGRAD])
def test_sharded_equals_unsharded(optimizer: EmbOptimType) -> None:
    run_multiprocess(_sharded_equals_unsharded, 2, optimizer, list(PLANS))


def test_optimizer_options_the_scalars_cannot_follow_are_refused() -> None:
    """A weight decay (or momentum...) on the table would train its rows and its scalars
    differently: refuse at sharding time, naming the table, instead of ignoring it."""
    meta = MEmComEmbeddingBagCollection(small_tables(), COMPRESSION, device=torch.device("meta"))
    sharding = construct_module_sharding_plan(
        meta,
        {t.name: table_wise(rank=0, compute_kernel=FUSED) for t in small_tables()},
        sharder=MEmComEmbeddingBagCollectionSharder(),
        local_size=2,
        world_size=2,
        device_type="cpu",
    )["t0"]
    t0 = meta.tables[0]
    plain = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1, "weight_decay": 0.0}
    assert table_layout(t0, sharding, 2, torch.device("cpu"), plain).optimizer == plain
    with pytest.raises(ValueError, match="'t0'.*weight_decay"):
        table_layout(t0, sharding, 2, torch.device("cpu"), {**plain, "weight_decay": 0.01})
