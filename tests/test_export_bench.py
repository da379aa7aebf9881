"""Smoke run of benchmarks/inference.py: it trains, exports and times end to end and writes
well-formed results (no timing assertions: CI machines are shared). The two compressed models
run (MEmCom and budgeted); the stock one differs only in its config."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PRECISIONS = ("fp32", "fp16", "int8")


def test_inference_benchmark_smoke(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "inference.py"),
            "--smoke",
            "--models",
            "memcom_16x",
            "budgeted_16x",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "inference_smoke.json").read_text())
    assert (tmp_path / "inference_smoke.png").stat().st_size > 0
    models = result["models"]
    assert set(models) == {"memcom_16x", "budgeted_16x"}
    for sizes in models.values():
        assert set(sizes) == set(PRECISIONS)
        assert sizes["fp32"]["file_bytes"] > max(sizes["fp16"]["file_bytes"], sizes["int8"]["file_bytes"])
        assert all(s["file_bytes"] < s["fp32_uncompressed_bytes"] for s in sizes.values())
        assert sizes["int8"]["tensor_bytes"]["id_map"] < 1024  # mod mode: the moduli only
        assert sizes["fp32"]["check"]["max_abs_diff"] <= 1e-5
    assert models["memcom_16x"]["fp16"]["file_bytes"] > models["memcom_16x"]["int8"]["file_bytes"]
    budgeted = models["budgeted_16x"]["int8"]["tensor_bytes"]
    assert budgeted["projections"] > 0 and budgeted["remap"] > 0
    variants = {"torchrec_eager_fp32", "int8_score_raw", *PRECISIONS, *(f"{p}_embed" for p in PRECISIONS)}
    cells = {(r["model"], r["variant"], r["batch"], r["threads"]) for r in result["latency"]}
    threads = {r["threads"] for r in result["latency"]}
    assert cells == {(m, v, b, t) for m in models for v in variants for b in (1, 512) for t in threads}
    assert 1 in threads
    for r in result["latency"]:
        assert 0 < r["p50_us"] <= r["p99_us"]
