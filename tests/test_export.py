"""`memcom export`: a 2-rank checkpoint -> one TorchScript file that plain torch runs, checked.

A tiny MEmCom DLRM is trained on 2 processes on raw Criteo-format lines converted in mod mode,
so the raw-line path (example script, `memcom score`) can be compared with the data path; a
budgeted one (with stock small tables) is trained a few steps on 2 processes too.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import REPO, small_tables
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_memcom.cli import main as memcom
from torchrec_memcom.data import CriteoParquetLoader, convert, load_manifest, synthesize, write_synthetic_tsv
from torchrec_memcom.data.schema import CAT_NAMES, kaggle_split
from torchrec_memcom.export.export import (
    PROBE_TOLERANCE,
    TOLERANCES,
    ExportCheckError,
    TrainedModel,
    compare_probe,
    export_checkpoint,
    raw_id_map,
    script,
)
from torchrec_memcom.export.inference import load_model
from torchrec_memcom.export.raw import RawLineError, parse_lines
from torchrec_memcom.inference import inference_model
from torchrec_memcom.inference.stores import JoinedEmbeddings, TieredEmbeddings
from torchrec_memcom.inference.tables import ExportError, build_embeddings, collect_tables
from torchrec_memcom.modules.budget_allocation import Allocation, TableAllocation, Tier
from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection
from torchrec_memcom.modules.memcom_config import MEmComConfig
from torchrec_memcom.modules.memcom_embedding_bag import MEmComEmbeddingBagCollection
from torchrec_memcom.modules.mixed_embedding_bag import MixedEmbeddingBagCollection
from torchrec_memcom.train.checkpoint import DATA, PROGRESS, save_checkpoint
from torchrec_memcom.train.cli import launch
from torchrec_memcom.train.config import as_dict, load_config
from torchrec_memcom.train.model import build_model

ROWS = 8000
SMALL = {5, 8, 16, 19}  # features given 50 ids: below min_rows, so their tables stay stock
SIZES = [50 if i in SMALL else 3000 for i in range(len(CAT_NAMES))]


@pytest.fixture(scope="module")
def raw_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "day.tsv"
    write_synthetic_tsv(path, ROWS, seed=0, max_cardinality=2000, progress=False)
    return path


@pytest.fixture(scope="module")
def mod_data(raw_tsv: Path) -> Path:
    out = raw_tsv.parent / "mod"
    convert([str(raw_tsv)], out, num_embeddings=SIZES, progress=False)
    return out


def _train_on_2_ranks(data: Path, work: Path, compression: Dict[str, Any], **train: Any) -> Path:
    """A DLRM (dim 8) trained on 2 processes in ``work``: its checkpoint_dir, sharded over 2 ranks."""
    work.mkdir()
    config = {
        "data": {"path": str(data)},
        "model": {"dense_arch_layer_sizes": [16], "over_arch_layer_sizes": [16, 1]},
        "embeddings": {"dim": 8, "compression": compression},
        "optimizer": {"sparse": {"type": "rowwise_adagrad", "lr": 0.1}, "dense": {"lr": 0.1}},
        "train": {"batch_size": 128, **train, "run_dir": str(work / "run"), "checkpoint_dir": str(work / "ckpt")},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert launch(str(path), 2) == 0
    return work / "ckpt"


@pytest.fixture(scope="module")
def checkpoint(mod_data: Path) -> Path:
    """A MEmCom DLRM trained on 2 processes: a checkpoint sharded over 2 ranks."""
    compression = {"method": "memcom", "params": {"ratio": 4}, "min_rows": 100}
    return _train_on_2_ranks(mod_data, mod_data.parent / "train", compression, epochs=2)


@pytest.fixture(scope="module")
def budgeted_checkpoint(mod_data: Path) -> Path:
    """Budgeted tables (heuristic tiers, MEmCom tail) and stock small ones, 10 steps on 2 processes."""
    params = {"budget_ratio": 3, "tail": True, "frequencies": str(mod_data)}
    compression = {"method": "budgeted", "params": params, "min_rows": 100}
    return _train_on_2_ranks(mod_data, mod_data.parent / "train_budgeted", compression, steps=10)


@pytest.fixture(scope="module")
def exported(checkpoint: Path) -> Dict[str, Tuple[Path, Dict[str, Any]]]:
    out = {}
    for precision in ("int8", "fp16"):
        file = checkpoint.parent / f"model_{precision}.pt"
        out[precision] = (file, export_checkpoint(checkpoint, file, precision, check_rows=None))
    return out


def _val_rows(data: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense features and ids [B, 26] of the validation split, in file order."""
    dense, ids = [], []
    for batch in CriteoParquetLoader(data, "val", 4096, shuffle=False, drop_last=False):
        dense.append(batch.dense_features)
        ids.append(batch.sparse_features.values().view(len(CAT_NAMES), -1).t())
    return torch.cat(dense), torch.cat(ids)


