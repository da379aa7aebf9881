"""Smoke runs of the benchmarks: they run end to end and write well-formed results (no timing
assertions: CI machines are shared)."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_speed_benchmark_smoke(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--smoke", "--out", str(tmp_path)],
        check=True, capture_output=True, timeout=600,
    )
    result = json.loads((tmp_path / "speed_smoke.json").read_text())
    methods = result["methods"]
    assert set(methods) >= {"none", "memcom_16x"}
    for per_nproc in methods.values():
        for nproc in ("1", "2"):
            r = per_nproc[nproc]
            assert r["examples_per_s"] > 0 and r["peak_memory_bytes"] > 0
    assert methods["none"]["1"]["throughput_ratio_vs_stock"] == 1.0
    assert methods["memcom_16x"]["1"]["compression_ratio"] > 4
