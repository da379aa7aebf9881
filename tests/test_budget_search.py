"""BET's search: the sampler's candidates, the DeepSets predictor learning a ranking, the search
loop, and `memcom budget search|heuristic` end to end on tiny synthetic data."""

from pathlib import Path
from typing import Dict, Iterator

import numpy as np
import pytest
import torch
import yaml
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_memcom.budget.predictor import FitnessPredictor
from torchrec_memcom.budget.search import SearchSettings, search
from torchrec_memcom.budget.space import DISTRIBUTIONS, AllocationSpace
from torchrec_memcom.cli import main
from torchrec_memcom.distributed.budgeted_embeddingbag import BudgetedEmbeddingBagCollectionSharder
from torchrec_memcom.methods.budgeted import build_budgeted
from torchrec_memcom.modules.budget_allocation import Allocation
from torchrec_memcom.modules.budget_bytes import Budget, allocation_bytes, shapes_of
from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection
from torchrec_memcom.modules.frequency import table_counts


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small models train fastest on one thread (and steadily on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _space(tail: bool = True, grid: int = 32) -> AllocationSpace:
    rng = np.random.default_rng(0)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n, feature_names=[f"f{i}"])
        for i, n in enumerate([2000, 500, 5000, 100])
    ]
    zipf = lambda n: np.floor(1e5 / np.arange(1, n + 1) ** 1.1).astype(np.int64)  # noqa: E731
    counts = {t.name: torch.from_numpy(rng.permutation(zipf(t.num_embeddings))) for t in tables}
    return AllocationSpace(tables, counts, Budget(ratio=4), tail=tail, grid=grid)


def _toy_fitness(space: AllocationSpace, candidates) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """A known fitness of the (frequency, size) set: popular ids gain most from size, with
    diminishing returns; ids in a MEmCom tier count half."""
    e, w = space.features(candidates)
    return (w[None] * e[..., 0] * e[..., 1].sqrt() * (1 - 0.5 * e[..., 2])).sum((1, 2))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_sampler_draws_allocations_within_budget() -> None:
    space = _space()
    candidates = space.sample(200, np.random.default_rng(1))
    assert (candidates.bytes <= space.limit).all() and (candidates.bytes > 0.95 * space.limit).all()
    assert {s.split(":")[0] for shape in candidates.shapes for s in shape.split(",")} == set(DISTRIBUTIONS)
    shapes = shapes_of(space.tables)
    tails = 0
    for i in range(0, 200, 10):
        allocation = space.allocation(candidates, i)
        exact = allocation_bytes(allocation, shapes, space.clean_cuts, None)
        assert sum(b.total for b in exact.values()) == candidates.bytes[i]
        for name, (n, d) in shapes.items():
            allocation.tables[name].validate(name, n, d)
        tails += any(t.hash_rows for a in allocation.tables.values() for t in a.tiers)
    assert tails > 0, "no sampled allocation used a MEmCom tier"
    assert len({c.tobytes() for c in candidates.sizes}) > 150, "samples are not diverse"


def test_predictor_learns_a_ranking_on_a_toy_problem() -> None:
    space = _space()
    candidates = space.sample(240, np.random.default_rng(0))
    truth = _toy_fitness(space, candidates)
    elements, weights = space.features(candidates)
    predictor = FitnessPredictor().fit(elements[:30], weights, truth[:30])
    held_out = _spearman(predictor.predict(elements[30:], weights), truth[30:])
    # the same network at its seeded initialisation, no training step taken
    unfitted = FitnessPredictor(epochs=0).fit(elements[:30], weights, truth[:30])
    baseline = _spearman(unfitted.predict(elements[30:], weights), truth[30:])
    assert held_out > 0.9 and held_out > baseline + 0.5, (held_out, baseline)


def test_search_labels_the_predicted_best_and_keeps_the_best_label() -> None:
    space = _space(grid=24)

    def label(allocation: Allocation) -> Dict[str, float]:
        exact = allocation_bytes(allocation, shapes_of(space.tables), space.clean_cuts, None)
        assert sum(b.total for b in exact.values()) <= space.limit
        return {"auc": float(_toy_fitness(space, _as_candidates(space, allocation))[0])}

    settings = SearchSettings(rounds=3, initial=4, per_round=2, pool=150, seed=0)
    best, labelled = search(space, label, settings, log=lambda _: None)
    values = [x.metrics["auc"] for x in labelled]
    assert len(labelled) == 4 + 3 * 2 and labelled[0].shape.startswith("heuristic")
    assert best.meta["best"]["auc"] == max(values) == pytest.approx(label(best)["auc"])
    assert all(x.predicted is None for x in labelled[:4]) and all(x.predicted is not None for x in labelled[4:])
    # the predictor's picks beat the random initial samples
    assert np.mean(values[4:]) > np.mean(values[1:4]), values


