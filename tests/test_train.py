"""The training app: configs, a 2-process run, kill-and-resume, the torchx component."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
import torch
import yaml
from conftest import REPO
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from torchrec_memcom.train.cli import launch
from torchrec_memcom.train.config import load_config


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from torchrec_memcom.data import synthesize

    path = tmp_path_factory.mktemp("data") / "synth"
    synthesize(8000, path, seed=0, max_cardinality=2000, progress=False)
    return path


def _config(tmp: Path, data: Path, compression: Optional[Dict[str, Any]] = None, **train: Any) -> Path:
    config: Dict[str, Any] = {
        "data": {"path": str(data)},
        "model": {"dense_arch_layer_sizes": [16], "over_arch_layer_sizes": [16, 1]},
        "embeddings": {
            "dim": 8,
            "compression": compression or {"method": "memcom", "params": {"ratio": 4}, "min_rows": 100},
        },
        "optimizer": {"sparse": {"type": "rowwise_adagrad", "lr": 0.1}, "dense": {"lr": 0.1}},
        "train": {"batch_size": 128, "run_dir": str(tmp / "run"), **train},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_shipped_configs_load() -> None:
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        load_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {batchsize: 3}", "unknown key train.batchsize"),
        ("train: {batch_size: many}", "train.batch_size: expected int, got 'many'"),
        ("train: {batch_size: 0}", "train.batch_size: must be >= 1"),
        ("model: {arch: DCNv9}", "model.arch: expected DLRM or DLRM_DCN"),
        ("embeddings: {dim: 10}", "embeddings.dim: must be a positive multiple of 4"),
        ("embeddings: {compression: {method: zip}}", "unknown method 'zip'"),
        ("optimizer: {sparse: {type: lamb}}", "optimizer.sparse.type"),
        ("data: [1, 2]", "data: expected a mapping"),
        ("train: {", "cannot read config"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_two_process_run_trains_and_evaluates(tmp_path: Path, tiny_data: Path) -> None:
    config = _config(tmp_path, tiny_data, epochs=2, eval_every=10)
    assert launch(str(config), 2) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("auc", "logloss", "examples_per_s", "embedding_bytes", "compression_ratio"):
        assert isinstance(results[key], float | int), key
    evals = results["evaluations"]
    assert [e["step"] for e in evals][:2] == [10, 20] and results["world_size"] == 2
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    assert results["auc"] > 0.55  # above chance on 800 validation rows (std about 0.02)
    per_table = results["embedding_bytes_per_table"]
    assert sum(per_table.values()) == results["embedding_bytes"]
    assert results["compression_ratio"] == pytest.approx(
        results["uncompressed_embedding_bytes"] / results["embedding_bytes"]
    )


@pytest.mark.parametrize("method, params", [
    ("hash", {"ratio": 4}),
    ("qr", {"ratio": 4}),  # QR keeps small tables stock: a mixed collection in the pipeline
    ("budgeted", {"budget_ratio": 3, "tail": True}),
])
def test_every_method_trains_in_the_pipeline(tmp_path: Path, tiny_data: Path, method: str, params: Dict[str, Any]) -> None:
    """Each registered method goes through DMP, the planner and the sparse-dist train pipeline."""
    if method == "budgeted":
        params = {**params, "frequencies": str(tiny_data)}
    compression = {"method": method, "params": params, "min_rows": 100}
    assert launch(str(_config(tmp_path, tiny_data, compression, steps=30, eval_every=15)), 1) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    evals = results["evaluations"]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    assert results["compression_ratio"] > 1.5


def _final_checkpoint(folder: Path, out: Path) -> Dict[str, torch.Tensor]:
    latest = folder / (folder / "latest").read_text().strip()
    dcp_to_torch_save(latest, out)
    flat: Dict[str, torch.Tensor] = {}

    def walk(d: Dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                flat[prefix + k] = v

    walk(torch.load(out, weights_only=False), "")
    return flat


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers run in sessions of their own)."""
    parents: Dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        out += children
        frontier = children
    return out


def test_kill_and_resume_equals_uninterrupted(tmp_path: Path, tiny_data: Path) -> None:
    train = dict(epochs=8, checkpoint_every=10)  # 200 steps
    whole = tmp_path / "whole"
    whole.mkdir()
    assert launch(str(_config(whole, tiny_data, checkpoint_dir=str(whole / "ckpt"), **train)), 2) == 0

    cut = tmp_path / "cut"
    cut.mkdir()
    config = _config(cut, tiny_data, checkpoint_dir=str(cut / "ckpt"), **train)
    cmd = [sys.executable, "-m", "torchrec_memcom.cli", "train", "--config", str(config), "--nproc", "2"]
    job = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "ckpt" / "step_20").exists():
        assert job.poll() is None and time.time() < deadline, "job ended before its second checkpoint"
        time.sleep(0.02)
    for pid in [job.pid, *_descendants(job.pid)]:  # torchrun and its workers, mid-run
        os.kill(pid, signal.SIGKILL)
    job.wait()
    assert not (cut / "run" / "results.json").exists(), "the job finished before it was killed"
    killed_at = (cut / "ckpt" / "latest").read_text().strip()
    log = cut / "resume.log"
    with log.open("w") as f:  # resumes from `killed_at`
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    assert code == 0, log.read_text()[-4000:]

    a = _final_checkpoint(whole / "ckpt", tmp_path / "a.pt")
    b = _final_checkpoint(cut / "ckpt", tmp_path / "b.pt")
    assert killed_at != "step_200" and a.keys() == b.keys() and len(a) > 50
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra = json.loads((whole / "run" / "results.json").read_text())
    rb = json.loads((cut / "run" / "results.json").read_text())
    assert (ra["auc"], ra["logloss"]) == (rb["auc"], rb["logloss"])


def test_resume_with_another_world_size_is_refused(tmp_path: Path, tiny_data: Path) -> None:
    config = _config(tmp_path, tiny_data, steps=5, checkpoint_dir=str(tmp_path / "ckpt"))
    assert launch(str(config), 2) == 0
    log = tmp_path / "log"
    with log.open("w") as f:
        code = subprocess.call(
            [sys.executable, "-m", "torchrec_memcom.cli", "train", "--config", str(config)],
            stdout=f, stderr=subprocess.STDOUT,
        )
    assert code != 0 and "written by 2 ranks, this job has 1" in log.read_text()


def test_torchx_component_trains_on_two_processes(tmp_path: Path, tiny_data: Path) -> None:
    config = _config(tmp_path, tiny_data, steps=8)
    torchx = Path(sys.executable).with_name("torchx")
    out = subprocess.run(
        [str(torchx), "run", "-s", "local_cwd", "launch/memcom_torchx.py:train",
         "--nproc", "2", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2 and results["step"] == 8
