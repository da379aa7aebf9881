"""The differential harness: every composition ``compress()`` builds, sharded, equals the
unsharded module holding the same state.

For every method (none, hash, qr, memcom, budgeted) and per-table mixes of them, under forced
plans that put several sharding types inside one collection (table-, row-, column-wise and
data-parallel), with SUM and MEAN plain tables: the forward, one backward and SGD step (the
step checks the gradients: SGD moves each value by ``lr`` times its gradient), and a DCP save
loaded into a different plan all equal the unsharded module. Two gloo ranks, one launch.
"""

from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import batch_slice, random_kjt
from dist_utils import run_multiprocess
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from sharded_utils import Wrapper, assert_outputs_match, assert_state_matches, backward_both, sgd_on_dense
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
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
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_memcom import CompressionSpec, HashConfig, MEmComConfig, QRConfig, TableCompression, compress
from torchrec_memcom.distributed.state import load_full_state_dict
from torchrec_memcom.modules.memcom_config import DEFAULT_SCALAR_LR_SCALE
from torchrec_memcom.modules.qr_embedding_bag import QREmbeddingBagCollection

BATCH, LR = 4, 0.1
FUSED_PARAMS = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}
MIN_ROWS = 100  # t2 and t3 stay plain tables


def tables() -> List[EmbeddingBagConfig]:
    """Two tables to compress, a plain SUM table read by two features, a plain MEAN table."""
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=1000, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=400, feature_names=["f1"]),
        EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=60, feature_names=["f2", "f3"]),
        EmbeddingBagConfig(
            name="t3", embedding_dim=8, num_embeddings=50, feature_names=["f4"], pooling=PoolingType.MEAN
        ),
    ]


def _frequencies() -> Dict[str, torch.Tensor]:
    """Zipf-like id counts in a shuffled order (so budgeted tables remap their ids)."""
    g = torch.Generator().manual_seed(5)
    return {
        t.name: (1000.0 / torch.arange(1, t.num_embeddings + 1))[torch.randperm(t.num_embeddings, generator=g)].long()
        for t in tables()[:2]
    }


BUDGETED = {"budget_ratio": 1.5, "frequencies": _frequencies()}
# Name -> the spec a user gives compress(): each method alone (plain tables kept with it, or
# in a stock child), and mixes that make three children of one MixedEmbeddingBagCollection.
SPECS: Dict[str, Callable[[], CompressionSpec]] = {
    "none": lambda: CompressionSpec(),
    "hash": lambda: CompressionSpec(params=HashConfig(ratio=4, hash="mix"), min_rows=MIN_ROWS),
    "qr": lambda: CompressionSpec(params=QRConfig(num_collisions=8), min_rows=MIN_ROWS),
    "memcom": lambda: CompressionSpec(
        params=MEmComConfig(ratio=4), min_rows=MIN_ROWS, tables={"t1": MEmComConfig(num_hash_rows=50, hash="mix")}
    ),
    "budgeted": lambda: CompressionSpec(method="budgeted", params=BUDGETED, min_rows=MIN_ROWS),
    "memcom+hash": lambda: CompressionSpec(
        params=MEmComConfig(ratio=4), min_rows=MIN_ROWS, tables={"t1": HashConfig(ratio=4)}
    ),
    "budgeted+qr": lambda: CompressionSpec(
        method="budgeted",
        params=BUDGETED,
        min_rows=MIN_ROWS,
        tables={"t1": TableCompression("qr", {"ratio": 5, "operation": "add"})},
    ),
}

