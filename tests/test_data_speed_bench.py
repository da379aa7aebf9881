"""Smoke run of benchmarks/data_speed.py: it converts, loads and trains end to end and writes
well-formed results (no timing assertions: CI machines are shared)."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_data_speed_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "data_speed.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "data_speed.py"),
            "--smoke",
            "--workdir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["cpus"] >= 1
    assert [(r["input"], r["mode"]) for r in result["conversion"]] == [
        ("synthetic 4000 rows", "mod"),
        ("synthetic 4000 rows", "frequency"),
    ]
    for row in result["conversion"]:
        assert row["rows"] == 4000 and row["bytes"] > 0 and row["peak_rss_mib"] > 0
        assert 0 < row["median_rows_per_s"] <= row["best_rows_per_s"]
    assert result["loader_train_rows"] == 3429  # the Kaggle split's 6/7
    for row in result["loader"]:
        assert 0 < row["median_examples_per_s"] <= row["best_examples_per_s"] and row["examples_per_cpu_s"] > 0
    # The train split holds 2 batches of 1536, fewer than warm-up and timed steps: they repeat.
    train = result["dlrm_train"]
    assert train["batch_size"] == 1536 and train["steps"] == 1 and train["torch_threads"] == 1
    assert set(train) == {"batch_size", "steps", "torch_threads", "prebuilt", "loader_prefetch_0", "loader_prefetch_2"}
    for key in ("prebuilt", "loader_prefetch_0", "loader_prefetch_2"):
        assert train[key]["examples_per_s"] > 0 and train[key]["examples_per_cpu_s"] > 0
