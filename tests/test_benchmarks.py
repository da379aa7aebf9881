"""Smoke runs of the benchmarks: they run end to end and write well-formed, sane results (no
timing assertions: CI machines are shared)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CRITEO_SAMPLE, REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import quality  # noqa: E402


def _run(script: str, out: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
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


def test_budgeted_gets_the_same_one_percent_tolerance(tmp_path: Path) -> None:
    from torchrec_memcom.data import synthesize
    from torchrec_memcom.train.model import embedding_bytes

    manifest = synthesize(2000, tmp_path, seed=0, max_cardinality=20_000, progress=False)
    sizes = [manifest["features"][f"cat_{i}"]["num_embeddings"] for i in range(26)]
    dim, min_rows = 32, 1000
    kept = [n for n in sizes if n >= min_rows]
    # the cheapest allocation of a table: one MEmCom tier of one shared full-dim row (no
    # projection) and n scalars, no remap (a single tier needs none); fp32 bytes
    floor = sum(4 * (n + dim) for n in kept)
    best = 4 * dim * sum(kept) / floor
    assert 0.99 * dim < best < dim

    def fit(ratio: float) -> dict:
        return quality.within_tolerance(quality.compression("budgeted", ratio, min_rows, tmp_path), dim, sizes)

    assert fit(16)["params"]["budget_ratio"] == 16  # feasible budgets are left alone
    assert fit(2 * dim)["params"]["budget_ratio"] == 2 * dim  # far below the floor: still refused
    assert quality.unreachable("budgeted", fit(2 * dim), dim, sizes)
    block = fit(dim)  # below the floor by under 1%: the floor
    assert "budget_ratio" not in block["params"] and block["params"]["budget_bytes"] == floor
    assert quality.unreachable("budgeted", block, dim, sizes) is None
    built = quality.build_meta(block, dim, sizes)
    total = sum(embedding_bytes(built, [f"t_cat_{i}" for i in range(26)]).values())
    assert quality.compressed_tables_ratio(total, sizes, dim, min_rows) == pytest.approx(best)


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
                ratio, on_compressed = cell["achieved_ratio"]["mean"], cell["achieved_ratio_compressed_tables"]
                assert ratio <= on_compressed * (1 + 1e-9)  # min_rows keeps small tables stock
                if method == "budgeted":  # a budget caps the bytes; the heuristic may leave some unspent
                    assert on_compressed >= float(target) / 1.01
                else:  # the ratio solvers' 1%
                    assert on_compressed == pytest.approx(float(target), rel=0.01)
                achieved.append(ratio)
            assert achieved == sorted(achieved) and len(set(achieved)) == len(achieved), (method, achieved)
            if method != "none":
                assert achieved and achieved[0] > 1.5


def test_speed_benchmark_smoke(tmp_path: Path) -> None:
    _run("speed.py", tmp_path)
    result = json.loads((tmp_path / "speed_smoke.json").read_text())
    assert (tmp_path / "speed_smoke.png").stat().st_size > 0
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert result["backend"] == ("nccl" if gpus else "gloo") and result["machine"]["device"]
    # two processes need two GPUs when there are any (one GPU each), two CPU processes otherwise
    assert result["threads_per_process"] >= 1 and result["nprocs"] == ([1] if gpus == 1 else [1, 2])
    training = result["training"]
    assert set(training) == set(quality.methods())
    for method, per_nproc in training.items():
        assert (result["ratios"][method] == 1.0) if method == "none" else (4 <= result["ratios"][method] <= 16)
        assert set(per_nproc) == {str(n) for n in result["nprocs"]}
        for nproc, r in per_nproc.items():
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
    kernel = result["kernel"]  # FBGEMM's lookup alone: MEmCom's shared tables, weighted or not
    assert kernel["tables"] == 26 and kernel["ids_per_step"] == 26 * 64
    assert kernel["unweighted_ms"] > 0 and kernel["weighted_ms"] > 0


def test_hotpath_benchmark_smoke(tmp_path: Path) -> None:
    """Stock and each method's collection, from this tree and from a baseline checkout (this
    one), alternate on one process; and two instances of each, trained alike, stay bit-equal
    (--check)."""
    out = tmp_path / "hotpath.json"
    methods = ["memcom", "qr", "budgeted"]
    for extra in (["--out", str(out)], ["--check"]):
        done = subprocess.run(
            [
                sys.executable,
                str(REPO / "benchmarks" / "hotpath.py"),
                "--smoke",
                "--nprocs",
                "1",
                "--methods",
                *methods,
                "--baseline",
                str(REPO),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for method in methods:
        assert (
            f"{method}, 1 steps against {REPO}: {{'outputs_bit_equal': True, 'state_bit_equal': True}}" in done.stdout
        )
    setup = json.loads(out.read_text())["setup"]
    assert setup["methods"] == methods
    result = json.loads(out.read_text())["nprocs"]["1"]
    for clock in ("wall", "cpu"):
        arms = result[clock]
        assert set(arms) == {"stock", *methods, *(f"{m}_baseline" for m in methods)}
        assert arms["stock"]["speed_vs_stock"] == 1.0
        assert all(r["ms_per_step"] > 0 and r["speed_vs_stock"] > 0 for r in arms.values())