def _split_lines(raw_tsv: Path, split: str) -> List[str]:
    start, stop = kaggle_split(ROWS)[split]
    return raw_tsv.read_text().splitlines(keepends=True)[start:stop]


def _plain_torch_env(tmp: Path) -> Dict[str, str]:
    """An environment whose Python sees torch and its own imports only: no torchrec, no FBGEMM."""
    code = "import sys, torch; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    site = Path(torch.__file__).resolve().parents[1]
    farm = tmp / "site"
    farm.mkdir(exist_ok=True)
    for entry in site.iterdir():
        if entry.name.split(".")[0] in names and not (farm / entry.name).exists():
            (farm / entry.name).symlink_to(entry)
    assert not any(farm.glob("torchrec*")) and not any(farm.glob("fbgemm*"))
    return {**os.environ, "PYTHONPATH": str(farm)}


def _run_plain(tmp: Path, args: List[str]) -> subprocess.CompletedProcess:
    """``python -S ARGS`` (no site-packages) with only torch importable."""
    return subprocess.run(
        [sys.executable, "-S", *args], env=_plain_torch_env(tmp), capture_output=True, text=True, timeout=120
    )


# --- export of the 2-rank checkpoint ---------------------------------------------------------


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_export_matches_trained_model_and_reports_real_sizes(
    precision: str, checkpoint: Path, exported: Dict[str, Tuple[Path, Dict[str, Any]]]
) -> None:
    step = checkpoint / (checkpoint / "latest").read_text()
    assert len(list(step.glob("*.distcp"))) == 2  # sharded by the 2 ranks
    file, report = exported[precision]
    check = report["check"]
    assert check["passed"] and check["rows"] == kaggle_split(ROWS)["val"][1] - kaggle_split(ROWS)["val"][0]
    assert 0 < check["max_abs_diff"] <= TOLERANCES[precision]["max_abs_diff"]
    assert abs(check["auc_change"]) <= TOLERANCES[precision]["auc_change"]
    assert check["auc_trained"] > 0.55
    # ... and against the sharded model's own outputs, which training recorded on 2 x 64 rows
    as_trained = report["check_as_trained"]
    assert as_trained["passed"] and (as_trained["rows"], as_trained["ranks"]) == (128, 2)
    assert as_trained["max_abs_diff_rebuilt"] <= as_trained["tolerance_rebuilt"]

    assert report["file_bytes"] == file.stat().st_size
    assert report["file_bytes"] == sum(report["tensor_bytes"].values()) + report["format_overhead_bytes"]
    assert 0 < report["format_overhead_bytes"] < 64 * 1024
    assert {f"t_{f}": m for f, m in zip(CAT_NAMES, report["methods"].values())} == {
        f"t_{f}": "none" if i in SMALL else "memcom" for i, f in enumerate(CAT_NAMES)
    }

    # sizes, recomputed from the model and the training run's own accounting
    model = load_model(file)
    rows = model.embeddings.rows.shape[0]
    compressed_n = sum(n for i, n in enumerate(SIZES) if i not in SMALL)
    row_bytes = 8 + 4 if precision == "int8" else 8 * 2
    assert report["tensor_bytes"]["tables"] == rows * row_bytes
    assert report["tensor_bytes"]["entity_scalars"] == (compressed_n + 1) * 2  # fp16
    dense = sum(p.numel() * 4 for p in model.parameters())
    results = json.loads((checkpoint.parent / "run" / "results.json").read_text())
    assert report["fp32_uncompressed_bytes"] == results["uncompressed_embedding_bytes"] + dense
    assert report["fp32_trained_bytes"] == results["embedding_bytes"] + dense
    assert report["ratio_vs_fp32_uncompressed"] == report["fp32_uncompressed_bytes"] / report["file_bytes"]
    meta = json.loads(model.metadata)
    assert meta["precision"] == precision and meta["id_map"]["kind"] == "mod"


