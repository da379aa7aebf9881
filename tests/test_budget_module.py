"""Unsharded budgeted tables: forward and gradients against a plain-PyTorch reference, state dict,
errors, and the budget held for randomized tables, frequencies and budgets (property tests)."""

import re
from typing import Dict, List

import numpy as np
import pytest
import torch
from conftest import assert_matches_reference, optimizer_state_bytes, random_kjt, small_tables
from hypothesis import HealthCheck, given, settings, strategies as st
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_memcom.budget.space import AllocationSpace
from torchrec_memcom.methods.budgeted import budgeted_collection
from torchrec_memcom.modules.budget_allocation import Allocation, TableAllocation, Tier
from torchrec_memcom.modules.budget_bytes import Budget, allocation_bytes, shapes_of
from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection, split_by_tier
from torchrec_memcom.modules.frequency import table_counts
from torchrec_memcom.modules.memcom_embedding_bag import MEmComEmbeddingBagCollection

ALLOCATION = Allocation(
    {
        "t0": TableAllocation((Tier(100, 16), Tier(300, 8), Tier(600, 4, hash_rows=37))),
        "t1": TableAllocation((Tier(50, 16), Tier(350, 8))),
        "t2": TableAllocation((Tier(10, 8), Tier(50, 4))),
    }
)


def _frequencies() -> Dict[str, torch.Tensor]:
    """t0, t2 in random id order (remapped); t1 already ranked, as `--mode frequency` writes."""
    g = torch.Generator().manual_seed(3)
    return {
        "t0": torch.randint(0, 500, (1000,), generator=g),
        "t1": torch.arange(400, 0, -1),
        "t2": torch.randint(0, 20, (60,), generator=g),
    }


def reference_forward(state: Dict[str, torch.Tensor], module: BudgetedEmbeddingBagCollection, kjt: KeyedJaggedTensor):
    """Per bag, ``sum_i P_j(i) e(i)`` from the state dict alone, with Python loops: the id's rank
    (``remap.T`` if present), its tier ``j`` and row, the tier's row (times the scalar in a
    MEmCom tier, whose shared row is ``row mod m``), projected by ``projections.T@tier<j>``."""
    out = {}
    d = kjt.to_dict()
    for table in module.tables:
        starts = table.starts
        for f in table.feature_names:
            rows = []
            for ids in d[f].to_dense():
                bag = torch.zeros(table.embedding_dim)
                for i in ids.tolist():
                    rank = int(state[f"remap.{table.name}"][i]) if f"remap.{table.name}" in state else i
                    j = max(k for k, s in enumerate(starts) if s <= rank)
                    row, name = rank - starts[j], f"{table.name}@tier{j}"
                    weight = state[f"embedding_bags.{name}.weight"]
                    if f"entity_weights.{name}" in state:
                        v = weight[row % weight.shape[0]] * state[f"entity_weights.{name}"][row]
                    else:
                        v = weight[row]
                    if f"projections.{name}.weight" in state:
                        v = state[f"projections.{name}.weight"] @ v
                    bag = bag + v
                rows.append(bag)
            out[f] = torch.stack(rows)
    return out


def _module(**kwargs) -> BudgetedEmbeddingBagCollection:
    return BudgetedEmbeddingBagCollection(
        small_tables(16), budget_ratio=1.5, frequencies=_frequencies(), allocation=ALLOCATION, **kwargs
    )


def test_forward_and_gradients_match_reference() -> None:
    torch.manual_seed(0)
    module = _module()
    with torch.no_grad():
        for w in module.entity_weights.values():
            w.uniform_(0.5, 1.5)
        for p in module.projections.values():
            p.weight.add_(0.3 * torch.randn_like(p.weight))
    assert_matches_reference(module, small_tables(16), lambda state, _, m, kjt: reference_forward(state, m, kjt))


