"""One suite every compression method runs, in the shape of PEFT's common tester: a ``MethodCase``
per method (its small tables, how to build its collection, its sharder, a plain-PyTorch
reference of its forward, the plans and optimizers it supports, the combinations it refuses),
registered in ``CASES``, and one set of checks parametrized over every case x plan x optimizer:

1. reference semantics: forward and parameter gradients equal a plain-PyTorch reference;
2. sharded equals unsharded (2 gloo ranks on CPU; nccl on every GPU under ``-m gpu``): after
   sharding a module that holds values and after ``load_full_state_dict``, the forward, one
   backward plus optimizer step (SGD, row-wise Adagrad, Adagrad: the step checks the gradients),
   and the bytes each rank holds against the module's own tensors (and the budget's count);
3. a DCP save loaded into a model sharded by another plan (the next one in the case's list);
4. the exported inference form (``torchrec_memcom.export``) equals the eager module.

One spawned job runs every sharded check of every case (the processes are shared); each check
records its own failure so the job goes on, and the test ids below report them one by one.
"""

import contextlib
import copy
import dataclasses
import json
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import assert_matches_reference, batch_slice, optimizer_state_bytes, random_kjt, small_tables
from dist_utils import run_multiprocess
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from sharded_utils import Wrapper, assert_outputs_match, assert_state_matches, backward_both, sgd_on_dense
from test_budget_module import reference_forward as budgeted_reference
from test_hash_module import reference_forward as hash_reference
from test_memcom_module import reference_forward as memcom_reference
from test_qr_module import reference_forward as qr_reference
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import (
    ParameterShardingGenerator,
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_memcom import MEmComConfig, MEmComEmbeddingBagCollection, MEmComEmbeddingBagCollectionSharder
from torchrec_memcom.distributed.budgeted_embeddingbag import BudgetedEmbeddingBagCollectionSharder
from torchrec_memcom.distributed.hash_embeddingbag import HashEmbeddingBagCollectionSharder
from torchrec_memcom.distributed.qr_embeddingbag import QREmbeddingBagCollectionSharder
from torchrec_memcom.distributed.scalar_layout import table_layout
from torchrec_memcom.distributed.state import load_full_state_dict
from torchrec_memcom.distributed.stock_views import kjt_with
from torchrec_memcom.export.export import script
from torchrec_memcom.inference.tables import build_embeddings, collect_tables
from torchrec_memcom.modules.budget_allocation import Allocation, TableAllocation, Tier
from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection
from torchrec_memcom.modules.hash_embedding_bag import HashConfig, HashEmbeddingBagCollection
from torchrec_memcom.modules.memcom_config import DEFAULT_SCALAR_LR_SCALE
from torchrec_memcom.modules.qr_embedding_bag import QRConfig, QREmbeddingBagCollection

BATCH, LR, EPS = 4, 0.1, 1e-8
FUSED = "fused"
SGD, ROWWISE, ADAGRAD = EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ROWWISE_ADAGRAD, EmbOptimType.EXACT_ADAGRAD
OPTIMIZER_NAMES = {SGD: "sgd", ROWWISE: "rowwise_adagrad", ADAGRAD: "adagrad"}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]


def _with_kernel(
    generator: ParameterShardingGenerator, sharding_type: Optional[ShardingType] = None
) -> ParameterShardingGenerator:
    """``generator`` with the fused kernel (table_row_wise takes no kernel), as ``sharding_type``
    if given: TorchRec has no table-column-wise generator, and a table-column-wise plan is column
    shards on the ranks of one host."""

    def generate(*args: Any, **kwargs: Any) -> Any:
        sharding = generator(*args, **kwargs)
        sharding.compute_kernel = FUSED
        if sharding_type is not None:
            sharding.sharding_type = sharding_type.value
        return sharding

    return generate


def _column_ranks(world: int) -> List[int]:
    """Two column shards, on ranks 0 and 1 (both on rank 0 with one rank): dims of 8 keep
    FBGEMM's 4-column alignment whatever the world size."""
    return [0, min(1, world - 1)]