def test_a_model_other_than_the_sharded_one_fails_the_check(
    checkpoint: Path, exported: Dict[str, Tuple[Path, Dict[str, Any]]]
) -> None:
    """The reference is the sharded model as trained (its recorded outputs), not only the
    unsharded rebuild: a rebuild that computes something else is caught."""
    trained = TrainedModel(checkpoint)
    file, _ = exported["fp16"]
    assert compare_probe(load_model(file), trained, TOLERANCES["fp16"]["max_abs_diff"])["passed"]
    trained.probe["logits"][1][5] += 0.5  # as if the sharded model had computed another value
    result = compare_probe(load_model(file), trained, TOLERANCES["fp16"]["max_abs_diff"])
    assert not result["passed"] and result["max_abs_diff_rebuilt"] > 0.05
    trained.probe["step"] -= 1  # recorded at another step than the checkpoint's: not compared
    assert compare_probe(load_model(file), trained, 1e-5) is None


def test_int8_file_is_smaller_than_fp16(exported: Dict[str, Tuple[Path, Dict[str, Any]]]) -> None:
    assert exported["int8"][0].stat().st_size < exported["fp16"][0].stat().st_size


def test_exported_tables_are_inference_models_collection(
    checkpoint: Path, exported: Dict[str, Tuple[Path, Dict[str, Any]]]
) -> None:
    """The file's [B, 26] lookup is inference_model's collection read one id per feature: the
    same vectors as that collection's KJT forward, in the same precision."""
    trained = TrainedModel(checkpoint)
    collection = inference_model(trained.dlrm, "int8").sparse_arch.embedding_bag_collection
    batch = next(iter(CriteoParquetLoader(trained.data_dir, "val", 64, shuffle=False)))
    kjt = batch.sparse_features
    pooled = collection(kjt).to_dict()
    expected = torch.stack([pooled[f] for f in CAT_NAMES], 1)
    with torch.no_grad():
        got = load_model(exported["int8"][0]).embed(kjt.values().view(len(CAT_NAMES), -1).t())
    assert torch.allclose(got, expected, atol=1e-6)


def test_budgeted_checkpoint_exports_exactly_in_fp32_and_within_tolerance_in_int8(
    tmp_path: Path, budgeted_checkpoint: Path
) -> None:
    step = budgeted_checkpoint / (budgeted_checkpoint / "latest").read_text()
    assert len(list(step.glob("*.distcp"))) == 2  # sharded by the 2 ranks
    files = {p: tmp_path / f"model_{p}.pt" for p in ("fp32", "int8")}
    reports = {p: export_checkpoint(budgeted_checkpoint, f, p, check_rows=None) for p, f in files.items()}
    methods = {f"t_{f}": "none" if i in SMALL else "budgeted" for i, f in enumerate(CAT_NAMES)}
    assert reports["fp32"]["methods"] == methods
    assert reports["fp32"]["check"]["passed"] and reports["fp32"]["check"]["max_abs_diff"] <= 1e-6
    # a mixed collection (budgeted + plain tables) rebuilt unsharded is the model as trained
    assert all(r["check_as_trained"]["passed"] for r in reports.values())
    assert reports["fp32"]["check_as_trained"]["max_abs_diff_exported"] <= PROBE_TOLERANCE
    check = reports["int8"]["check"]
    assert check["passed"] and 0 < check["max_abs_diff"] <= TOLERANCES["int8"]["max_abs_diff"]
    assert abs(check["auc_change"]) <= TOLERANCES["int8"]["auc_change"]

    # what the int8 file holds: every tier's rows, tail scalars, ranks and projections
    model = load_model(files["int8"])
    tables = json.loads(model.metadata)["tables"].values()
    tiers = [x for t in tables if t["method"] == "budgeted" for x in t["tiers"]]
    assert max(len(t.get("tiers", [])) for t in tables) > 1 and any(x["memcom"] for x in tiers)
    report = reports["int8"]
    stock_rows = sum(t["rows"] for t in tables if t["method"] == "none")
    tier_bytes = sum(x["stored_rows"] * (x["dim"] + 4) for x in tiers)  # int8 codes, fp16 scale and bias
    assert report["tensor_bytes"]["tables"] == stock_rows * (8 + 4) + tier_bytes
    assert report["tensor_bytes"]["entity_scalars"] == 2 * (sum(x["rows"] for x in tiers if x["memcom"]) + 2)
    remapped = [t["n"] for t in tables if t.get("remap")]
    assert remapped and report["tensor_bytes"]["remap"] == 2 * sum(remapped)  # int16: n = 3000
    assert model.embeddings.tiered.remap.dtype == torch.int16
    results = json.loads((budgeted_checkpoint.parent / "run" / "results.json").read_text())
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert report["fp32_trained_bytes"] == results["embedding_bytes"] + dense_bytes
    assert report["file_bytes"] == files["int8"].stat().st_size < reports["fp32"]["file_bytes"]