KINDS: Dict[str, Callable[[], ParameterShardingGenerator]] = {
    "table_wise@0": lambda: table_wise(rank=0, compute_kernel="fused"),
    "table_wise@1": lambda: table_wise(rank=1, compute_kernel="fused"),
    "row_wise": lambda: row_wise(compute_kernel="fused"),
    "column_wise": lambda: column_wise(ranks=[0, 1], compute_kernel="fused"),
    "data_parallel": data_parallel,
}
# The plan trained on and the different plan its checkpoint is loaded into, by user table (its
# lookup tables: QR's T@q/T@r, budgeted tiers T@tier<j>). Several types in each collection.
PLAN_A = {"t0": "row_wise", "t1": "table_wise@1", "t2": "data_parallel", "t3": "row_wise"}
PLAN_B = {"t0": "column_wise", "t1": "data_parallel", "t2": "table_wise@0", "t3": "column_wise"}
# compress() leaves an EBC it compresses nothing of as it is: a stock EBC, whose TorchRec 1.8.0
# sharding divides the other features too when it holds a row-wise MEAN table (see
# test_stock_row_wise_mean_divides_other_features); its MEAN table is table-wise here.
STOCK_PLAN_A = {**PLAN_A, "t3": "table_wise@0"}


def _kind(kind: str, module: nn.Module, weight: torch.Tensor) -> str:
    """What a lookup table gets where its method cannot take ``kind`` on CPU (the refusals are
    checked in ``_refusals``): QR lookups are never data-parallel; tiers narrower than 8
    columns are not split into column shards (FBGEMM's 4-column alignment)."""
    if kind == "data_parallel" and isinstance(module, QREmbeddingBagCollection):
        return "table_wise@0"
    if kind == "column_wise" and weight.shape[1] < 8:
        return "table_wise@1"
    return kind


def _sharders(sharders: List[ModuleSharder]) -> List[ModuleSharder]:
    """compress()'s sharders, the stock EBC one with the same fused SGD as ours."""
    return [s for s in sharders if type(s) is not EmbeddingBagCollectionSharder] + [
        EmbeddingBagCollectionSharder(fused_params=FUSED_PARAMS)
    ]


def _build(spec: str, device: torch.device) -> Tuple[nn.Module, List[ModuleSharder]]:
    torch.manual_seed(0)
    model, sharders = compress(Wrapper(EmbeddingBagCollection(tables(), device=device)), SPECS[spec](), FUSED_PARAMS)
    if device.type != "meta":
        with torch.no_grad():  # scalars and projections away from their init (1, [I; 0])
            for name, p in model.named_parameters():
                if "entity_weights" in name or "projections" in name:
                    p.uniform_(0.5, 1.5)
    return model, _sharders(sharders)


def _plan(
    model: nn.Module, sharders: List[ModuleSharder], by_table: Dict[str, str], substitute: bool = True
) -> ShardingPlan:
    """``by_table``'s kinds for every lookup table of every collection a sharder shards
    (``substitute``: with ``_kind``'s substitutes)."""
    by_type = {s.module_type: s for s in sharders}
    world = dist.get_world_size()
    plan = {}
    for path, module in model.named_modules():
        sharder = by_type.get(type(module))
        if sharder is None:
            continue
        params = sharder.shardable_parameters(module)
        # a mixed collection's tables by the child holding them (its sharder plans them all)
        owner = {
            n: c for c in getattr(module, "collections", [module]) for n in by_type[type(c)].shardable_parameters(c)
        }
        kinds = {
            name: _kind(by_table[name.split("@")[0]], owner[name], w) if substitute else by_table[name.split("@")[0]]
            for name, w in params.items()
        }
        plan[path] = construct_module_sharding_plan(
            module,
            {name: KINDS[k]() for name, k in kinds.items()},
            sharder=sharder,
            local_size=world,
            world_size=world,
            device_type="cpu",
        )
    return ShardingPlan(plan)


def _dmp(spec: str, by_table: Dict[str, str]) -> DistributedModelParallel:
    model, sharders = _build(spec, torch.device("meta"))
    return DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        plan=_plan(model, sharders, by_table),
        sharders=sharders,
        device=torch.device("cpu"),
    )


