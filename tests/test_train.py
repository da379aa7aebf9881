"""The training app: configs, checkpoints, a 2-process run, kill-and-resume, the demo, torchx."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import REPO, flat_checkpoint
from torch.distributed.checkpoint.api import CheckpointException

from torchrec_memcom.cli import main as memcom_main
from torchrec_memcom.data import load_manifest
from torchrec_memcom.data.schema import CAT_NAMES
from torchrec_memcom.registry import methods
from torchrec_memcom.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from torchrec_memcom.train.cli import launch
from torchrec_memcom.train.config import load_config
from torchrec_memcom.train.model import build_model


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from torchrec_memcom.data import synthesize

    path = tmp_path_factory.mktemp("data") / "synth"
    synthesize(8000, path, seed=0, max_cardinality=2000, progress=False)
    return path


def _config(
    tmp: Path, data: Path, compression: Optional[Dict[str, Any]] = None, arch: str = "DLRM", **train: Any
) -> Path:
    config: Dict[str, Any] = {
        "data": {"path": str(data)},
        "model": {"arch": arch, "dense_arch_layer_sizes": [16], "over_arch_layer_sizes": [16, 1]},
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
        ("train: {eval_every: -1}", "train.eval_every: must be >= 0"),
        ("train: {checkpoint_every: -5, checkpoint_dir: ck}", "train.checkpoint_every: must be >= 0"),
        ("train: {checkpoint_every: 10}", "train.checkpoint_every: set train.checkpoint_dir"),
        ("train: {eval_batches: 0}", "train.eval_batches: must be >= 1"),
        ("optimizer: {sparse: {lr: -0.1}}", "optimizer.sparse.lr: must be a finite number > 0"),
        ("optimizer: {dense: {lr: 0}}", "optimizer.dense.lr: must be a finite number > 0"),
        ("model: {dense_arch_layer_sizes: [16, 0]}", "model.dense_arch_layer_sizes: sizes must be >= 1"),
        ("embeddings: {num_embeddings: [10, 20]}", "embeddings.num_embeddings: expected 26 sizes"),
        (
            "embeddings: {compression: {method: memcom, params: {ratoi: 16}}}",
            "embeddings.compression.params.ratoi: unknown key",
        ),
        (
            "embeddings: {compression: {method: memcom, params: {ratio: 0.5}}}",
            "embeddings.compression.params: MEmComConfig.ratio must be >= 1",
        ),
        ("embeddings: {compression: {method: qr, params: {ratio: many}}}", "embeddings.compression.params: "),
        (
            "embeddings: {compression: {method: budgeted, params: {budget_ratoi: 8}}}",
            "embeddings.compression.params.budget_ratoi: unknown key",
        ),
        (
            "embeddings: {compression: {method: none, params: {ratio: 4}}}",
            "embeddings.compression.params: method none takes no params",
        ),
        (
            "embeddings: {compression: {tables: {t_cat_3: {method: hash, params: {rows: 5}}}}}",
            "embeddings.compression.tables.t_cat_3.params.rows: unknown key",
        ),
        (
            "embeddings: {compression: {tables: {t_cat_99: {method: none}}}}",
            "embeddings.compression.tables.t_cat_99: no such table",
        ),
        (
            "embeddings: {compression: {method: memcom, params: {ratio: 4}, min_rows: -1}}",
            "embeddings.compression.min_rows: must be >= 0",
        ),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_bad_compression_params_stop_the_launcher(tmp_path: Path) -> None:
    """A typo fails once, before torchrun starts any rank; every method's params are checked."""
    assert all(dataclasses.is_dataclass(m.config) for m in methods())  # each has a typed config
    path = _config(tmp_path, tmp_path / "no_data", {"method": "hash", "params": {"ratoi": 4}})
    with pytest.raises(ValueError, match="embeddings.compression.params.ratoi: unknown key"):
        launch(str(path), 2)