# The sharding type under test, for t0's lookup tables; every other lookup table is table-wise.
PLANS: Dict[str, Callable[[int], ParameterShardingGenerator]] = {
    "table_wise": lambda world: table_wise(rank=min(1, world - 1), compute_kernel=FUSED),
    "row_wise": lambda world: row_wise(compute_kernel=FUSED),
    "column_wise": lambda world: column_wise(ranks=_column_ranks(world), compute_kernel=FUSED),
    "data_parallel": lambda world: data_parallel(),
    "table_row_wise": lambda world: _with_kernel(table_row_wise(host_index=0)),
    "table_column_wise": lambda world: _with_kernel(
        column_wise(ranks=_column_ranks(world)), ShardingType.TABLE_COLUMN_WISE
    ),
}
COLUMN_SHARDED = ("column_wise", "table_column_wise")


def _uniform_scalars(module: nn.Module) -> None:
    """Per-entity scalars away from their init (1), so their gradients and steps matter."""
    with torch.no_grad():
        for w in module.entity_weights.values():
            w.uniform_(0.5, 1.5)


def _budgeted_off_init(module: nn.Module) -> None:
    """Scalars away from 1 and projections away from ``[I; 0]``."""
    _uniform_scalars(module)
    with torch.no_grad():
        for p in module.projections.values():
            p.weight.add_(0.3 * torch.randn_like(p.weight))


def _mean_t1() -> List[EmbeddingBagConfig]:
    """The shared small tables, t1 MEAN-pooled."""
    t0, t1, t2 = small_tables()
    return [t0, dataclasses.replace(t1, pooling=PoolingType.MEAN), t2]


def _frequencies() -> Dict[str, torch.Tensor]:
    """t0 and t2 in random order (remapped), t1 already frequency-ranked (no remap)."""
    g = torch.Generator().manual_seed(7)
    return {
        "t0": torch.randint(0, 1000, (1000,), generator=g),
        "t1": torch.arange(400, 0, -1),
        "t2": torch.randint(0, 50, (60,), generator=g),
    }


# One MEmCom tier among t0's; t0's tiers at 16, 8 and 8 columns (column shards of 4 or more).
ALLOCATION = Allocation(
    {
        "t0": TableAllocation((Tier(100, 16), Tier(300, 8), Tier(600, 8, hash_rows=50))),
        "t1": TableAllocation((Tier(50, 16), Tier(350, 8))),
        "t2": TableAllocation((Tier(60, 16),)),
    }
)


@dataclasses.dataclass(frozen=True)
class MethodCase:
    """A method under test.

    ``build(device, optimizer)``: its collection over ``tables()`` (``optimizer``: the fused
    one it will train with, for methods whose sizes count optimizer state); ``off_init``: moves
    its extra parameters off their init; ``reference(state, tables, module, kjt)``: its forward
    in plain PyTorch from the state dict; ``plans``: the sharding types it takes on CPU (in the
    order in which each plan's checkpoint is loaded into the next); ``refused``: plan -> the
    error a CPU sharding with it raises.
    """

    name: str
    tables: Callable[[], List[EmbeddingBagConfig]]
    build: Callable[[torch.device, EmbOptimType], nn.Module]
    sharder: Callable[..., ModuleSharder]
    reference: Callable[..., Dict[str, torch.Tensor]]
    plans: Tuple[str, ...]
    optimizers: Tuple[EmbOptimType, ...] = (SGD, ROWWISE)
    off_init: Callable[[nn.Module], None] = lambda module: None
    refused: Dict[str, str] = dataclasses.field(default_factory=dict)

    def module(self, device: torch.device, optimizer: EmbOptimType = SGD, seed: int = 0) -> nn.Module:
        """``build`` seeded, off its init unless on meta."""
        torch.manual_seed(seed)
        module = self.build(device, optimizer)
        if device.type != "meta":
            self.off_init(module)
        return module


