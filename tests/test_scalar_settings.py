"""Settings of the per-entity scalars (lr absolute or a multiple of the table's, eps, init): one
update of the scalars equals a plain-PyTorch reference of their rule (SGD, Adagrad; row-wise
Adagrad is Adagrad for one scalar per row) at that lr and eps, unsharded and sharded, for MEmCom
tables and budgeted tables' MEmCom tail; bad settings are refused naming the key."""

from typing import Any, Dict, Tuple

import pytest
import torch
import torch.distributed as dist
from conftest import batch_slice, random_kjt, small_tables
from dist_utils import run_multiprocess
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from sharded_utils import Wrapper
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from torchrec_memcom import MEmComConfig, MEmComEmbeddingBagCollection, MEmComEmbeddingBagCollectionSharder
from torchrec_memcom.compression import CompressionSpec, check_spec
from torchrec_memcom.distributed.budgeted_embeddingbag import BudgetedEmbeddingBagCollectionSharder
from torchrec_memcom.distributed.state import load_full_state_dict
from torchrec_memcom.methods.budgeted import budgeted_collection
from torchrec_memcom.modules.budget_allocation import Allocation, TableAllocation, Tier
from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection

TABLE_LR, TABLE_EPS, BATCH = 0.05, 1e-8, 4
# t0 at 10x the table's lr and its own eps; t1 at an absolute lr and the table's eps
SETTINGS = {
    "t0": dict(num_hash_rows=128, scalar_lr_scale=10.0, scalar_eps=1e-3, init_weight=0.75),
    "t1": dict(num_hash_rows=50, scalar_lr=0.5),
}
RULES = {"t0": (TABLE_LR * 10.0, 1e-3), "t1": (0.5, TABLE_EPS)}  # (lr, eps) the scalars must use


def _rule_step(w0: torch.Tensor, g: torch.Tensor, adagrad: bool, lr: float, eps: float) -> torch.Tensor:
    """One step of the scalars' rule from zero state, in plain PyTorch."""
    if adagrad:
        return w0 - lr * g / ((g * g).sqrt() + eps)
    return w0 - lr * g


def _memcom() -> MEmComEmbeddingBagCollection:
    torch.manual_seed(0)
    return MEmComEmbeddingBagCollection(small_tables(), {n: MEmComConfig(**s) for n, s in SETTINGS.items()})


def _loss(out: Dict[str, torch.Tensor], rows: slice = slice(None)) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    total = torch.zeros(())
    for f in sorted(out):
        weight = torch.randn((BATCH * 2,) + tuple(out[f].shape[1:]), generator=g)
        total = total + (out[f] * weight[rows]).sum()
    return total


@pytest.mark.parametrize(
    "optimizer, adagrad", [(RowWiseAdagrad, True), (torch.optim.Adagrad, True), (torch.optim.SGD, False)]
)
def test_unsharded_scalars_follow_their_settings(optimizer: type, adagrad: bool) -> None:
    module = _memcom()
    assert float(module.entity_weights.flat("t0")[0]) == 0.75  # init_weight
    reference = _memcom()  # same values, no optimizer: gives the gradients
    before = {n: w.detach().clone().view(-1) for n, w in module.entity_weights.items()}
    kwargs = {"lr": TABLE_LR} if not adagrad else {"lr": TABLE_LR, "eps": TABLE_EPS}
    apply_optimizer_in_backward(optimizer, module.parameters(), kwargs)
    kjt = random_kjt(small_tables(), BATCH * 2, seed=1)
    _loss(module(kjt).to_dict()).backward()
    _loss(reference(kjt).to_dict()).backward()
    for name, (lr, eps) in RULES.items():
        g = reference.entity_weights[name].grad.view(-1)
        expected = _rule_step(before[name], g, adagrad, lr, eps)
        torch.testing.assert_close(module.entity_weights.flat(name).detach(), expected, msg=name)


def _dmp(module: nn.Module, sharder: Any, world_size: int, tables: Any) -> DistributedModelParallel:
    meta_plan = construct_module_sharding_plan(
        module,
        {
            n: (row_wise(compute_kernel="fused") if i == 0 else table_wise(rank=i % world_size, compute_kernel="fused"))
            for i, n in enumerate(tables)
        },
        sharder=sharder,
        local_size=world_size,
        world_size=world_size,
        device_type="cpu",
    )
    return DistributedModelParallel(
        Wrapper(module),
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        plan=ShardingPlan({"ebc": meta_plan}),
        sharders=[sharder],
        device=torch.device("cpu"),
    )