def test_exported_file_runs_with_plain_torch_only(
    tmp_path: Path, mod_data: Path, exported: Dict[str, Tuple[Path, Dict[str, Any]]]
) -> None:
    file, _ = exported["int8"]
    dense, ids = _val_rows(mod_data)
    torch.save({"dense": dense[:64], "ids": ids[:64]}, tmp_path / "inputs.pt")
    expected = load_model(file)(dense[:64], ids[:64])
    script = f"""
import json, sys, warnings
import torch
warnings.simplefilter("ignore")
m = torch.jit.load({str(file)!r})
x = torch.load({str(tmp_path / "inputs.pt")!r})
p = m(x["dense"], x["ids"])
for name in ("torchrec", "fbgemm_gpu"):
    try:
        __import__(name)
        sys.exit(name + " is importable")
    except ImportError:
        pass
print(json.dumps(p.tolist()))
"""
    run = _run_plain(tmp_path, ["-c", script])
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.allclose(torch.tensor(json.loads(run.stdout)), expected, atol=1e-6)
    # and no op of the compiled code comes from FBGEMM or TorchRec
    model = load_model(file)
    graphs = " ".join(str(getattr(model, m).inlined_graph) for m in ("forward", "score_raw", "embed"))
    assert "aten::index_select" in graphs
    assert not re.search(r"\b(fbgemm|torchrec)::", graphs)


def test_example_and_memcom_score_give_the_data_path_scores(
    tmp_path: Path,
    raw_tsv: Path,
    mod_data: Path,
    exported: Dict[str, Tuple[Path, Dict[str, Any]]],
    capsys: pytest.CaptureFixture,
) -> None:
    file, _ = exported["int8"]
    lines = _split_lines(raw_tsv, "val")
    val = tmp_path / "val.tsv"
    val.write_text("".join(lines))
    dense, ids = _val_rows(mod_data)
    expected = load_model(file)(dense, ids)

    run = _run_plain(tmp_path, [str(REPO / "examples" / "score_raw_criteo.py"), str(file), str(val)])
    assert run.returncode == 0, run.stderr[-2000:]
    example = torch.tensor([float(v) for v in run.stdout.split()])
    assert example.shape == expected.shape and torch.allclose(example, expected, atol=1e-6)

    out = tmp_path / "scores.txt"
    assert memcom(["score", str(file), str(val), "--out", str(out), "--batch-size", "100"]) == 0
    assert out.read_text() == run.stdout
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["rows"] == len(lines) and summary["auc"] == pytest.approx(
        exported["int8"][1]["check"]["auc_exported"],
        abs=1e-4,  # scores printed with 6 decimals
    )


def test_example_scores_real_criteo_lines(
    tmp_path: Path, criteo_sample: Path, exported: Dict[str, Tuple[Path, Dict[str, Any]]]
) -> None:
    with criteo_sample.open() as f:
        head = [next(f) for _ in range(5)]
    lines = tmp_path / "criteo.tsv"
    lines.write_text("".join(head[:3]) + "".join(line.split("\t", 1)[1] for line in head[3:]))
    file, _ = exported["int8"]
    run = _run_plain(tmp_path, [str(REPO / "examples" / "score_raw_criteo.py")])
    assert run.returncode == 2 and "score_raw_criteo.py model.pt" in run.stderr  # usage
    with lines.open() as stdin:
        run = subprocess.run(
            [sys.executable, "-S", str(REPO / "examples" / "score_raw_criteo.py"), str(file)],
            stdin=stdin,
            env=_plain_torch_env(tmp_path),
            capture_output=True,
            text=True,
        )
    assert run.returncode == 0, run.stderr[-2000:]
    scores = [float(v) for v in run.stdout.split()]
    assert len(scores) == 5 and all(0 < s < 1 for s in scores)


# --- the raw-value mapping equals the data path's ----------------------------------------------


def _mapped(data: Path, lines: List[str]) -> torch.Tensor:
    manifest = load_manifest(data)
    sizes = [manifest["features"][f]["num_embeddings"] for f in CAT_NAMES]
    id_map, _ = raw_id_map(data, manifest, sizes)
    return script(id_map)(parse_lines(lines).cats)