def test_state_dict_keys_shapes_and_round_trip() -> None:
    module = _module()
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "embedding_bags.t0@tier0.weight": (100, 16),
        "embedding_bags.t0@tier1.weight": (300, 8),
        "embedding_bags.t0@tier2.weight": (37, 4),
        "entity_weights.t0@tier2": (600,),
        "embedding_bags.t1@tier0.weight": (50, 16),
        "embedding_bags.t1@tier1.weight": (350, 8),
        "embedding_bags.t2@tier0.weight": (10, 8),
        "embedding_bags.t2@tier1.weight": (50, 4),
        "projections.t0@tier1.weight": (16, 8),
        "projections.t0@tier2.weight": (16, 4),
        "projections.t1@tier1.weight": (16, 8),
        "projections.t2@tier0.weight": (16, 8),
        "projections.t2@tier1.weight": (16, 4),
        "remap.t0": (1000,),  # t1's ids are ranked already: no remap
        "remap.t2": (60,),
    }
    assert module.state_dict()["remap.t0"].dtype == torch.int32
    torch.manual_seed(5)
    again = _module()
    again.load_state_dict(module.state_dict())
    kjt = random_kjt(small_tables(16), 4, seed=3)
    torch.testing.assert_close(again(kjt).values(), module(kjt).values())
    # projections start as [I; 0]: a tier's vector is the leading coordinates of the output
    torch.testing.assert_close(module.projections["t0@tier1"].weight, torch.eye(16)[:, :8])


def test_the_tier_collection_is_a_submodule_whose_tensors_show_once() -> None:
    """The tier collection sits in the module tree (``_tiers``) holding the very tensors the
    module shows at its own paths: parameter names and state-dict keys list them once."""
    module = _module()
    modules = dict(module.named_modules())
    assert isinstance(modules["_tiers"], MEmComEmbeddingBagCollection)
    assert modules["_tiers"].embedding_bags is module.embedding_bags
    names = [n for n, _ in module.named_parameters()]
    assert not [n for n in names if n.startswith("_tiers.")]
    assert set(names) == {k for k in module.state_dict() if not k.startswith("remap.")}
    # a strict load fills the shared tensors: the tier collection then reads the loaded values
    state = {
        k: torch.rand_like(v.float()).to(v.dtype) if v.is_floating_point() else v
        for k, v in module.state_dict().items()
    }
    module.load_state_dict(state)
    torch.testing.assert_close(
        modules["_tiers"].embedding_bags["t0@tier0"].weight, state["embedding_bags.t0@tier0.weight"]
    )
    torch.testing.assert_close(modules["_tiers"].entity_weights.flat("t0@tier2"), state["entity_weights.t0@tier2"])


def test_popular_ids_get_larger_embeddings_under_the_heuristic() -> None:
    tables = [EmbeddingBagConfig(name="t", embedding_dim=32, num_embeddings=5000, feature_names=["f"])]
    g = torch.Generator().manual_seed(0)
    zipf = (1e5 / torch.arange(1, 5001) ** 1.1).long()
    counts = zipf[torch.randperm(5000, generator=g)]
    module = budgeted_collection(tables, budget_ratio=4, frequencies={"t": counts})
    tiers = module.tables[0].tiers
    assert len(tiers) > 1 and tiers[0].dim > tiers[-1].dim
    ranks = module.state_dict()["remap.t"].long()
    dims = torch.tensor([t.dim for t in tiers]).repeat_interleave(torch.tensor([t.rows for t in tiers]))
    popular, rare = counts.argmax(), counts.argmin()
    assert dims[ranks[popular]] == tiers[0].dim and dims[ranks[rare]] == tiers[-1].dim


def test_errors() -> None:
    tables, freqs = small_tables(16), _frequencies()
    mean = [
        EmbeddingBagConfig(name="m", embedding_dim=8, num_embeddings=10, feature_names=["f"], pooling=PoolingType.MEAN)
    ]
    with pytest.raises(ValueError, match="'m'.*SUM"):
        budgeted_collection(mean, budget_ratio=2, frequencies={"m": torch.ones(10)})
    with pytest.raises(ValueError, match="frequencies lack table 't1'"):
        budgeted_collection(tables, budget_ratio=2, frequencies={"t0": freqs["t0"]})
    with pytest.raises(ValueError, match=r"frequencies of table 't0': expected shape \(1000,\)"):
        budgeted_collection(tables, budget_ratio=2, frequencies={**freqs, "t0": torch.ones(5)})
    with pytest.raises(ValueError, match="exactly one of bytes or ratio"):
        budgeted_collection(tables, frequencies=freqs)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        budgeted_collection(tables, budget_ratio=2, frequencies=freqs, optimizer="adam")
    with pytest.raises(ValueError, match="need an allocation.*budgeted_collection builds the heuristic"):
        BudgetedEmbeddingBagCollection(tables, freqs, None, budget_ratio=2)  # type: ignore[arg-type]

    def alloc(t0: TableAllocation) -> Allocation:
        return Allocation({**ALLOCATION.tables, "t0": t0})

    for bad, message in [
        (TableAllocation((Tier(500, 8), Tier(500, 16))), "larger than the more popular tier"),
        (TableAllocation((Tier(500, 16), Tier(400, 8))), "cover 900 ids, the table has 1000"),
        (TableAllocation((Tier(500, 6), Tier(500, 4))), "dim 6; allowed"),
        (TableAllocation((Tier(500, 16, hash_rows=10), Tier(500, 8))), "only the last"),
        (TableAllocation((Tier(500, 16), Tier(500, 8, hash_rows=501))), "hash_rows <= 500"),
    ]:
        with pytest.raises(ValueError, match=f"table 't0'.*{message}"):
            BudgetedEmbeddingBagCollection(tables, budget_ratio=1, frequencies=freqs, allocation=alloc(bad))
    with pytest.raises(ValueError, match="allocation lacks tables \\['t2'\\]"):
        BudgetedEmbeddingBagCollection(
            tables,
            budget_ratio=1,
            frequencies=freqs,
            allocation=Allocation({k: ALLOCATION.tables[k] for k in ("t0", "t1")}),
        )
    needed = _module().parameter_bytes()
    with pytest.raises(ValueError, match=f"allocation needs {needed} bytes .*over the budget of {needed - 1}"):
        _module_with_budget(needed - 1)
    assert _module_with_budget(needed).parameter_bytes() == needed