def _as_candidates(space: AllocationSpace, allocation: Allocation):  # type: ignore[no-untyped-def]
    """An allocation on the space's grid back as a one-candidate array (sizes per segment)."""
    from torchrec_memcom.budget.space import Candidates

    t, g = space.starts.shape
    sizes = np.zeros((1, t, g), dtype=np.int64)
    tail_dim = np.ones((1, t), dtype=np.int64)
    sharing = np.ones((1, t), dtype=np.int64)
    for i, name in enumerate(space.names):
        at = 0
        for tier in allocation.tables[name].tiers:
            inside = (space.starts[i] >= at) & (space.starts[i] < at + tier.rows)
            sizes[0, i, inside] = 0 if tier.hash_rows else tier.dim
            if tier.hash_rows:
                tail_dim[0, i] = tier.dim
                sharing[0, i] = -(-tier.rows // tier.hash_rows)
            at += tier.rows
    return Candidates(sizes, tail_dim, sharing, space.bytes(sizes, tail_dim, sharing), ["given"])


# ---- the command line, end to end --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from torchrec_memcom.data import synthesize

    out = tmp_path_factory.mktemp("data") / "synth"
    synthesize(3000, out, seed=0, max_cardinality=300, progress=False)
    return out


def test_cli_heuristic_and_search_write_allocations_within_budget(tiny_data: Path, tmp_path: Path) -> None:
    heuristic = tmp_path / "heuristic.json"
    assert (
        main(
            [
                "budget",
                "heuristic",
                "--data",
                str(tiny_data),
                "--dim",
                "8",
                "--budget-ratio",
                "3",
                "--tail",
                "--out",
                str(heuristic),
            ]
        )
        == 0
    )
    searched = tmp_path / "searched.json"
    assert (
        main(
            [
                "budget",
                "search",
                "--data",
                str(tiny_data),
                "--dim",
                "8",
                "--budget-ratio",
                "3",
                "--optimizer",
                "rowwise_adagrad",
                "--tail",
                "--out",
                str(searched),
                "--rounds",
                "1",
                "--initial",
                "2",
                "--per-round",
                "1",
                "--pool",
                "20",
                "--steps",
                "10",
                "--batch-size",
                "64",
                "--val-batches",
                "2",
            ]
        )
        == 0
    )
    for path, optimizer in [(heuristic, None), (searched, "rowwise_adagrad")]:
        allocation = Allocation.load(path)
        assert allocation.meta["data"] == str(tiny_data.resolve())
        assert allocation.meta["budget"]["optimizer"] == optimizer
        assert allocation.meta["bytes"] <= allocation.meta["budget_bytes"]
        # a collection built from the file alone (budget and data recorded) holds to the budget
        tables = [
            EmbeddingBagConfig(name=name, embedding_dim=d, num_embeddings=n, feature_names=[name[2:]])
            for name, (n, d) in allocation.meta["table_shapes"].items()
        ]
        module = build_budgeted(tables, {t.name: {"allocation": str(path)} for t in tables}, torch.device("cpu"))
        assert module.parameter_bytes() + module.optimizer_bytes() == allocation.meta["bytes"]
    labels = Allocation.load(searched).meta["labels"]
    assert len(labels) == 3 and all(0.0 < x["metrics"]["auc"] < 1.0 for x in labels)


def test_cli_names_the_smallest_feasible_budget(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "never.json"
    args = [
        "budget",
        "heuristic",
        "--data",
        str(tiny_data),
        "--dim",
        "8",
        "--optimizer",
        "rowwise_adagrad",
        "--out",
        str(out),
    ]
    assert main(args + ["--budget-ratio", "3"]) == 2
    err = capsys.readouterr().err
    floor = int(err.split("smallest feasible budget for these tables is ")[1].split()[0])
    assert not out.exists()
    assert main(args + ["--budget-bytes", str(floor)]) == 0
    assert Allocation.load(out).meta["bytes"] == floor


def test_cli_refuses_a_budget_counting_another_optimizer_than_the_config_trains_with(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(tiny_data)},
                "embeddings": {
                    "dim": 8,
                    "compression": {
                        "method": "budgeted",
                        "params": {"budget_ratio": 2, "tail": True, "optimizer": "adagrad"},
                    },
                },
                "optimizer": {"sparse": {"type": "rowwise_adagrad"}},
            }
        )
    )
    out = tmp_path / "allocation.json"
    assert main(["budget", "heuristic", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "counts adagrad state" in err and "optimizer.sparse.type" in err, err
    assert "train with rowwise_adagrad" in err and not out.exists()
    # counting the state the config trains with
    assert (
        main(["budget", "heuristic", "--config", str(config), "--optimizer", "rowwise_adagrad", "--out", str(out)]) == 0
    )
    assert Allocation.load(out).meta["budget"]["optimizer"] == "rowwise_adagrad"


def test_cli_search_on_a_training_config_then_train_with_it(tiny_data: Path, tmp_path: Path) -> None:
    """The config names the budget and the allocation file; tables under min_rows stay plain
    and outside the budget; the trainer's model builder then compresses with the file."""
    out = tmp_path / "allocation.json"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(tiny_data)},
                "embeddings": {
                    "dim": 8,
                    "compression": {
                        "method": "budgeted",
                        "min_rows": 100,
                        "params": {"budget_ratio": 3, "tail": True, "allocation": str(out)},
                    },
                },
                "train": {"batch_size": 64},
            }
        )
    )
    assert (
        main(
            [
                "budget",
                "search",
                "--config",
                str(config),
                "--out",
                str(out),
                "--rounds",
                "1",
                "--initial",
                "1",
                "--per-round",
                "1",
                "--pool",
                "10",
                "--steps",
                "10",
                "--val-batches",
                "1",
            ]
        )
        == 0
    )
    allocation = Allocation.load(out)
    from torchrec_memcom.data import CAT_NAMES, CriteoParquetLoader, load_manifest
    from torchrec_memcom.train.config import load_config
    from torchrec_memcom.train.model import build_model

    manifest = load_manifest(tiny_data)
    sizes = [manifest["features"][f]["num_embeddings"] for f in CAT_NAMES]
    assert set(allocation.tables) == {f"t_{f}" for f, n in zip(CAT_NAMES, sizes) if n >= 100}
    model, sharders = build_model(load_config(config), sizes, torch.device("cpu"))
    assert any(isinstance(s, BudgetedEmbeddingBagCollectionSharder) for s in sharders)
    collections = [m for m in model.modules() if isinstance(m, BudgetedEmbeddingBagCollection)]
    assert len(collections) == 1 and collections[0].allocation == allocation
    # the trainer builds on meta; materialise it to run one batch through
    budgeted = build_budgeted(
        collections[0].embedding_bag_configs(),
        {t.name: {"allocation": str(out)} for t in collections[0].embedding_bag_configs()},
        torch.device("cpu"),
    )
    batch = next(iter(CriteoParquetLoader(tiny_data, "train", 16)))
    pooled = budgeted(
        batch.sparse_features.permute(
            [batch.sparse_features.keys().index(f) for c in budgeted.embedding_bag_configs() for f in c.feature_names]
        )
    )
    assert pooled.values().shape == (16, 8 * len(allocation.tables))