CASES: List[MethodCase] = [
    MethodCase(
        "memcom",
        small_tables,
        # t0: 128 rows do not divide its 1000 ids, so its last slot block is partial (104 of 128)
        lambda device, _: MEmComEmbeddingBagCollection(
            small_tables(),
            {"t0": MEmComConfig(num_hash_rows=128), "t1": MEmComConfig(num_hash_rows=50, hash="mix")},
            device=device,
        ),
        MEmComEmbeddingBagCollectionSharder,
        memcom_reference,
        ("table_wise", "row_wise", "column_wise", "data_parallel", "table_row_wise"),
        off_init=_uniform_scalars,
    ),
    MethodCase(
        "hash",
        _mean_t1,
        lambda device, _: HashEmbeddingBagCollection(
            _mean_t1(), {"t0": HashConfig(ratio=4), "t1": HashConfig(num_hash_rows=50, hash="mix")}, device=device
        ),
        HashEmbeddingBagCollectionSharder,
        hash_reference,
        ("table_wise", "row_wise", "column_wise", "data_parallel"),
    ),
    MethodCase(
        "qr",
        _mean_t1,
        lambda device, _: QREmbeddingBagCollection(
            _mean_t1(), {"t0": QRConfig(num_collisions=8), "t1": QRConfig(ratio=5, operation="add")}, device=device
        ),
        QREmbeddingBagCollectionSharder,
        qr_reference,
        ("table_wise", "row_wise", "column_wise"),
        # FBGEMM's CPU dense kernel pools per-id lookups: refused, not wrong
        refused={"data_parallel": r"\['t0@q', 't0@r'\]: on CPU they need the fused"},
    ),
    MethodCase(
        "budgeted",
        lambda: small_tables(16),
        lambda device, optimizer: BudgetedEmbeddingBagCollection(
            small_tables(16),
            budget_ratio=1.5,
            frequencies=_frequencies(),
            allocation=ALLOCATION,
            optimizer=OPTIMIZER_NAMES[optimizer],
            device=device,
        ),
        BudgetedEmbeddingBagCollectionSharder,
        lambda state, tables, module, kjt: budgeted_reference(state, module, kjt),
        tuple(PLANS),
        (SGD, ROWWISE, ADAGRAD),
        off_init=_budgeted_off_init,
    ),
]
BY_NAME = {case.name: case for case in CASES}
STEP_CHECKS = ("sharded", "loaded", "forward", "step", "checkpoint")
# The plans whose bytes are counted: nothing replicated but small projections and rank buffers.
BYTE_PLANS = ("table_wise", "row_wise")


def _combinations() -> Iterator[Tuple[str, str, EmbOptimType]]:
    for case in CASES:
        for optimizer in case.optimizers:
            for plan in case.plans:
                yield case.name, plan, optimizer


def _key(*parts: Any) -> str:
    return "/".join(p.name if isinstance(p, EmbOptimType) else str(p) for p in parts)


# ---- the sharded job -------------------------------------------------------------------------


class Checks:
    """Failures by check key; a failed assertion is recorded and the job goes on (every rank
    keeps running the same collectives), any other error ends the job."""

    def __init__(self) -> None:
        self.results: Dict[str, Optional[str]] = {}

    @contextlib.contextmanager
    def check(self, *key: Any) -> Iterator[None]:
        name = _key(*key)
        try:
            yield
            self.results.setdefault(name, None)
        except (AssertionError, pytest.fail.Exception):  # a failed pytest.raises is the latter
            self.results[name] = traceback.format_exc()


def _plan(case: MethodCase, module: nn.Module, sharder: ModuleSharder, kind: str, device: torch.device) -> ShardingPlan:
    """``kind`` on t0's lookup tables, the others table-wise spread over the ranks."""
    world = dist.get_world_size()
    names = list(sharder.shardable_parameters(module))
    others = [n for n in names if n.split("@")[0] != "t0"]
    specs = {n: table_wise(rank=i % world, compute_kernel=FUSED) for i, n in enumerate(others)}
    specs.update({n: PLANS[kind](world) for n in names if n.split("@")[0] == "t0"})
    plan = construct_module_sharding_plan(
        module, specs, sharder=sharder, local_size=world, world_size=world, device_type=device.type
    )
    return ShardingPlan({"ebc": plan})