def _module_with_budget(budget: int) -> BudgetedEmbeddingBagCollection:
    return BudgetedEmbeddingBagCollection(
        small_tables(16), budget_bytes=budget, frequencies=_frequencies(), allocation=ALLOCATION
    )


@pytest.mark.parametrize("bad", [-1, 1000])
def test_bad_ids_name_the_feature(bad: int) -> None:
    tables = small_tables(16)
    kjt = random_kjt(tables, 3, seed=0)
    values = kjt.values().clone()
    values[int(kjt.length_per_key()[0]) - 1] = bad
    broken = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), values, kjt.lengths())
    with pytest.raises(ValueError, match=f"feature 'f0': id {bad} is outside \\[0, 1000\\)"):
        _module()(broken)


def test_allocation_file_round_trip(tmp_path) -> None:
    path = tmp_path / "a.json"
    Allocation(ALLOCATION.tables, {"data": "/somewhere", "budget": {"ratio": 4}}).save(path)
    loaded = Allocation.load(path)
    assert loaded == ALLOCATION and loaded.meta == {"data": "/somewhere", "budget": {"ratio": 4}}
    module = BudgetedEmbeddingBagCollection(
        small_tables(16), budget_ratio=1.5, frequencies=_frequencies(), allocation=path
    )
    assert module.allocation == ALLOCATION
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: cannot read allocation"):
        Allocation.load(tmp_path / "bad.json")


# ---- property tests: the budget holds ---------------------------------------------------------


