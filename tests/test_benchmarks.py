"""Smoke runs of the benchmarks: they run end to end and write well-formed, sane results (no
timing assertions: CI machines are shared)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CRITEO_SAMPLE, REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import quality  # noqa: E402


def _run(script: str, out: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_reachability_follows_each_methods_limits() -> None:
    sizes = [100_000] * 25 + [1460]  # one small table: QR reaches about sqrt(1460)/2 = 19x on it
    def why(method: str, ratio: float, min_rows: int = 1000) -> object:
        return quality.unreachable(method, quality.compression(method, ratio, min_rows, Path(".")), 32, sizes)

    assert why("hash", 64) is None and why("qr", 16) is None and why("memcom", 16) is None
    assert why("qr", 32) is not None  # the 1460-row table caps QR
    assert why("qr", 32, min_rows=2000) is None  # ... unless it stays uncompressed
    assert why("memcom", 32) is not None  # MEmCom stays below the dim
    assert "none" in quality.methods() and {"hash", "qr", "memcom"} <= set(quality.methods())


def test_quality_benchmark_smoke(tmp_path: Path) -> None:
    _run("quality.py", tmp_path)
    result = json.loads((tmp_path / "quality_smoke.json").read_text())
    assert (tmp_path / "quality_smoke.png").stat().st_size > 0
    expected = {"synthetic", "criteo"} if CRITEO_SAMPLE.exists() else {"synthetic"}
    assert set(result["datasets"]) == expected
    assert set(result["methods"]) == set(quality.methods())
    assert result["target_ratios"] == [2, 4] and len(result["seeds"]) == 1
    synthetic = result["datasets"]["synthetic"]
    assert 0.5 < synthetic["best_auc"] <= 1
    for dataset in result["datasets"].values():
        assert set(dataset["methods"]) == set(result["methods"])
        none = dataset["methods"]["none"]["1"]
        assert none["achieved_ratio"]["mean"] == 1.0 and "delta_auc_vs_none" in none
        for method, cells in dataset["methods"].items():
            achieved = []
            for target, cell in sorted(cells.items(), key=lambda kv: float(kv[0])):
                assert cell["target_ratio"] == float(target)
                if not cell["reachable"]:
                    assert cell["reason"]
                    continue
                assert not cell["errors"], cell["errors"]
                assert 0.0 <= cell["auc"]["mean"] <= 1.0 and cell["logloss"]["mean"] > 0
                assert cell["auc"]["std"] == 0.0  # one seed
                ratio = cell["achieved_ratio"]["mean"]
                if method in ("hash", "qr", "memcom"):  # min_rows keeps small tables: not above target
                    assert ratio <= float(target) * 1.01
                achieved.append(ratio)
            assert achieved == sorted(achieved) and len(set(achieved)) == len(achieved), (method, achieved)
            if method != "none":
                assert achieved and achieved[0] > 1.5


def test_speed_benchmark_smoke(tmp_path: Path) -> None:
    _run("speed.py", tmp_path)
    result = json.loads((tmp_path / "speed_smoke.json").read_text())
    assert (tmp_path / "speed_smoke.png").stat().st_size > 0
    assert result["backend"] in ("gloo", "nccl") and result["machine"]["device"]
    assert result["threads_per_process"] >= 1 and result["nprocs"] == [1, 2]
    training = result["training"]
    assert set(training) == set(quality.methods())
    for method, per_nproc in training.items():
        assert (result["ratios"][method] == 1.0) if method == "none" else (4 <= result["ratios"][method] <= 16)
        for nproc in ("1", "2"):
            r = per_nproc[nproc]
            assert r["examples_per_s"] > 0 and r["peak_memory_bytes"] > 0
            assert r["throughput_ratio_vs_stock"] > 0 and r["peak_memory_ratio_vs_stock"] > 0
            if method == "none":
                assert r["throughput_ratio_vs_stock"] == 1.0 and r["compression_ratio"] == 1.0
            else:
                assert r["compression_ratio"] > 4 and r["embedding_bytes"] < training["none"][nproc]["embedding_bytes"]
    inference = result["inference"]["methods"]
    assert set(inference) == set(training)
    for per_batch in inference.values():
        for batch in ("1", "512"):
            r = per_batch[batch]
            assert 0 < r["p50_ms"] <= r["p99_ms"] and r["calls"] > 0