def _dmp(
    case: MethodCase, kind: str, optimizer: EmbOptimType, module: nn.Module, device: torch.device
) -> DistributedModelParallel:
    """DMP over ``module`` (on meta, or holding values), sharded by ``kind``, trained with the
    fused ``optimizer``."""
    sharder = case.sharder(fused_params={"optimizer": optimizer, "learning_rate": LR, "eps": EPS})
    return DistributedModelParallel(
        Wrapper(module),
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        plan=_plan(case, module, sharder, kind, device),
        sharders=[sharder],
        device=device,
    )


def _expected_step(ref: nn.Module, kind: str, optimizer: EmbOptimType, world: int) -> None:
    """One step on the unsharded module: mean-over-ranks gradients (TorchRec's convention, DDP's
    for dense parameters), plain SGD on dense ones (projections, data-parallel t0 tables), the
    fused optimizer on model-parallel ones: Adagrad per element, row-wise Adagrad per row of
    each column shard (per-entity scalars are ``n x 1``: one row each)."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            g = p.grad / world
            t0 = name.split(".")[1].split("@")[0] == "t0"
            dense = name.startswith("projections.") or (kind == "data_parallel" and t0)
            # fused per-entity scalars step at their default multiple of the table's lr
            lr = LR * (DEFAULT_SCALAR_LR_SCALE if name.startswith("entity_weights.") else 1.0)
            if dense:
                p -= LR * g
            elif optimizer == SGD:
                p -= lr * g
            elif optimizer == ADAGRAD:
                p -= lr * g / ((g * g).sqrt() + EPS)
            else:
                shards = len(_column_ranks(world)) if kind in COLUMN_SHARDED and t0 else 1
                for cols, grad in zip(p.chunk(shards, dim=1), g.chunk(shards, dim=1)):
                    state = (grad * grad).mean(dim=1, keepdim=True)
                    cols -= lr * grad / (state.sqrt() + EPS)


def _prefixed(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {f"ebc.{k}": v.detach().cpu() for k, v in module.state_dict().items()}


def _assert_holds(dmp: DistributedModelParallel, full: Dict[str, torch.Tensor], what: str) -> None:
    """Every local shard or replica equals its part of ``full``, and so does the slot storage
    of every rank's per-entity scalars (MEmCom, budgeted MEmCom tiers)."""
    assert_state_matches(dmp, full, what)
    weights = getattr(get_unwrapped_module(dmp).ebc, "entity_weights", None)
    rank = dist.get_rank()
    for name, local in getattr(weights, "storage", {}).items():
        layout = weights.layouts[name]
        for start, offset, length in layout.slot_pieces(layout.local_block(rank)):
            torch.testing.assert_close(
                local.detach().cpu()[offset : offset + length],
                full[f"ebc.entity_weights.{name}"][start : start + length],
                msg=f"{what}: storage of {name} on rank {rank}",
            )


def _assert_unsharded_names(dmp: DistributedModelParallel, ref: nn.Module) -> None:
    """Parameters keep the unsharded names (the scalars aside: flat per rank once sharded), and
    DMP's DDP is left exactly the dense ones: projections and data-parallel scalars."""
    names = [n for n, _ in dmp.named_parameters()]
    scalars = "ebc.entity_weights."
    assert {n for n in names if not n.startswith(scalars)} == {
        f"ebc.{n}" for n, _ in ref.named_parameters() if not n.startswith("entity_weights.")
    }
    left_to_ddp = set(names) - set(DistributedModelParallel._sharded_parameter_names(get_unwrapped_module(dmp)))
    assert left_to_ddp == {n for n in names if n.startswith("ebc.projections.") or n == f"{scalars}dense"}