@st.composite
def problems(draw):  # type: ignore[no-untyped-def]
    """Random tables, id counts of several shapes, a budget, optimizer accounting and tail."""
    tables: List[EmbeddingBagConfig] = []
    counts = {}
    for i in range(draw(st.integers(1, 3))):
        n = draw(st.one_of(st.integers(1, 50), st.integers(50, 3000)))
        d = draw(st.sampled_from([1, 3, 4, 8, 12, 16, 32]))
        tables.append(EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=n, feature_names=[f"f{i}"]))
        kind = draw(st.sampled_from(["zipf", "ranked", "frequency_mode", "uniform", "zero"]))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        zipf = np.floor(1e4 / np.arange(1, n + 1) ** 1.1).astype(np.int64)
        c = {
            "zipf": rng.permutation(zipf),
            "ranked": zipf,
            "frequency_mode": np.concatenate([[zipf.sum() // 3], zipf[: n - 1]]),
            "uniform": rng.integers(0, 50, n),
            "zero": np.zeros(n, dtype=np.int64),
        }[kind]
        counts[f"t{i}"] = torch.from_numpy(c)
    optimizer = draw(st.sampled_from([None, "sgd", "rowwise_adagrad", "adagrad"]))
    tail = draw(st.booleans())
    if draw(st.booleans()):
        budget = Budget(ratio=draw(st.floats(1.0, 12.0)), optimizer=optimizer)
    else:
        full = Budget(ratio=1.0, optimizer=optimizer).resolve(shapes_of(tables))
        budget = Budget(bytes=max(1, int(full * draw(st.floats(0.01, 1.5)))), optimizer=optimizer)
    return tables, counts, budget, tail


def _build(tables, counts, budget, tail, allocation=None) -> BudgetedEmbeddingBagCollection:  # type: ignore[no-untyped-def]
    return budgeted_collection(
        tables,
        budget_bytes=budget.bytes,
        frequencies=counts,
        allocation=allocation,
        budget_ratio=budget.ratio,
        optimizer=budget.optimizer,
        tail=tail,
    )


def _state_bytes(module: BudgetedEmbeddingBagCollection) -> int:
    return sum(v.numel() * v.element_size() for v in module.state_dict().values())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_budget_holds_for_the_heuristic(problem) -> None:  # type: ignore[no-untyped-def]
    tables, counts, budget, tail = problem
    limit = budget.resolve(shapes_of(tables))
    try:
        module = _build(tables, counts, budget, tail)
    except ValueError as e:
        floor = int(re.search(r"smallest feasible budget for these tables is (\d+) bytes", str(e)).group(1))
        assert limit < floor
        # the smallest feasible budget is feasible
        module = _build(tables, counts, Budget(bytes=floor, optimizer=budget.optimizer), tail)
        limit = floor
    assert _state_bytes(module) == module.parameter_bytes()
    assert optimizer_state_bytes(module, budget.optimizer) == module.optimizer_bytes()
    assert module.parameter_bytes() + module.optimizer_bytes() <= limit
    assert module.cost()["total"]["bytes"] == _state_bytes(module) + optimizer_state_bytes(module, budget.optimizer)
    for t in module.tables:
        assert all(a.dim >= b.dim for a, b in zip(t.tiers, t.tiers[1:]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.integers(0, 2**16))
def test_budget_holds_for_sampled_allocations(problem, seed: int) -> None:  # type: ignore[no-untyped-def]
    tables, counts, budget, tail = problem
    shapes = shapes_of(tables)
    try:
        space = AllocationSpace(tables, table_counts(tables, counts), budget, tail=tail, grid=16)
    except ValueError as e:
        assert "smallest feasible budget" in str(e)
        return
    candidates = space.sample(4, np.random.default_rng(seed))
    for i in range(len(candidates)):
        allocation = space.allocation(candidates, i)
        exact = allocation_bytes(allocation, shapes, space.clean_cuts, budget.optimizer)
        assert sum(b.total for b in exact.values()) == candidates.bytes[i] <= space.limit
        module = _build(tables, counts, budget, tail, allocation)
        assert _state_bytes(module) == module.parameter_bytes() == sum(b.parameters for b in exact.values())
        assert optimizer_state_bytes(module, budget.optimizer) == module.optimizer_bytes()


@pytest.mark.parametrize("id0", [10_000, 0])
def test_frequency_ranked_ids_need_no_remap(id0: int) -> None:
    """Ids in frequency order from id 1 on, as `memcom data convert --mode frequency` writes
    them (id 0 collects the rare and unseen ids, however often it was counted), are their own
    ranks: no remap buffer, id 0 in the first tier, and lookups still right."""
    n = 500
    counts = torch.cat([torch.tensor([id0]), (1e4 / torch.arange(1, n) ** 1.1).long()])
    tables = [EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=n, feature_names=["f"])]
    allocation = Allocation({"t": TableAllocation((Tier(30, 16), Tier(170, 8), Tier(300, 4)))})
    for chosen in (allocation, None):
        module = budgeted_collection(tables, budget_ratio=2, frequencies={"f": counts}, allocation=chosen)
        assert "remap.t" not in module.state_dict() and not module.tables[0].remap
        assert module.tables[0].tiers[0].dim >= module.tables[0].tiers[-1].dim
    module = BudgetedEmbeddingBagCollection(tables, budget_ratio=1, frequencies={"f": counts}, allocation=allocation)
    kjt = random_kjt(tables, 5, seed=4)
    torch.testing.assert_close(module(kjt).to_dict()["f"], reference_forward(module.state_dict(), module, kjt)["f"])
    # one id out of frequency order from id 1 on: ranks by count, and a remap
    swapped = counts.clone()
    swapped[[3, 400]] = swapped[[400, 3]]
    module = BudgetedEmbeddingBagCollection(tables, budget_ratio=1, frequencies={"f": swapped}, allocation=allocation)
    assert int(module.state_dict()["remap.t"][400]) == (2 if id0 == 0 else 3)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("slack", [0, 1, 0.02])
def test_budgets_at_the_floor_give_valid_allocations(tail: bool, slack: float) -> None:
    """At (or just above) the smallest feasible budget, sampled and heuristic allocations fall
    back to the cheapest one (per table one tier at its cheapest size, or one MEmCom row) and
    are still valid."""
    sizes = [3, 40, 2000, 700]
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n, feature_names=[f"f{i}"])
        for i, n in enumerate(sizes)
    ]
    rng = np.random.default_rng(0)
    counts = {t.name: torch.from_numpy(rng.integers(0, 100, t.num_embeddings)) for t in tables}
    floor_message = ""
    try:
        AllocationSpace(tables, counts, Budget(bytes=1, optimizer="adagrad"), tail=tail)
    except ValueError as e:
        floor_message = str(e)
    floor = int(re.search(r"smallest feasible budget for these tables is (\d+) bytes", floor_message).group(1))
    budget = Budget(bytes=int(floor * (1 + slack)) if isinstance(slack, float) else floor + slack, optimizer="adagrad")
    space = AllocationSpace(tables, counts, budget, tail=tail, grid=16)
    candidates = space.sample(20, np.random.default_rng(1))
    for i in range(len(candidates)):
        module = _build(tables, counts, budget, tail, space.allocation(candidates, i))
        assert module.parameter_bytes() + module.optimizer_bytes() == candidates.bytes[i] <= budget.bytes
    heuristic = _build(tables, counts, budget, tail)
    assert heuristic.parameter_bytes() + heuristic.optimizer_bytes() <= budget.bytes
    if slack == 0:  # only the cheapest allocation fits
        assert heuristic.parameter_bytes() + heuristic.optimizer_bytes() == floor


def test_too_small_without_a_tail_names_the_lower_floor_of_a_tail() -> None:
    """Without a tail, a budget below the floor is told the smaller floor a MEmCom tail reaches,
    and that floor is exact: with a tail the heuristic fits it to the byte."""
    tables = [EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=5000, feature_names=["f"])]
    counts = {"t": torch.arange(5000, 0, -1)}

    def floors(budget: int, tail: bool) -> List[int]:
        with pytest.raises(ValueError, match="too small") as e:
            _build(tables, counts, Budget(bytes=budget, optimizer="rowwise_adagrad"), tail)
        return [int(x) for x in re.findall(r"(?:is|to) (\d+) bytes", str(e.value))]

    floor, tail_floor = floors(1, tail=False)
    assert tail_floor < floor
    with pytest.raises(ValueError, match=f"goes down to {tail_floor} bytes, which this budget meets"):
        _build(tables, counts, Budget(bytes=tail_floor, optimizer="rowwise_adagrad"), False)
    module = _build(tables, counts, Budget(bytes=tail_floor, optimizer="rowwise_adagrad"), True)
    assert module.parameter_bytes() + module.optimizer_bytes() == tail_floor
    assert floors(tail_floor - 1, tail=True) == [tail_floor]  # with a tail, nothing lower to name