def test_empty_dense_arch_is_one_layer_of_the_embedding_dim(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {dense_arch_layer_sizes: []}\nembeddings: {dim: 8}")
    model, _ = build_model(load_config(path), [10] * 26, torch.device("cpu"))
    assert model.model.dense_arch(torch.randn(3, 13)).shape == (3, 8)


@pytest.fixture
def one_rank() -> Iterator[None]:
    """A one-process gloo group, for the collective checkpoint functions."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _save(folder: Path, step: int, value: float) -> None:
    save_checkpoint(folder, step, {"w": torch.full((4,), value), "progress": {"step": step}}, {"step": step})


def _load_latest(folder: Path) -> Tuple[int, float]:
    path = latest_checkpoint(folder)
    assert path is not None
    state: Dict[str, Any] = {"w": torch.zeros(4), "progress": {"step": -1}}
    load_checkpoint(path, state)
    assert json.loads((path / "config.json").read_text()) == {"step": state["progress"]["step"]}
    return state["progress"]["step"], float(state["w"][0])


def test_saving_the_latest_step_again_is_refused(tmp_path: Path, one_rank: None) -> None:
    _save(tmp_path, 10, 1.0)
    with pytest.raises(ValueError, match="step_10 is the latest checkpoint already"):
        _save(tmp_path, 10, 2.0)
    assert _load_latest(tmp_path) == (10, 1.0)


class _Killed(Exception):
    pass


def test_a_save_killed_at_any_point_leaves_latest_complete(
    tmp_path: Path, one_rank: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop a save of step 20 at each of its renames and deletions in turn (DCP's own included),
    over a complete ``step_20`` that ``latest`` does not name yet (what a save killed after its
    rename leaves): ``latest`` names a complete checkpoint throughout, and saving again works."""
    countdown = [0]

    def killable(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            countdown[0] -= 1
            if countdown[0] == 0:
                raise _Killed
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(os, "replace", killable(os.replace))
    monkeypatch.setattr(os, "rename", killable(os.rename))
    monkeypatch.setattr(shutil, "rmtree", killable(shutil.rmtree))
    for kill_at in range(1, 50):
        folder = tmp_path / str(kill_at)
        _save(folder, 10, 1.0)
        shutil.copytree(folder / "step_10", folder / "step_20")  # complete, but not `latest`
        countdown[0] = kill_at
        try:
            _save(folder, 20, 2.0)
            killed = False
        except (_Killed, CheckpointException):  # DCP wraps what its writer raised
            assert countdown[0] == 0
            killed = True
            assert _load_latest(folder) == (10, 1.0)
        countdown[0] = -1  # no more kills: the resumed run saves step 20 again
        if killed:
            _save(folder, 20, 2.0)
        assert _load_latest(folder) == (20, 2.0)
        assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_10", "step_20"]
        if not killed:
            break
    assert kill_at > 4, "the save was never stopped at its renames"


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


@pytest.mark.parametrize(
    "method, params, arch",
    [
        ("hash", {"ratio": 4}, "DLRM"),
        ("qr", {"ratio": 4}, "DLRM"),  # QR keeps small tables stock: a mixed collection in the pipeline
        ("budgeted", {"budget_ratio": 3, "tail": True}, "DLRM"),
        ("memcom", {"ratio": 4}, "DLRM_DCN"),
    ],
)
def test_every_method_trains_in_the_pipeline(
    tmp_path: Path, tiny_data: Path, method: str, params: Dict[str, Any], arch: str
) -> None:
    """Each registered method goes through DMP, the planner and the sparse-dist train pipeline."""
    if method == "budgeted":
        params = {**params, "frequencies": str(tiny_data)}
    compression = {"method": method, "params": params, "min_rows": 100}
    assert launch(str(_config(tmp_path, tiny_data, compression, arch, steps=30, eval_every=15)), 1) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    evals = results["evaluations"]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    assert results["compression_ratio"] > 1.5


def _final_checkpoint(folder: Path, out: Path) -> Dict[str, torch.Tensor]:
    return flat_checkpoint(folder / (folder / "latest").read_text().strip(), out)


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
    # 104 steps (26 an epoch); an evaluation every other checkpoint, so that the run is killed
    # with evaluations in its history and (at an odd checkpoint) training losses not yet reported
    train = dict(epochs=4, checkpoint_every=10, eval_every=20)
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
    killed_at = (cut / "ckpt" / "latest").read_text().strip()
    assert killed_at != "step_104", "the job finished before it was killed"
    log = cut / "resume.log"
    with log.open("w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    assert code == 0, log.read_text()[-4000:]
    assert f"resumed from {cut / 'ckpt' / killed_at}" in log.read_text()

    a = _final_checkpoint(whole / "ckpt", tmp_path / "a.pt")
    b = _final_checkpoint(cut / "ckpt", tmp_path / "b.pt")
    assert a.keys() == b.keys() and len(a) > 50
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra = json.loads((whole / "run" / "results.json").read_text())
    rb = json.loads((cut / "run" / "results.json").read_text())
    assert [e["step"] for e in ra["evaluations"]] == [20, 40, 60, 80, 100, 104]
    wall_clock = ("examples_per_s", "peak_memory_bytes")
    for ea, eb in zip([ra, *ra["evaluations"]], [rb, *rb["evaluations"]], strict=True):
        for key in (*wall_clock, "evaluations", "config"):  # the configs differ in their folders
            ea.pop(key, None), eb.pop(key, None)
        assert ea == eb and ea["train_loss"] is not None


def test_resuming_a_finished_run_changes_nothing_and_another_world_size_is_refused(
    tmp_path: Path, tiny_data: Path
) -> None:
    config = _config(
        tmp_path, tiny_data, steps=6, eval_every=3, checkpoint_every=3, checkpoint_dir=str(tmp_path / "ckpt")
    )
    assert launch(str(config), 2) == 0
    results = (tmp_path / "run" / "results.json").read_text()
    assert [e["step"] for e in json.loads(results)["evaluations"]] == [3, 6]
    ckpt = tmp_path / "ckpt"
    saved = {str(p.relative_to(ckpt)): p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    assert (ckpt / "latest").read_text() == "step_6" and "step_6/.metadata" in saved

    assert launch(str(config), 2) == 0  # resumes at the end: no evaluation, no save
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == json.loads(results)
    assert {str(p.relative_to(ckpt)): p.stat().st_mtime_ns for p in ckpt.rglob("*")} == saved
    log = tmp_path / "log"
    with log.open("w") as f:
        code = subprocess.call(
            [sys.executable, "-m", "torchrec_memcom.cli", "train", "--config", str(config)],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    assert code != 0 and "written by 2 ranks, this job has 1" in log.read_text()


def test_demo_trains_both_configs_side_by_side(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """`memcom demo`, shrunk: its shipped configs (found beside the package) on 8000 synthetic
    rows for 4 steps; MEmCom's tables hold fewer bytes than the stock ones, table by table."""
    assert memcom_main(["demo", "--nproc", "1", "--steps", "4", "--rows", "8000", "--out", str(tmp_path)]) == 0
    out = capfd.readouterr().out
    for name in ("synthetic_uncompressed", "synthetic_memcom"):  # AUC, logloss, MB, ratio, examples/s
        assert re.search(rf"^{name}(\s+[0-9.]+){{3}}\s+[0-9.]+x\s+[0-9]+$", out, re.M), out
    assert re.search(r"^t_cat_25\s+[0-9,]+\s+[0-9,]+\s+[0-9.]+x$", out, re.M)  # final per-table bytes
    stock, memcom = (
        json.loads((tmp_path / name / "results.json").read_text())
        for name in ("synthetic_uncompressed", "synthetic_memcom")
    )
    assert stock["step"] == memcom["step"] == 4 and stock["compression_ratio"] == 1.0
    features = load_manifest(tmp_path / "data" / "synthetic_8000rows")["features"]
    rows = {f"t_{f}": features[f]["num_embeddings"] for f in CAT_NAMES}
    small, large = stock["embedding_bytes_per_table"], memcom["embedding_bytes_per_table"]
    assert small.keys() == large.keys() == rows.keys() and len(rows) == 26
    for table, n in rows.items():
        assert small[table] == n * 32 * 4
        assert (large[table] < small[table]) if n >= 1000 else (large[table] == small[table]), table
    assert memcom["compression_ratio"] > 4


def test_torchx_component_trains_on_two_processes(tmp_path: Path, tiny_data: Path) -> None:
    config = _config(tmp_path, tiny_data, steps=8)
    torchx = Path(sys.executable).with_name("torchx")
    out = subprocess.run(
        [
            str(torchx),
            "run",
            "-s",
            "local_cwd",
            "launch/memcom_torchx.py:train",
            "--nproc",
            "2",
            "--config",
            str(config),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2 and results["step"] == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_and_export_on_cuda(tmp_path: Path, tiny_data: Path) -> None:
    """A short `memcom train` on one GPU (nccl, fused tables on cuda) learns, and its checkpoint
    exports to a CPU TorchScript file whose predictions equal the model's."""
    from torchrec_memcom.export import export_checkpoint

    config = _config(tmp_path, tiny_data, steps=30, eval_every=15, checkpoint_dir=str(tmp_path / "ckpt"))
    assert launch(str(config), 1) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    evals = results["evaluations"]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] and results["world_size"] == 1
    report = export_checkpoint(tmp_path / "ckpt", tmp_path / "model.pt", "fp32", check_rows=None)
    assert report["check"]["passed"] and report["check"]["max_abs_diff"] <= 1e-5
