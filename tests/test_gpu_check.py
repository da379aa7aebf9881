"""benchmarks/gpu_check.sh on a machine without a CUDA device: it says so, does nothing, exits 0."""

import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


@pytest.mark.parametrize("probe", ["missing", "lists_no_gpu"])
def test_without_a_cuda_device_it_reports_and_does_nothing(tmp_path: Path, probe: str) -> None:
    """No driver tool, or one that finds no GPU (as nvidia-smi on a machine without one): a clear
    line and exit 0, before any install (the state of docs/ and .venv is untouched)."""
    smi = tmp_path / "nvidia-smi"
    if probe == "lists_no_gpu":
        smi.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
        smi.chmod(0o755)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (REPO / "docs").iterdir())
    done = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, env={**os.environ, "NVIDIA_SMI": str(smi)}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"gpu_check: no CUDA device on this machine ({smi} lists no GPU): nothing to check"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (REPO / "docs").iterdir()) == before