def _local(value: Any, full: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's shards of ``value`` and the matching slices of ``full`` (flattened)."""
    assert isinstance(value, ShardedTensor)
    mine, ref = [], []
    for shard in value.local_shards():
        o, s = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
        mine.append(shard.tensor)
        ref.append(full[o : o + s])
    return torch.cat(mine) if mine else torch.zeros(0), torch.cat(ref) if ref else torch.zeros(0)


def _budgeted(device: torch.device = torch.device("cpu")) -> BudgetedEmbeddingBagCollection:
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=1000, feature_names=["f0"])]
    allocation = Allocation({"t0": TableAllocation((Tier(100, 8), Tier(900, 4, hash_rows=37)))})
    return BudgetedEmbeddingBagCollection(
        tables,
        budget_ratio=1.5,
        frequencies={"t0": torch.arange(1000, 0, -1)},
        allocation=allocation,
        scalars={"scalar_lr_scale": 10.0, "scalar_eps": 1e-3},
        device=device,
    )


def _sharded_scalars_follow_their_settings(rank: int, world_size: int) -> None:
    for optimizer, adagrad in [(EmbOptimType.EXACT_ROWWISE_ADAGRAD, True), (EmbOptimType.EXACT_SGD, False)]:
        fused = {"optimizer": optimizer, "learning_rate": TABLE_LR, "eps": TABLE_EPS}
        cases = [
            ("memcom", _memcom, MEmComEmbeddingBagCollectionSharder(fused_params=fused), small_tables(), RULES),
            (
                "budgeted",
                _budgeted,
                BudgetedEmbeddingBagCollectionSharder(fused_params=fused),
                [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=1000, feature_names=["f0"])],
                {"t0@tier1": (TABLE_LR * 10.0, 1e-3)},
            ),
        ]
        for what, build, sharder, tables, rules in cases:
            ref = build()
            before = {k: v.clone() for k, v in ref.state_dict().items()}
            dmp = _dmp(build(), sharder, world_size, list(sharder.shardable_parameters(ref)))
            load_full_state_dict(dmp, {f"ebc.{k}": v for k, v in before.items()})
            kjt = random_kjt(tables, BATCH * world_size, seed=1)
            mine = slice(rank * BATCH, (rank + 1) * BATCH)
            _loss(dmp(batch_slice(kjt, mine.start, mine.stop)), mine).backward()
            _loss(ref(kjt).to_dict()).backward()
            state = dmp.state_dict()
            for name, (lr, eps) in rules.items():
                g = ref.entity_weights[name].grad.view(-1) / world_size  # TorchRec: mean over ranks
                expected = _rule_step(before[f"entity_weights.{name}"], g, adagrad, lr, eps)
                got, want = _local(state[f"ebc.entity_weights.{name}"], expected)
                torch.testing.assert_close(got, want, msg=f"{what} {optimizer} {name}")


def test_sharded_scalars_follow_their_settings() -> None:
    run_multiprocess(_sharded_scalars_follow_their_settings, 2)


def test_bad_scalar_settings_are_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="at most one of `scalar_lr` or `scalar_lr_scale`"):
        MEmComConfig(ratio=4, scalar_lr=0.1, scalar_lr_scale=2.0)
    with pytest.raises(ValueError, match=r"compression.params: MEmComConfig.scalar_eps must be > 0, got 0"):
        check_spec(CompressionSpec(method="memcom", params={"ratio": 4, "scalar_eps": 0.0}))
    with pytest.raises(ValueError, match=r"compression.params: MEmComConfig.scalar_lr_scale must be > 0, got -1"):
        check_spec(CompressionSpec(method="budgeted", params={"budget_ratio": 2, "scalar_lr_scale": -1}))
    with pytest.raises(ValueError, match=r"budgeted scalars: unknown key 'scalar_lr_sale'"):
        _budgeted_with({"scalar_lr_sale": 2.0})


def _budgeted_with(scalars: Dict[str, Any]) -> BudgetedEmbeddingBagCollection:
    tables = [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=100, feature_names=["f0"])]
    return budgeted_collection(tables, budget_ratio=1.0, frequencies={"t0": torch.ones(100)}, scalars=scalars)