def test_split_by_tier_matches_a_per_bag_split() -> None:
    """Every bag of ``f`` split into bags of ``f@tier<j>`` (rows in tier ``j``, in bag order),
    for the input's key order, whatever it is; the same again from the cached layout."""
    module = _module()
    ranks = module.remap.as_dict()
    kjt = random_kjt(small_tables(16), 6, seed=4)
    shuffled = kjt.permute([2, 0, 3, 1])
    for features in (kjt, shuffled, shuffled):
        split = split_by_tier(features, module._feature_tables, ranks)
        expected_keys, expected = [], {}
        for f, jt in features.to_dict().items():
            t = module._feature_tables[f]
            keys = [f"{f}@tier{j}" for j in range(len(t.tiers))]
            expected_keys += keys
            bags: Dict[str, List[List[int]]] = {k: [] for k in keys}
            for ids in jt.to_dense():
                rows: List[List[int]] = [[] for _ in keys]
                for i in ids.tolist():
                    rank = int(ranks[t.name][i]) if t.remap else i
                    j = max(k for k, s in enumerate(t.starts) if s <= rank)
                    rows[j].append(rank - t.starts[j])
                for k, r in zip(keys, rows):
                    bags[k].append(r)
            expected.update(bags)
        assert split.keys() == expected_keys and split.stride() == 6
        for k, jt in split.to_dict().items():
            assert [x.tolist() for x in jt.to_dense()] == expected[k]