def _composition(rank: int, world: int, specs: List[str], folder: str) -> None:
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    kjt = random_kjt(tables(), BATCH * world, seed=1)
    probe = random_kjt(tables(), BATCH * world, seed=3)
    for spec in specs:
        ref, _ = _build(spec, torch.device("cpu"))
        dmp = _dmp(spec, STOCK_PLAN_A if spec == "none" else PLAN_A)
        load_full_state_dict(dmp, ref.state_dict())
        assert_state_matches(dmp, ref.state_dict(), f"{spec}: loaded")

        ref_out = ref(kjt)
        out = dmp(batch_slice(kjt, rank * BATCH, (rank + 1) * BATCH))
        assert_outputs_match(out, ref_out, mine, f"{spec} forward")
        backward_both(out, ref_out, mine)
        sgd_on_dense(dmp, LR)
        with torch.no_grad():
            for name, p in ref.named_parameters():  # the mean over ranks of the gradient: TorchRec's convention
                # per-entity scalars train at their default multiple of the table's lr
                p -= LR * (DEFAULT_SCALAR_LR_SCALE if ".entity_weights." in f".{name}" else 1.0) * p.grad / world
        stepped = ref.state_dict()
        assert_state_matches(dmp, stepped, f"{spec}: after one SGD step")
        assert_outputs_match(
            dmp(batch_slice(probe, rank * BATCH, (rank + 1) * BATCH)), ref(probe), mine, f"{spec} stepped"
        )

        # A DCP checkpoint loaded into a model sharded by another plan.
        path = str(Path(folder) / spec)
        dcp.save(dmp.state_dict(), checkpoint_id=path)
        other = _dmp(spec, PLAN_B)
        state = other.state_dict()
        dcp.load(state, checkpoint_id=path)
        other.load_state_dict(state)
        assert_state_matches(other, stepped, f"{spec}: loaded into plan B")
        assert_outputs_match(
            other(batch_slice(probe, rank * BATCH, (rank + 1) * BATCH)), ref(probe), mine, f"{spec} plan B"
        )

        if spec == "none":
            _stock_row_wise_mean(ref, kjt, mine)
    # Combinations refused: with an error naming the tables, not a wrong result.
    model, sharders = _build("qr", torch.device("meta"))
    with pytest.raises(ValueError, match=r"\['t0@q', 't0@r', 't1@q', 't1@r'\]: on CPU they need the fused"):
        DistributedModelParallel(
            model,
            env=ShardingEnv.from_process_group(dist.group.WORLD),
            device=torch.device("cpu"),
            plan=_plan(model, sharders, {t: "data_parallel" for t in PLAN_A}, substitute=False),
            sharders=sharders,
        )


def _stock_row_wise_mean(ref: nn.Module, kjt: Any, mine: slice) -> None:
    """Pins what TorchRec 1.8.0 does with a stock EBC holding a row-wise MEAN table and others
    (why compress() keeps a mixed collection's plain tables in a collection of ours): the
    table-wise feature f1 comes out divided by its bag lengths. When this fails, TorchRec fixed
    it and ``row_sharded_columns`` can go."""
    dmp = _dmp("none", PLAN_A)
    load_full_state_dict(dmp, ref.state_dict())
    rank = dist.get_rank()
    out = dmp(batch_slice(kjt, rank * BATCH, (rank + 1) * BATCH))
    expected = ref(kjt)
    torch.testing.assert_close(out["f0"], expected["f0"][mine])  # row-wise SUM: right
    lengths = batch_slice(kjt, rank * BATCH, (rank + 1) * BATCH).to_dict()["f1"].lengths()
    divided = expected["f1"][mine] / lengths.clamp(min=1).unsqueeze(1).float()
    torch.testing.assert_close(out["f1"], divided.detach())


def test_sharded_equals_unsharded_in_every_composition(tmp_path: Path) -> None:
    run_multiprocess(_composition, 2, list(SPECS), str(tmp_path))