def test_sizes_stay_on_each_tables_own_ladder() -> None:
    """Tables with ladders of different lengths (dims 1, 32, 16): a sample scaled to the top of
    the budget search must not read past a short ladder into the padding (found by hypothesis:
    a tier of dim 2**63 - 1, whose bytes no longer matched the candidate's)."""
    tables = [
        EmbeddingBagConfig(name="t0", embedding_dim=1, num_embeddings=1, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", embedding_dim=32, num_embeddings=1, feature_names=["f1"]),
        EmbeddingBagConfig(name="t2", embedding_dim=16, num_embeddings=965, feature_names=["f2"]),
    ]
    g = torch.Generator().manual_seed(0)
    counts = {
        "t0": torch.tensor([10_000]),
        "t1": torch.tensor([10_000]),
        "t2": torch.randint(5, 3000, (965,), generator=g),
    }
    space = AllocationSpace(tables, table_counts(tables, counts), Budget(bytes=92_838), tail=False, grid=16)
    for seed in range(8):
        candidates = space.sample(4, np.random.default_rng(seed))
        for i in range(len(candidates)):
            allocation = space.allocation(candidates, i)
            assert all(tier.dim <= t.embedding_dim for t in tables for tier in allocation.tables[t.name].tiers)
            exact = allocation_bytes(allocation, shapes_of(tables), space.clean_cuts, None)
            assert sum(b.total for b in exact.values()) == candidates.bytes[i] <= space.limit