def _outputs(dmp: DistributedModelParallel, kjt: KeyedJaggedTensor, device: torch.device) -> Dict[str, torch.Tensor]:
    rank = dist.get_rank()
    return dmp(batch_slice(kjt, rank * BATCH, (rank + 1) * BATCH).to(device))


def _local_bytes(value: Any) -> int:
    if isinstance(value, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
    return value.numel() * value.element_size()


def _check_bytes(
    checks: Checks,
    case: MethodCase,
    kind: str,
    optimizer: EmbOptimType,
    dmp: DistributedModelParallel,
    device: torch.device,
) -> None:
    """Across ranks, the sharded module's state holds the bytes of the unsharded module's tensors
    (replicated ones counted once), and the fused optimizer's state the bytes TorchRec's or
    torch's optimizer keeps for them; budgeted: those are the bytes its budget counts, within it."""
    rank = dist.get_rank()
    state = sum(0 if rank and not isinstance(v, ShardedTensor) else _local_bytes(v) for v in dmp.state_dict().values())
    optimizer_state = sum(
        _local_bytes(v)
        for per_param in dmp.fused_optimizer.state_dict()["state"].values()
        for v in per_param.values()
        if isinstance(v, (ShardedTensor, torch.Tensor))
    )
    totals = torch.tensor([state, optimizer_state], device=device)
    dist.all_reduce(totals)
    module = case.module(torch.device("cpu"), optimizer)
    with checks.check("bytes", case.name, kind, optimizer):
        assert int(totals[0]) == sum(_local_bytes(v) for v in module.state_dict().values())
        assert int(totals[1]) == optimizer_state_bytes(module, OPTIMIZER_NAMES[optimizer])
        if isinstance(module, BudgetedEmbeddingBagCollection):
            assert int(totals[0]) == module.parameter_bytes()
            assert int(totals[1]) == module.optimizer_bytes()
            assert module.parameter_bytes() + module.optimizer_bytes() <= module.budget_limit


def _run_case(checks: Checks, case: MethodCase, folder: Path, device: torch.device) -> None:
    world, tables = dist.get_world_size(), case.tables()
    mine = slice(dist.get_rank() * BATCH, (dist.get_rank() + 1) * BATCH)
    kjt = random_kjt(tables, BATCH * world, seed=1)
    probe = random_kjt(tables, BATCH * world, seed=3)
    with checks.check("bad_id", case.name):  # caught before input_dist, naming its feature
        dmp = _dmp(case, case.plans[0], SGD, case.module(torch.device("meta")), device)
        bad = batch_slice(kjt, 0, BATCH)
        values = bad.values().clone()
        values[-1] = 10**6  # outside every table
        with pytest.raises(ValueError, match=r"feature 'f\d': id 1000000 is outside"):
            dmp(kjt_with(bad, values, None).to(device))
    for optimizer in case.optimizers:
        for i, kind in enumerate(case.plans):
            key = (case.name, kind, optimizer)
            what = _key(*key)
            ref = case.module(torch.device("cpu"), optimizer)
            full = _prefixed(ref)
            # sharding a module that holds values keeps them
            dmp = _dmp(case, kind, optimizer, copy.deepcopy(ref).to(device), device)
            with checks.check("sharded", *key):
                assert_state_matches(dmp, full, f"{what} sharded with values")
                assert get_unwrapped_module(dmp).ebc.cost() == ref.cost()
                _assert_unsharded_names(dmp, ref)
            if kind in BYTE_PLANS:
                _check_bytes(checks, case, kind, optimizer, dmp, device)
            # ... and so does one sharded on meta, then loaded from the full state
            dmp = _dmp(case, kind, optimizer, case.module(torch.device("meta"), optimizer), device)
            load_full_state_dict(dmp, full)
            with checks.check("loaded", *key):
                if isinstance(ref, BudgetedEmbeddingBagCollection):  # one table remapped, one not
                    assert "ebc.remap.t0" in full and "ebc.remap.t1" not in full
                _assert_holds(dmp, full, f"{what} loaded")

            out = _outputs(dmp, kjt, device)
            ref_out = ref(kjt).to_dict()
            with checks.check("forward", *key):
                assert_outputs_match(out, ref_out, mine, f"{what} forward")
            backward_both(out, ref_out, mine)
            sgd_on_dense(dmp, LR)
            _expected_step(ref, kind, optimizer, world)
            stepped = _prefixed(ref)
            with checks.check("step", *key):
                _assert_holds(dmp, stepped, f"{what} after one step")

            # a DCP checkpoint loaded into a model sharded by the next plan
            other_kind = case.plans[(i + 1) % len(case.plans)]
            path = str(folder / what.replace("/", "-"))
            dcp.save(dmp.state_dict(), checkpoint_id=path)
            other = _dmp(case, other_kind, optimizer, case.module(torch.device("meta"), optimizer), device)
            state = other.state_dict()
            dcp.load(state, checkpoint_id=path)
            other.load_state_dict(state)
            reloaded, expected = _outputs(other, probe, device), _outputs(dmp, probe, device)
            with checks.check("checkpoint", *key):
                _assert_holds(other, stepped, f"{what} loaded into {other_kind}")
                assert_outputs_match(reloaded, ref(probe).to_dict(), mine, f"{what} output in {other_kind}")
                for f, v in reloaded.items():
                    torch.testing.assert_close(v, expected[f], msg=f"{what}: reloaded output {f}")
    if device.type == "cpu":
        for kind, error in case.refused.items():
            with checks.check("refused", case.name, kind):
                with pytest.raises(ValueError, match=error):
                    _dmp(case, kind, SGD, case.module(torch.device("meta")), device)
    if case.name == "budgeted":
        with checks.check("refused", case.name, "budget_optimizer"):
            # a budget counting other state than the fused optimizer keeps is refused at sharding
            with pytest.raises(ValueError, match="budget counts adagrad state .* train with rowwise_adagrad"):
                _dmp(case, "table_wise", ROWWISE, case.module(torch.device("meta"), ADAGRAD), device)


def _job(rank: int, world: int, device_type: str, folder: str) -> None:
    torch.set_num_threads(1)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    checks = Checks()
    for case in CASES:
        _run_case(checks, case, Path(folder), device)
    (Path(folder) / f"results-{rank}.json").write_text(json.dumps(checks.results))


_JOBS: Dict[str, Dict[str, Optional[str]]] = {}


def _results(device: str, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Optional[str]]:
    """Every sharded check's failure (None: passed) by key, from one job per device: 2 gloo
    processes on CPU, one nccl process per GPU; a job that failed outside a check fails all."""
    if device not in _JOBS:
        folder = tmp_path_factory.mktemp(f"methods_{device}")
        world = torch.cuda.device_count() if device == "cuda" else 2
        try:
            run_multiprocess(_job, world, device, str(folder), backend="nccl" if device == "cuda" else "gloo")
        except AssertionError as e:
            _JOBS[device] = {"job": str(e)}
            return _JOBS[device]
        merged: Dict[str, Optional[str]] = {}
        for rank in range(world):
            for key, error in json.loads((folder / f"results-{rank}.json").read_text()).items():
                merged[key] = merged.get(key) or error
        _JOBS[device] = merged
    return _JOBS[device]


def _assert_passed(results: Dict[str, Optional[str]], *key: Any) -> None:
    name = _key(*key)
    if "job" in results:
        pytest.fail(f"the sharded job failed outside a check:\n{results['job']}")
    assert name in results, f"{name} never ran"
    assert results[name] is None, results[name]


STEP_PARAMS = [pytest.param(c, p, o, id=f"{c}-{p}-{OPTIMIZER_NAMES[o]}") for c, p, o in _combinations()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("check", STEP_CHECKS)
@pytest.mark.parametrize("case, kind, optimizer", STEP_PARAMS)
def test_sharded_equals_unsharded(
    case: str, kind: str, optimizer: EmbOptimType, check: str, device: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``sharded``/``loaded``: the sharded state equals the unsharded one; ``forward``; ``step``:
    one backward and optimizer step; ``checkpoint``: a DCP save loaded under the next plan."""
    _assert_passed(_results(device, tmp_path_factory), check, case, kind, optimizer)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case, kind, optimizer",
    [pytest.param(c, p, o, id=f"{c}-{p}-{OPTIMIZER_NAMES[o]}") for c, p, o in _combinations() if p in BYTE_PLANS],
)
def test_sharded_bytes_equal_the_tensors(
    case: str, kind: str, optimizer: EmbOptimType, device: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _assert_passed(_results(device, tmp_path_factory), "bytes", case, kind, optimizer)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_bad_ids_name_the_feature_before_input_dist(
    case: str, device: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _assert_passed(_results(device, tmp_path_factory), "bad_id", case)


@pytest.mark.parametrize(
    "case, kind",
    [
        *((c.name, k) for c in CASES for k in c.refused),
        ("budgeted", "budget_optimizer"),
    ],
)
def test_refused_combinations_name_the_tables(case: str, kind: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    _assert_passed(_results("cpu", tmp_path_factory), "refused", case, kind)


# ---- in-process checks -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_and_gradients_match_reference(case: MethodCase) -> None:
    assert_matches_reference(case.module(torch.device("cpu")), case.tables(), case.reference)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_export_equals_eager(case: MethodCase, device: str) -> None:
    """The exported row store (CPU inference, as ``memcom export`` writes it) answers every id of
    every feature as the eager module on ``device`` does."""
    module = case.module(torch.device(device))
    features = [f for t in case.tables() for f in t.feature_names]
    sizes = [t.num_embeddings for t in case.tables() for _ in t.feature_names]
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(1000, generator=g) % n for n in sizes], 1)  # every id of every table
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=features, values=ids.t().reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.int32)
    )
    with torch.no_grad():
        eager = module(kjt.to(torch.device(device))).to_dict()
    exported = script(build_embeddings(collect_tables(copy.deepcopy(module).cpu()), features, "fp32"))
    out = exported(ids)
    torch.testing.assert_close(out, torch.stack([eager[f].cpu() for f in features], 1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_planner_plans_every_lookup_table(case: MethodCase) -> None:
    """TorchRec's planner takes the sharder as it is, and keeps to the types it offers on CPU."""
    sharder = case.sharder()
    module = case.module(torch.device("meta"))
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"), batch_size=BATCH)
    plan = planner.plan(Wrapper(module), [sharder])
    assert set(plan.plan["ebc"]) == set(sharder.shardable_parameters(module))
    for sharding in plan.plan["ebc"].values():
        assert sharding.sharding_type in sharder.sharding_types("cpu")
        assert sharding.sharding_type in case.plans
        assert sharding.compute_kernel == FUSED or sharding.sharding_type == "data_parallel"


def test_optimizer_options_the_scalars_cannot_follow_are_refused() -> None:
    """A weight decay (or momentum...) on a MEmCom table would train its rows and its scalars
    differently: refused at sharding time, naming the table, instead of ignored."""
    case = BY_NAME["memcom"]
    meta = case.module(torch.device("meta"))
    sharding = construct_module_sharding_plan(
        meta,
        {t.name: table_wise(rank=0, compute_kernel=FUSED) for t in case.tables()},
        sharder=case.sharder(),
        local_size=2,
        world_size=2,
        device_type="cpu",
    )["t0"]
    t0 = meta.tables[0]
    plain = {"optimizer": SGD, "learning_rate": 0.1, "weight_decay": 0.0}
    assert table_layout(t0, sharding, 2, torch.device("cpu"), plain).optimizer == plain
    with pytest.raises(ValueError, match="'t0'.*weight_decay"):
        table_layout(t0, sharding, 2, torch.device("cpu"), {**plain, "weight_decay": 0.01})