def _all_ids(data: Path) -> torch.Tensor:
    return torch.cat(
        [
            b.sparse_features.values().view(len(CAT_NAMES), -1).t()
            for split in ("train", "val", "test")
            for b in CriteoParquetLoader(data, split, 4096, shuffle=False, drop_last=False)
        ]
    )


def test_frequency_and_synthetic_id_maps_match_the_data_path(tmp_path: Path, raw_tsv: Path) -> None:
    lines = raw_tsv.read_text().splitlines(keepends=True)
    freq = tmp_path / "freq"
    convert([str(raw_tsv)], freq, mode="frequency", min_count=2, progress=False)
    assert torch.equal(_mapped(freq, lines), _all_ids(freq))
    assert int((_all_ids(freq) == 0).sum()) > 0  # rare values map to id 0
    synth = tmp_path / "synth"
    synthesize(ROWS, synth, seed=0, max_cardinality=2000, progress=False)  # the rows raw_tsv holds
    assert torch.equal(_mapped(synth, lines), _all_ids(synth))


def test_mod_id_map_and_dense_match_the_converter_on_real_criteo(
    tmp_path: Path, criteo_sample: Path, exported: Dict[str, Tuple[Path, Dict[str, Any]]]
) -> None:
    with criteo_sample.open() as f:
        lines = [next(f) for _ in range(1400)]
    wide = "\t".join(["1"] + ["-3"] + ["12"] * 12 + ["ffffffffffffffff", "8000000000000001"] + ["a1"] * 24) + "\n"
    lines.append(wide)  # raw values >= 2**63 (uint64), and a negative count
    sample = tmp_path / "sample.tsv"
    sample.write_text("".join(lines))
    data = tmp_path / "data"
    sizes = [1000, 10_000_000, 7] + [99_991] * 23
    convert([str(sample)], data, num_embeddings=sizes, progress=False)
    assert torch.equal(_mapped(data, lines), _all_ids(data))
    assert _mapped(data, [wide])[0, :2].tolist() == [(2**64 - 1) % 1000, (2**63 + 1) % 10_000_000]
    dense, _ = load_model(exported["int8"][0]).preprocess(parse_lines(lines).ints, parse_lines(lines).cats)
    parquet = torch.cat(
        [
            b.dense_features
            for split in ("train", "val", "test")
            for b in CriteoParquetLoader(data, split, 4096, shuffle=False, drop_last=False)
        ]
    )
    assert torch.equal(dense, parquet)


# --- methods beyond MEmCom, and DLRM_DCN, from single-process checkpoints ---------------------


def _random_checkpoint(tmp: Path, data: Path, compression: Dict[str, Any], arch: str) -> Path:
    """A checkpoint as memcom train writes it, of a randomly filled model."""
    config_file = tmp / "config.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(data)},
                "model": {"arch": arch, "dense_arch_layer_sizes": [16], "over_arch_layer_sizes": [16, 1]},
                "embeddings": {"dim": 8, "compression": compression},
            }
        )
    )
    config = load_config(config_file)
    manifest = load_manifest(data)
    model, _ = build_model(config, [manifest["features"][f]["num_embeddings"] for f in CAT_NAMES], torch.device("cpu"))
    model.model.sparse_arch.to_empty(device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if "sparse_arch" in key:
                value.copy_(torch.rand(value.shape, generator=g) * 0.6 + (0.7 if "entity" in key else -0.3))
    progress = {"step": 1, "epoch": 0, "batch": 1, "world_size": 1}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:  # as memcom train writes it: shards, records and checksums
        return save_checkpoint(
            tmp / "ckpt", 1, {"model": model.state_dict()}, as_dict(config), {PROGRESS: progress, DATA: manifest}
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "data"
    synthesize(3000, path, seed=1, max_cardinality=700, progress=False)
    return path


@pytest.mark.parametrize(
    "compression, arch, methods",
    [
        ({"method": "hash", "params": {"ratio": 4, "hash": "mix"}, "min_rows": 100}, "DLRM", {"hash", "none"}),
        ({"method": "memcom", "params": {"ratio": 4, "hash": "mix"}, "min_rows": 100}, "DLRM_DCN", {"memcom", "none"}),
        (
            {"method": "qr", "params": {"num_collisions": 7, "operation": "add"}, "min_rows": 100},
            "DLRM_DCN",
            {"qr", "none"},
        ),
        (
            {
                "method": "memcom",
                "params": {"ratio": 4},
                "min_rows": 100,
                "tables": {
                    "t_cat_2": {"method": "qr", "params": {"ratio": 4}},
                    "t_cat_3": {"method": "hash", "params": {"ratio": 8}},
                    "t_cat_4": {"method": "none"},
                },
            },
            "DLRM",
            {"memcom", "qr", "hash", "none"},
        ),
    ],
    ids=["hash-mix", "memcom-mix-dcn", "qr-add-dcn", "mixed-methods"],
)
def test_other_methods_and_dcn_export_exactly_in_fp32(
    tmp_path: Path, synth_data: Path, compression: Dict[str, Any], arch: str, methods: set
) -> None:
    step = _random_checkpoint(tmp_path, synth_data, compression, arch)
    report = export_checkpoint(step, tmp_path / "m.pt", "fp32", check_rows=None)
    assert set(report["methods"].values()) == methods
    assert report["check"]["passed"] and report["check"]["max_abs_diff"] <= 1e-6


def test_stock_tables_export_in_int8(tmp_path: Path, synth_data: Path) -> None:
    step = _random_checkpoint(tmp_path, synth_data, {"method": "none"}, "DLRM")
    report = export_checkpoint(step, tmp_path / "m.pt", "int8", check_rows=None)
    assert set(report["methods"].values()) == {"none"} and report["check"]["passed"]
    assert report["tensor_bytes"]["entity_scalars"] == 2  # the trailing 1.0 only


# --- bad inputs ------------------------------------------------------------------------------


def test_missing_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_checkpoint(tmp_path / "nope", tmp_path / "m.pt")
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "m.pt")
    assert memcom(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "m.pt")]) == 1
    assert "memcom export: error: checkpoint" in capsys.readouterr().err


