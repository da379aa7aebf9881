"""A training run that resumes, stops and fails like a production job (issue 12).

The world-size-2 runs share two gloo sessions: one trains every method uninterrupted (and a
diverging config), the next resumes each from a mid-run checkpoint copied as a kill leaves it.
"""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import flat_checkpoint
from dist_utils import run_multiprocess

from torchrec_memcom.cli import main as memcom_main
from torchrec_memcom.data import CriteoParquetLoader, load_manifest, synthesize
from torchrec_memcom.data.schema import CAT_NAMES
from torchrec_memcom.train.checkpoint import (
    CHECKSUMS,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from torchrec_memcom.train.config import load_config
from torchrec_memcom.train.trainer import (
    DataError,
    DivergedError,
    _check_resume,
    _check_sizes,
    _checked,
)

METHODS = {
    "none": {"method": "none"},  # stock tables: table-wise and data-parallel at world size 2
    "hash": {"method": "hash", "params": {"ratio": 4}, "min_rows": 100},
    "qr": {"method": "qr", "params": {"ratio": 4}, "min_rows": 100},
    "memcom": {"method": "memcom", "params": {"ratio": 4}, "min_rows": 100},
    "budgeted": {"method": "budgeted", "params": {"budget_ratio": 3, "tail": True}, "min_rows": 100},
}
# 10 steps an epoch at world size 2; the cut at step 12 is mid-epoch, with losses not yet evaluated
TRAIN = dict(steps=16, checkpoint_every=4, eval_every=8)
CUT = 12
WALL_CLOCK = ("examples_per_s", "peak_memory_bytes")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "synth"
    synthesize(3040, path, seed=0, max_cardinality=300, progress=False)  # 217 validation rows
    return path


def write_config(folder: Path, data: Path, method: str = "memcom", lr: float = 0.1, **train: Any) -> Path:
    compression = json.loads(json.dumps(METHODS[method]))
    if method == "budgeted":
        compression["params"]["frequencies"] = str(data)
    config = {
        "data": {"path": str(data)},
        "model": {"dense_arch_layer_sizes": [16], "over_arch_layer_sizes": [16, 1]},
        "embeddings": {"dim": 8, "compression": compression},
        "optimizer": {"sparse": {"type": "rowwise_adagrad", "lr": lr}, "dense": {"lr": 0.1}},
        "train": {"batch_size": 128, "run_dir": str(folder / "run"), "checkpoint_dir": str(folder / "ckpt"), **train},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train_all(rank: int, world: int, configs: List[str], diverging: str) -> None:
    from torchrec_memcom.train.trainer import train

    for path in configs:
        train(load_config(path))
    with pytest.raises(
        DivergedError,
        match=r"training diverged at step \d+: the loss is not finite; likely "
        r"cause: a learning rate too high .*optimizer.sparse.lr=1e\+30",
    ):
        train(load_config(diverging))


@pytest.fixture(scope="module")
def whole_runs(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Dict[str, Path]:
    """Every method trained uninterrupted at world size 2 (and a diverging run, which must fail)."""
    root = tmp_path_factory.mktemp("whole")
    configs = {m: write_config(root / m, data, m, **TRAIN) for m in METHODS}
    diverging = write_config(root / "diverging", data, "none", lr=1e30, steps=10, eval_every=5)
    run_multiprocess(_train_all, 2, [str(c) for c in configs.values()], str(diverging))
    # seen at the first check (step 5), before the evaluation and any save there
    assert not (root / "diverging" / "run" / "results.json").exists()
    assert latest_checkpoint(root / "diverging" / "ckpt") is None
    return {m: c.parent for m, c in configs.items()}


def _without_wall_clock(results: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: v for k, v in results.items() if k not in (*WALL_CLOCK, "config")}
    out["evaluations"] = [{k: v for k, v in e.items() if k not in WALL_CLOCK} for e in results["evaluations"]]
    return out


def _resume_all(rank: int, world: int, configs: List[str]) -> None:
    from torchrec_memcom.train.trainer import train

    for path in configs:
        train(load_config(path))


def test_every_composition_resumes_as_uninterrupted(tmp_path: Path, data: Path, whole_runs: Dict[str, Path]) -> None:
    """Kill-and-resume at world size 2 for every method, the stock baseline included: a job killed
    after checkpoint ``CUT`` leaves exactly that checkpoint as ``latest`` (test_train.py kills one
    for real); resumed from it, every method ends with the uninterrupted run's weights, optimizer
    state and results, bit for bit."""
    configs = []
    for method, whole in whole_runs.items():
        cut = tmp_path / method
        configs.append(write_config(cut, data, method, **TRAIN))
        shutil.copytree(whole / "ckpt" / f"step_{CUT}", cut / "ckpt" / f"step_{CUT}")
        (cut / "ckpt" / "latest").write_text(f"step_{CUT}")
    run_multiprocess(_resume_all, 2, [str(c) for c in configs])
    for method, whole in whole_runs.items():
        cut = tmp_path / method
        a = flat_checkpoint(whole / "ckpt" / "step_16", tmp_path / f"{method}_a.pt")
        b = flat_checkpoint(cut / "ckpt" / "step_16", tmp_path / f"{method}_b.pt")
        assert a.keys() == b.keys() and any("optimizer" in k for k in a), method
        for key in a:
            assert torch.equal(a[key], b[key]), (method, key)
        ra, rb = (json.loads((f / "run" / "results.json").read_text()) for f in (whole, cut))
        assert [e["step"] for e in ra["evaluations"]] == [8, 16]
        assert _without_wall_clock(ra) == _without_wall_clock(rb), method


def test_evaluation_scores_every_row_once_on_two_ranks(tmp_path: Path, data: Path, whole_runs: Dict[str, Path]) -> None:
    """An odd number of validation rows on 2 ranks of 128-row batches: all are scored, none twice
    (the loader pads the second rank's part with a repeated row). The
    reported log loss equals the unsharded model's, scored row by row on the whole split."""
    from torchrec_memcom.export.export import TrainedModel

    results = json.loads((whole_runs["none"] / "run" / "results.json").read_text())
    rows = load_manifest(data)["splits"]["val"]["rows"]
    assert rows % 2 and results["eval_rows"] == rows
    trained = TrainedModel(whole_runs["none"] / "ckpt")
    losses = []
    for batch in CriteoParquetLoader(data, "val", 100, shuffle=False, drop_last=False):
        p = trained.predict(batch.dense_features, batch.sparse_features).double()
        losses.append(torch.nn.functional.binary_cross_entropy(p, batch.labels.double(), reduction="none"))
    assert len(torch.cat(losses)) == rows
    assert results["logloss"] == pytest.approx(float(torch.cat(losses).mean()), rel=1e-5)


def _descendants(pid: int) -> List[int]:
    parents: Dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
    out, frontier = [], [pid]
    while frontier:
        frontier = [c for c, p in parents.items() if p in frontier]
        out += frontier
    return out


def test_sigterm_stops_the_whole_job_saves_and_resumes(tmp_path: Path, data: Path, whole_runs: Dict[str, Path]) -> None:
    """SIGTERM to `memcom train` (what a scheduler sends) reaches every rank: they stop after the
    same step, save it, and the job exits 128 + 15 with one line saying so; run again, it resumes
    there (mid-segment, batches in flight) and ends as the uninterrupted run."""
    config = write_config(tmp_path / "job", data, "memcom", **TRAIN)
    cmd = [sys.executable, "-m", "torchrec_memcom.cli", "train", "--config", str(config), "--nproc", "2"]
    log = tmp_path / "job" / "log"
    with log.open("w") as out:
        job = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not (tmp_path / "job" / "ckpt" / "step_4").exists():
            assert job.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        ranks = _descendants(job.pid)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == 128 + signal.SIGTERM
    text = log.read_text()
    assert not [p for p in ranks if Path(f"/proc/{p}").exists()], "a rank outlived the job"
    stopped = latest_checkpoint(tmp_path / "job" / "ckpt")
    assert stopped is not None and stopped.name != "step_16", "the job finished before it was stopped"
    step = int(stopped.name.split("_")[1])
    assert f"memcom train: stopped by SIGTERM at step {step} of 16; saved {stopped}" in text
    assert "Traceback" not in text
    # what happened, said once: the plan per table, where results and checkpoints go
    assert text.count("results: ") == 1 and text.count(f"checkpoints: {tmp_path / 'job' / 'ckpt'}") == 1
    assert any(
        line.startswith("model.sparse_arch") and "t_cat_2 " in line and "fused" in line for line in text.splitlines()
    )
    assert text.count("is_fx_tracing will return true") <= 1
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    a = flat_checkpoint(whole_runs["memcom"] / "ckpt" / "step_16", tmp_path / "a.pt")
    b = flat_checkpoint(tmp_path / "job" / "ckpt" / "step_16", tmp_path / "b.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((f / "run" / "results.json").read_text()) for f in (whole_runs["memcom"], tmp_path / "job"))
    assert _without_wall_clock(ra) == _without_wall_clock(rb)


def test_a_loss_that_stays_far_above_the_base_rate_stops_the_run(tmp_path: Path, data: Path) -> None:
    """Rule B on one process: lr 1e6 keeps the loss finite but huge; the first window after the
    50-step warm-up stops the run, before its final evaluation and save."""
    from torchrec_memcom.train.trainer import train

    config = load_config(write_config(tmp_path, data, "none", lr=1e6, steps=100))
    with pytest.raises(
        DivergedError,
        match=r"training diverged by step 100: the mean training loss over steps "
        r"51-100 is [0-9.]+, above 1\.[0-9]+ .*base rate 0\.[0-9]+",
    ):
        train(config)
    assert not (tmp_path / "run" / "results.json").exists() and latest_checkpoint(tmp_path / "ckpt") is None


def test_results_files_are_valid_json(tmp_path: Path, data: Path) -> None:
    from torchrec_memcom.train.trainer import _write_results

    config = load_config(write_config(tmp_path, data))
    _write_results(tmp_path / "run", config, [{"step": 1, "auc": float("nan"), "logloss": float("inf")}], 2)
    text = (tmp_path / "run" / "results.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))["auc"] is None


@pytest.fixture
def one_rank() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _small_checkpoint(folder: Path) -> Path:
    state = {"w": torch.arange(64, dtype=torch.float32), "opt": {"lr": 0.5, "names": ["a", "b"]}}
    return save_checkpoint(folder, 1, state, {"run": 1}, {"progress.json": {"step": 1}})


def _fresh() -> Dict[str, Any]:
    return {"w": torch.zeros(64), "opt": {"lr": 0.0, "names": []}}


def test_checksums_catch_flipped_bytes_and_changed_files(tmp_path: Path, one_rank: None) -> None:
    path = _small_checkpoint(tmp_path)
    state = _fresh()
    load_checkpoint(path, state)
    assert torch.equal(state["w"], torch.arange(64.0)) and state["opt"] == {"lr": 0.5, "names": ["a", "b"]}
    sums = json.loads((path / CHECKSUMS).read_text())
    assert {"__0_0.distcp", ".metadata", "config.json", "progress.json"} <= set(sums)
    shard = path / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[100:108] = bytes(b ^ 0xFF for b in raw[100:108])  # eight flipped bytes
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{shard}: checksum mismatch .* the file is corrupt"):
        load_checkpoint(path, _fresh())
    (path / "extra").write_text("x")
    with pytest.raises(CheckpointError, match="extra is not in checksums.json"):
        load_checkpoint(path, _fresh())


class _Payload:
    def __reduce__(self) -> Any:
        return (os.system, ("touch PWNED",))


def test_a_crafted_checkpoint_runs_no_code(tmp_path: Path, one_rank: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .metadata pickle (or a pickled value) that would run a command is refused, even with
    checksums rewritten to match (they catch corruption, not an attacker)."""
    monkeypatch.chdir(tmp_path)
    for target in (".metadata", "__0_0.distcp"):
        path = _small_checkpoint(tmp_path / target)
        if target == ".metadata":
            (path / target).write_bytes(pickle.dumps(_Payload()))
        else:  # DCP stores non-tensor values with torch.save: a pickled object in the data file
            save_checkpoint(tmp_path / "evil", 1, {"w": torch.zeros(64), "opt": _Payload()}, {})
            path = tmp_path / "evil" / "step_1"
        sums = json.loads((path / CHECKSUMS).read_text())
        from torchrec_memcom.train.checkpoint import _digest

        sums.update({n: _digest(path / n) for n in sums})
        (path / CHECKSUMS).write_text(json.dumps(sums))
        with pytest.raises(CheckpointError, match=f"{path}: cannot load the checkpoint"):
            load_checkpoint(path, _fresh())
        assert not (tmp_path / "PWNED").exists()


def test_a_resume_with_other_config_or_data_is_refused_unless_allowed(
    tmp_path: Path, data: Path, one_rank: None
) -> None:
    from torchrec_memcom.train.checkpoint import DATA, PROGRESS
    from torchrec_memcom.train.config import as_dict

    config = load_config(write_config(tmp_path / "a", data, "memcom", **TRAIN))
    manifest = load_manifest(data)
    progress = {"step": 4, "world_size": 1}
    path = save_checkpoint(
        tmp_path / "ck", 4, {"w": torch.zeros(2)}, as_dict(config), {PROGRESS: progress, DATA: manifest}
    )
    moved = load_config(write_config(tmp_path / "b", data, "memcom", **TRAIN))  # other folders only
    assert _check_resume(path, moved, manifest, 1, False) == progress
    changed = load_config(write_config(tmp_path / "c", data, "memcom", lr=0.2, **TRAIN))
    with pytest.raises(CheckpointError, match=r"config optimizer\.sparse\.lr: 0\.1 -> 0\.2.*--allow-changes"):
        _check_resume(path, changed, manifest, 1, False)
    other = json.loads(json.dumps(manifest))
    other["splits"]["train"]["rows"] += 1
    with pytest.raises(CheckpointError, match=r"data manifest splits\.train\.rows: \d+ -> \d+"):
        _check_resume(path, config, other, 1, False)
    assert _check_resume(path, changed, other, 1, True) == progress
    with pytest.raises(CheckpointError, match="written by 1 ranks, this job has 2"):
        _check_resume(path, config, manifest, 2, True)


def test_ids_beyond_a_table_are_refused_naming_feature_and_bound(tmp_path: Path, data: Path) -> None:
    """For every table, stock ones too (FBGEMM would map them to row 0 and only log it)."""
    config = load_config(write_config(tmp_path, data, "none"))
    manifest = load_manifest(data)
    sizes = [manifest["features"][f]["num_embeddings"] for f in CAT_NAMES]
    _check_sizes(config, manifest, sizes, CAT_NAMES)
    small = list(sizes)
    small[3] -= 1
    with pytest.raises(DataError, match=rf"num_embeddings\[3\]: table t_cat_3 has {small[3]} rows.*cat_3"):
        _check_sizes(config, manifest, small, CAT_NAMES)
    batches = list(CriteoParquetLoader(data, "train", 64, shuffle=False))
    bounds = dict(zip(CAT_NAMES, sizes))
    assert len(list(_checked(batches, bounds, "train"))) == len(batches)
    values = batches[0].sparse_features.to_dict()["cat_7"].values()
    bounds["cat_7"] = int(values.max())  # the largest id is now one past the table
    with pytest.raises(
        DataError,
        match=rf"train, batch 0: feature cat_7 has id {bounds['cat_7']}.*"
        rf"num_embeddings {bounds['cat_7']}",
    ):
        list(_checked(batches, bounds, "train"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("optimizer: {sparse: {lr: .inf}}", "optimizer.sparse.lr: must be a finite number > 0, got inf"),
        ("optimizer: {dense: {lr: inf}}", "optimizer.dense.lr: must be a finite number > 0, got inf"),
        ("optimizer: {sparse: {lr: .nan}}", "optimizer.sparse.lr: must be a finite number > 0, got nan"),
    ],
)
def test_learning_rates_must_be_finite(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_expected_failures_are_one_line_and_debug_shows_the_traceback(
    tmp_path: Path, one_rank: None, capsys: pytest.CaptureFixture[str], data: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {batchsize: 3}")
    cases = [
        (["train", "--config", str(bad)], f"memcom train: error: {bad}: unknown key train.batchsize"),
        (["train", "--config", str(bad), "--nproc", "0"], "memcom train: error: "),
        (
            ["train", "--config", str(write_config(tmp_path, data)), "--nproc", "0"],
            "memcom train: error: --nproc: must be >= 1, got 0",
        ),
        (
            ["data", "synth", "--rows", "10", "--out", str(tmp_path / "d"), "--rows-per-shard", "0"],
            "memcom data synth: error: --rows-per-shard: must be >= 1, got 0",
        ),
    ]
    for argv, message in cases:
        assert memcom_main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    with pytest.raises(ValueError, match="unknown key train.batchsize"):
        memcom_main(["train", "--config", str(bad), "--debug"])


def test_export_of_a_corrupt_checkpoint_is_one_line(
    tmp_path: Path, whole_runs: Dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """DCP's CheckpointException derives from BaseException: it must still end as one line."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(whole_runs["hash"] / "ckpt" / "step_16", ckpt)
    (ckpt / ".metadata").write_bytes(b"not a pickle")
    assert memcom_main(["export", str(ckpt), "--out", str(tmp_path / "m.pt"), "--no-check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"memcom export: error: {ckpt / '.metadata'}: checksum mismatch") and err.count("\n") == 1
    from torchrec_memcom.train.checkpoint import _digest

    sums = json.loads((ckpt / CHECKSUMS).read_text())  # checksums that match: DCP's own error
    sums[".metadata"] = _digest(ckpt / ".metadata")
    (ckpt / CHECKSUMS).write_text(json.dumps(sums))
    assert memcom_main(["export", str(ckpt), "--out", str(tmp_path / "m.pt"), "--no-check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"memcom export: error: {ckpt}: cannot load the checkpoint") and err.count("\n") == 1
    (ckpt / CHECKSUMS).unlink()
    assert memcom_main(["export", str(ckpt), "--out", str(tmp_path / "m.pt"), "--no-check"]) == 1
    err = capsys.readouterr().err
    assert "checksums.json: cannot read the checksums" in err and err.count("\n") == 1


def _data_parallel_grads(rank: int, world: int) -> None:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from torchrec_memcom.train.trainer import FBGEMM_AUTOGRAD_WARNING

    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=50, feature_names=[f"f{i}"], pooling=pooling)
        for i, pooling in enumerate([PoolingType.SUM, PoolingType.MEAN])
    ]
    torch.manual_seed(0)
    reference = EmbeddingBagCollection(tables)
    sharded_ebc = EmbeddingBagCollection(tables, device=torch.device("meta"))
    plan = ShardingPlan(
        {
            "": construct_module_sharding_plan(
                sharded_ebc, {t.name: data_parallel() for t in tables}, world_size=world, device_type="cpu"
            )
        }
    )
    model = DistributedModelParallel(
        sharded_ebc, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=torch.device("cpu"), plan=plan
    )
    model.load_state_dict(reference.state_dict())
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 4, (2 * world * 3,), generator=g)
    values = torch.randint(0, 50, (int(lengths.sum()),), generator=g)
    full = KeyedJaggedTensor.from_lengths_sync(["f0", "f1"], values, lengths)  # 6 examples a rank
    mine = _slice(full, rank * 3, rank * 3 + 3, world * 3)
    weights = torch.randn(world * 3, 16, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(mine)
        (out.values() * weights[rank * 3 : rank * 3 + 3]).sum().backward()
    assert any(re.match(FBGEMM_AUTOGRAD_WARNING, str(w.message)) for w in caught)
    ref = reference(full)
    (ref.values() * weights).sum().div(world).backward()  # DDP averages the ranks' gradients
    params = dict(model.named_parameters())
    assert len(params) == 2
    for name, p in params.items():
        expected = reference.embedding_bags[name.split(".")[-2]].weight.grad
        assert expected.abs().sum() > 0
        torch.testing.assert_close(p.grad, expected, msg=name)


def _slice(kjt: Any, start: int, stop: int, batch: int) -> Any:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    d = kjt.to_dict()
    values = [d[k].values()[d[k].offsets()[start] : d[k].offsets()[stop]] for k in kjt.keys()]
    lengths = [d[k].lengths()[start:stop] for k in kjt.keys()]
    return KeyedJaggedTensor.from_lengths_sync(kjt.keys(), torch.cat(values), torch.cat(lengths))


def test_fbgemm_autograd_warning_for_data_parallel_tables_is_harmless() -> None:
    """The warning the trainer silences: data-parallel SUM and MEAN tables warn that "an autograd
    kernel was not registered", and their gradients equal the unsharded tables' all the same."""
    run_multiprocess(_data_parallel_grads, 2)