def test_unknown_precision_is_refused(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"unknown precision 'int4'; choose one of \['fp32', 'fp16', 'int8'\]"):
        export_checkpoint(checkpoint, tmp_path / "m.pt", "int4")
    with pytest.raises(SystemExit) as exit_:
        memcom(["export", str(checkpoint), "--out", str(tmp_path / "m.pt"), "--precision", "int4"])
    assert exit_.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_bad_check_rows_are_refused_before_any_work(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(ValueError, match="check_rows must be a positive number of rows or None"):
        export_checkpoint(checkpoint, tmp_path / "m.pt", check_rows=0)
    assert memcom(["export", str(checkpoint), "--out", str(tmp_path / "m.pt"), "--check-rows", "-3"]) == 1
    assert "got -3" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_missing_data_folder_names_the_option(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"pass the data folder it was trained on \(--data DIR\)"):
        export_checkpoint(checkpoint, tmp_path / "m.pt", data=tmp_path / "gone")


def test_failed_check_fails_the_command_and_writes_no_file(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "m.pt"
    with pytest.raises(ExportCheckError, match="beyond the tolerance") as err:
        export_checkpoint(checkpoint, out, "int8", max_abs_diff=1e-9)
    assert not err.value.report["check"]["passed"] and not out.exists()
    report = tmp_path / "report.json"
    code = memcom(["export", str(checkpoint), "--out", str(out), "--tolerance", "1e-9", "--report", str(report)])
    assert code == 1 and not out.exists() and not list(tmp_path.glob(".*.tmp"))
    assert json.loads(report.read_text())["check"]["passed"] is False
    assert "FAILED" in capsys.readouterr().err


def test_cli_export_writes_file_and_report(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    out, report = tmp_path / "m.pt", tmp_path / "r.json"
    assert (
        memcom(
            [
                "export",
                str(checkpoint),
                "--out",
                str(out),
                "--precision",
                "fp16",
                "--check-rows",
                "200",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    r = json.loads(report.read_text())
    assert r["file_bytes"] == out.stat().st_size and r["check"]["rows"] == 200 and r["precision"] == "fp16"
    assert "smaller than the uncompressed fp32 model" in capsys.readouterr().out


def test_malformed_raw_lines_name_the_line(
    tmp_path: Path, raw_tsv: Path, exported: Dict[str, Tuple[Path, Dict[str, Any]]], capsys: pytest.CaptureFixture
) -> None:
    lines = _split_lines(raw_tsv, "val")[:4]
    fields = lines[2].split("\t")
    fields[1 + 13 + 4] = "zz"
    bad = tmp_path / "bad.tsv"
    bad.write_text(lines[0] + lines[1] + "\t".join(fields) + lines[3])
    message = "bad.tsv:3: cat_4 'zz' is not a hex id (1 to 16 hex digits)"
    with pytest.raises(RawLineError, match=re.escape(message)):
        parse_lines(bad.read_text().splitlines(), "bad.tsv")
    file, _ = exported["int8"]
    assert memcom(["score", str(file), str(bad)]) == 1
    assert message in capsys.readouterr().err
    run = _run_plain(tmp_path, [str(REPO / "examples" / "score_raw_criteo.py"), str(file), str(bad)])
    assert run.returncode == 1 and f"{bad}:3: cat_4 'zz' is not a hex id" in run.stderr
    for text, reason in [
        ("0\t1\t2\n", "expected 40 tab-separated fields (or 39 without the label), found 3"),
        ("7" + lines[0][1:], "label '7' is not 0 or 1"),
        (lines[0].split("\t", 1)[0] + "\t1.5\t" + lines[0].split("\t", 2)[2], "int_0 '1.5' is not an integer"),
        (lines[0] + lines[1].split("\t", 1)[1], "2: lines with and without a label column are mixed"),
    ]:
        with pytest.raises(RawLineError, match=re.escape(reason)):
            parse_lines(text.splitlines(keepends=True))


def test_out_of_range_ids_and_missing_raw_map_are_refused(
    tmp_path: Path, checkpoint: Path, raw_tsv: Path, mod_data: Path, exported: Dict[str, Tuple[Path, Dict[str, Any]]]
) -> None:
    dense, ids = _val_rows(mod_data)
    model = load_model(exported["int8"][0])
    ids = ids[:4].clone()
    ids[2, 7] = SIZES[7]
    with pytest.raises(torch.jit.Error, match=rf"feature cat_7: id {SIZES[7]} \(row 2\) is outside \[0, {SIZES[7]}\)"):
        model(dense[:4], ids)
    with pytest.raises(torch.jit.Error, match=r"ids must be int64 \[batch, 26\]"):
        model(dense[:4], ids[:, :25])
    bare = tmp_path / "bare.pt"
    export_checkpoint(checkpoint, bare, "int8", check=False, raw_ids=False)
    batch = parse_lines(_split_lines(raw_tsv, "val")[:2])
    with pytest.raises(torch.jit.Error, match="exported without its raw-id map"):
        load_model(bare).score_raw(batch.ints, batch.cats)
    assert load_model(bare)(dense[:4], ids[:4].clamp(max=SIZES[7] - 1)).shape == (4,)


def test_unsupported_collections_and_fp16_overflow_are_refused() -> None:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from torchrec_memcom.inference.tables import TableExport, build_embeddings, collect_tables

    class Custom(torch.nn.Module):
        def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
            return [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=10, feature_names=["f0"])]

    with pytest.raises(ExportError, match=r"tables \['t0'\] are held by Custom, which export does not support"):
        collect_tables(Custom())
    table = TableExport("t0", ["f0"], "none", 4, torch.full((4, 8), 1e5))
    with pytest.raises(ExportError, match="beyond fp16's range"):
        build_embeddings([table], ["f0"], "int8")
    assert build_embeddings([table], ["f0"], "fp32")(torch.zeros(1, 1, dtype=torch.int64)).shape == (1, 1, 8)


def test_int8_lookups_equal_torchrec_quantized_tables() -> None:
    """The int8 rows are TorchRec's INT8 tables: lookups equal its quantized EBC's (FBGEMM's TBE),
    MEmCom's fp16 scalars riding as per-sample weights."""
    from torch.ao.quantization import PlaceholderObserver, QConfig
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from torchrec_memcom.inference.tables import TableExport, build_embeddings

    n, m, d, batch = 500, 64, 8, 32
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(
        [
            EmbeddingBagConfig(name="t0", embedding_dim=d, num_embeddings=m, feature_names=["f0"]),
            EmbeddingBagConfig(name="t1", embedding_dim=d, num_embeddings=n, feature_names=["f1"]),
        ],
        is_weighted=True,
    )
    scalars = torch.rand(n) + 0.5
    ours = build_embeddings(
        [
            TableExport("t0", ["f0"], "memcom", n, ebc.embedding_bags["t0"].weight.detach(), scalars=scalars),
            TableExport("t1", ["f1"], "none", n, ebc.embedding_bags["t1"].weight.detach()),
        ],
        ["f0", "f1"],
        "int8",
    )
    ebc.qconfig = QConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.float),
        weight=PlaceholderObserver.with_args(dtype=torch.qint8),
    )
    quantized = QuantEmbeddingBagCollection.from_float(ebc)
    ids = torch.randint(0, n, (batch, 2))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"],
        values=torch.cat([ids[:, 0] % m, ids[:, 1]]),
        lengths=torch.ones(2 * batch, dtype=torch.int32),
        weights=torch.cat([scalars.half().float()[ids[:, 0]], torch.ones(batch)]),
    )
    expected = quantized(kjt).values().view(batch, 2, d)
    assert torch.allclose(ours(ids), expected, atol=1e-5)
    assert not torch.allclose(ours(ids)[:, 1], ebc.embedding_bags["t1"].weight[ids[:, 1]], atol=1e-5)  # it is quantized


def _dequantized(module: torch.nn.Module) -> None:
    """Every tier row of a budgeted collection as int8 stores it (FBGEMM's round trip), and its
    scalars as fp16: what an int8 export must then reproduce exactly."""
    with torch.no_grad():
        for bag in module.embedding_bags.values():
            fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(bag.weight, 8)
            bag.weight.copy_(torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, 8))
        for w in module.entity_weights.values():
            w.copy_(w.half().float())


def test_budgeted_lookups_equal_the_module() -> None:
    """Exported budgeted lookups equal BudgetedEmbeddingBagCollection's forward on bags of one id,
    for every rank of every table: tiers at and below the model dim, a MEmCom tail, remapped and
    already-ranked tables, a table shared by two features, one tier alone; by themselves
    (fp32) and joined to a MEmCom collection in interleaved feature order (fp32, int8)."""
    d = 16
    tables = small_tables(d) + [EmbeddingBagConfig(name="t3", embedding_dim=d, num_embeddings=30, feature_names=["f4"])]
    allocation = Allocation(
        {
            "t0": TableAllocation((Tier(100, 16), Tier(300, 8), Tier(600, 4, hash_rows=37))),
            "t1": TableAllocation((Tier(50, 16), Tier(350, 8))),
            "t2": TableAllocation((Tier(10, 8), Tier(50, 4))),
            "t3": TableAllocation((Tier(30, 16),)),
        }
    )
    g = torch.Generator().manual_seed(0)
    frequencies = {
        "t0": torch.randint(0, 500, (1000,), generator=g),
        "t1": torch.arange(400, 0, -1),
        "t2": torch.randint(0, 20, (60,), generator=g),
        "t3": torch.randint(0, 9, (30,), generator=g),
    }
    budgeted = BudgetedEmbeddingBagCollection(tables, budget_ratio=1, frequencies=frequencies, allocation=allocation)
    assert [t.remap for t in budgeted.tables] == [True, False, True, False]
    memcom = MEmComEmbeddingBagCollection(
        [EmbeddingBagConfig(name="t4", embedding_dim=d, num_embeddings=200, feature_names=["g"])],
        MEmComConfig(num_hash_rows=40),
    )
    with torch.no_grad():
        for p in [*budgeted.parameters(), *memcom.parameters()]:
            p.copy_(torch.rand(p.shape, generator=g) - 0.5 + (1.0 if p.dim() == 1 else 0.0))  # scalars near 1
    features = ["f0", "g", "f1", "f2", "f3", "f4"]
    sizes = [1000, 200, 400, 60, 60, 30]
    ids = torch.stack([torch.randperm(1000, generator=g) % n for n in sizes], 1)  # every rank of every table
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=features, values=ids.t().reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.int32)
    )

    def expected(module: torch.nn.Module, names: List[str]) -> torch.Tensor:
        with torch.no_grad():
            out = module(kjt.permute([features.index(f) for f in names])).to_dict()
        return torch.stack([out[f] for f in names], 1)

    budgeted_only = [f for f in features if f != "g"]
    alone = script(build_embeddings(collect_tables(budgeted), budgeted_only, "fp32"))
    assert alone.original_name == TieredEmbeddings.__name__
    ours = alone(ids[:, [features.index(f) for f in budgeted_only]])
    assert torch.allclose(ours, expected(budgeted, budgeted_only), atol=1e-6)

    mixed = MixedEmbeddingBagCollection([budgeted, memcom])
    for precision in ("fp32", "int8"):
        if precision == "int8":
            _dequantized(budgeted)
            _dequantized(memcom)
        joined = script(build_embeddings(collect_tables(mixed), features, precision))
        assert joined.original_name == JoinedEmbeddings.__name__
        assert torch.allclose(joined(ids), expected(mixed, features), atol=1e-5)
    with pytest.raises(torch.jit.Error, match=r"feature f1: id 400 \(row 0\) is outside \[0, 400\)"):
        joined(torch.tensor([[0, 0, 400, 0, 0, 0]]))
