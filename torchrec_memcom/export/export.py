"""`export_checkpoint`: a trained checkpoint -> one TorchScript file for CPU inference, self-checked.

The checkpoint (sharded by any number of ranks) is read unsharded into the model its
`config.json` describes, rebuilt in plain TorchRec on this one process; `inference_model` puts
its tables into row stores in the precision asked for (read here one id per feature), its dense
layers stay as they are, and the result is compiled with TorchScript so that `torch.jit.load` alone runs it. Before the
file is moved into place, its predictions on held data are compared with the rebuilt model's,
and both with the sharded model's own outputs, which training records with every evaluation.
"""

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union, cast

import numpy as np
import torch
from torch import nn
from torchrec.models.dlrm import DLRM, InteractionArch, InteractionDCNArch

from torchrec_memcom.data import CriteoParquetLoader, load_manifest, roc_auc
from torchrec_memcom.data.manifest import VOCAB, features_of
from torchrec_memcom.export.inference import (
    PRECISIONS,
    FlatInteractionArch,
    InferenceDLRM,
    RawIdMap,
    StackedLowRankCrossNet,
    load_model,
)
from torchrec_memcom.inference import inference_model
from torchrec_memcom.inference.stores import store_bytes
from torchrec_memcom.inference.tables import AnyTable, ExportError, TableExport, collect_tables
from torchrec_memcom.train.checkpoint import (
    CONFIG,
    PROGRESS,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_record,
)
from torchrec_memcom.train.config import RunConfig, load_config
from torchrec_memcom.train.model import build_model

FORMAT = "torchrec-memcom-inference/1"

# Default check tolerances per precision: the largest |P_exported - P_trained| over the check rows
# and the largest |AUC_exported - AUC_trained|. Set from the benchmark's trained models
# (docs/export.md): 5.7-18x above their probability differences (8.4-18x stock and MEmCom, 5.7-6.5x
# budgeted) and over 50x above their AUC changes on 14,286 rows: a failure means something broke.
TOLERANCES: Dict[str, Dict[str, float]] = {
    "fp32": {"max_abs_diff": 1e-5, "auc_change": 1e-5},
    "fp16": {"max_abs_diff": 5e-3, "auc_change": 5e-4},
    "int8": {"max_abs_diff": 3e-2, "auc_change": 1e-3},
}

PathLike = Union[str, Path]


class ExportCheckError(ExportError):
    """The exported model's predictions are off by more than the tolerance; ``report`` says by how much."""

    def __init__(self, message: str, report: Dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def resolve_checkpoint(path: PathLike) -> Path:
    """A checkpoint folder (``step_N`` with ``config.json``), or a ``checkpoint_dir``'s latest one."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if (p / CONFIG).is_file():
        return p
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is None:
        raise FileNotFoundError(
            f"{p} is not a checkpoint: expected a step_N folder with {CONFIG} (written by memcom "
            f"train), or a train.checkpoint_dir with a 'latest' pointer"
        )
    if not (latest / CONFIG).is_file():
        raise FileNotFoundError(f"{latest} has no {CONFIG}: it was not written by memcom train")
    return latest


class TrainedModel:
    """A checkpoint read back unsharded: its config, data folder and the rebuilt TorchRec model,
    what the export converts and checks its file against.

    Args:
        checkpoint: a ``step_N`` folder, or a ``train.checkpoint_dir`` (its latest checkpoint).
        data: the data folder it was trained on (default: the config's ``data.path``), whose
            manifest gives the features and the id mapping.

    Example::

        trained = TrainedModel("runs/kaggle_memcom16/checkpoints")
        trained.config.embeddings.compression.method  # "memcom"
        trained.predict(batch.dense_features, batch.sparse_features)  # P(click) [B]
    """

    def __init__(self, checkpoint: PathLike, data: Optional[PathLike] = None) -> None:
        self.path = resolve_checkpoint(checkpoint)
        self.config: RunConfig = load_config(self.path / CONFIG)
        self.data_dir = Path(data or self.config.data.path)
        try:
            self.manifest = load_manifest(self.data_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}. The checkpoint was trained on {self.config.data.path}: pass the data folder "
                f"it was trained on (--data DIR), whose id mapping the export keeps"
            ) from None
        self.features = features_of(self.manifest)
        sizes = self.config.embeddings.num_embeddings  # a list, or "from_data"
        self.num_embeddings: List[int] = (
            [self.manifest["features"][f]["num_embeddings"] for f in self.features.sparse]
            if isinstance(sizes, str)
            else list(sizes)
        )
        train, _ = build_model(self.config, self.num_embeddings, torch.device("cpu"), self.features)
        # Only the tables start on `meta`; the dense layers are built real, with the buffers the
        # checkpoint does not hold (DLRM's interaction indices). `to_empty` leaves the tables
        # uninitialized, so all their state must come from the checkpoint.
        sparse = train.model.sparse_arch
        unsaved = sorted({name for name, _ in sparse.named_buffers()} - set(sparse.state_dict()))
        if unsaved:
            raise ExportError(f"the embedding collection's buffers {unsaved} are not checkpointed")
        sparse.to_empty(device=torch.device("cpu"))
        state: Dict[str, Any] = {"model": train.state_dict()}
        try:  # checksums verified first; weights only (no pickle code runs)
            with warnings.catch_warnings():  # "no process group: loading in a single process", as meant
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                load_checkpoint(self.path, state)
            self.progress: Dict[str, Any] = read_record(self.path, PROGRESS)
        except CheckpointError as e:
            raise ExportError(f"{e} (the model its {CONFIG} describes, data folder {self.data_dir})") from None
        train.load_state_dict(state["model"])
        self.dlrm: DLRM = train.model.eval()
        # The sharded model's own logits on the first eval rows, if the checkpoint records them.
        self.probe: Optional[Dict[str, Any]] = self.progress.get("probe") or None

    @torch.no_grad()
    def predict(self, dense: torch.Tensor, sparse: Any) -> torch.Tensor:
        """P(click) of the trained model (float32, TorchRec's unsharded modules)."""
        return torch.sigmoid(self.dlrm(dense, sparse).squeeze(-1))


def raw_id_map(data_dir: Path, manifest: Dict[str, Any], num_embeddings: List[int]) -> Tuple[RawIdMap, str]:
    """The raw-value -> id mapping the data folder was made with, and its mode."""
    mode = manifest.get("mode")
    empty = torch.zeros(0, dtype=torch.int64)
    names = features_of(manifest).sparse
    if mode == "mod":
        modulus = [manifest["features"][f]["num_embeddings"] for f in names]
        for name, m, n in zip(names, modulus, num_embeddings):
            if m > n:
                raise ExportError(f"{data_dir}: {name} has ids up to {m - 1}, but its table has {n} rows")
        return RawIdMap("mod", torch.tensor(modulus, dtype=torch.int64), empty, empty.int()), mode
    if mode == "frequency":
        raw = [np.load(data_dir / VOCAB / f"{f}.npy").astype(np.uint64) for f in names]
        ids = [np.arange(1, len(r) + 1) for r in raw]
    elif mode == "synthetic":
        from torchrec_memcom.data.synth import ClickModel

        g = manifest["generator"]
        model = ClickModel(g["seed"], g["max_cardinality"], g["zipf_exponent"], g["base_ctr"])
        raw, ids = [], []
        for f, n in enumerate(model.cardinalities):
            ids.append(np.arange(n))
            strings = model.hex_strings(f, ids[-1]).fill_null("0").to_pylist()
            raw.append(np.array([int(s, 16) for s in strings], dtype=np.uint64))
    else:
        raise ExportError(
            f"{data_dir}: ids in mode {mode!r} have no raw Criteo values to map (mod, frequency and "
            f"synthetic data do): export without them (--no-raw-ids) and feed table ids"
        )
    keys, values = [], []
    for f, (r, i) in enumerate(zip(raw, ids)):
        if len(r) and int(r.max()) >= 1 << 32:
            raise ExportError(
                f"{data_dir}: {names[f]}'s id map holds raw values of more than 32 bits; export "
                f"supports Criteo's 8-hex-digit values (convert such data in mod mode)"
            )
        key = (np.int64(f) << np.int64(32)) | r.astype(np.int64)
        key, first = np.unique(key, return_index=True)  # a repeated raw value keeps its first id
        keys.append(key)
        values.append(i[first])
    return RawIdMap(
        "vocab",
        torch.tensor(num_embeddings, dtype=torch.int64),
        torch.from_numpy(np.concatenate(keys)),
        torch.from_numpy(np.concatenate(values).astype(np.int32)),
    ), mode


def _table_info(t: AnyTable) -> Dict[str, Any]:
    if not isinstance(t, TableExport):
        tiers = [
            {"rows": x.rows, "dim": x.dim, "stored_rows": x.weight.shape[0], "memcom": x.scalars is not None}
            for x in t.tiers
        ]
        return {
            "method": t.method,
            "n": t.num_embeddings,
            "rows": sum(x["stored_rows"] for x in tiers),
            "tiers": tiers,
            "remap": t.ranks is not None,
        }
    info: Dict[str, Any] = {"method": t.method, "n": t.num_embeddings, "rows": t.weight.shape[0]}
    if t.hash is not None:
        info["hash"] = t.hash
    if t.remainder is not None:
        info.update(collisions=t.remainder.shape[0], operation=t.operation)
    return info


def build_inference_model(
    trained: TrainedModel, precision: str, raw_ids: bool = True
) -> Tuple[InferenceDLRM, List[AnyTable]]:
    """The (not yet scripted) inference module of a trained model, and the tables it holds;
    ``raw_ids=False`` leaves the raw-value -> id map out (``score_raw`` then refuses)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    dlrm = trained.dlrm
    names = trained.features.sparse
    features = list(dlrm.sparse_arch.sparse_feature_names)
    if features != names:
        raise ExportError(f"the model's sparse features are {features}, expected the data's {names} in order")
    if trained.features.multi_hot:
        raise ExportError(
            f"{trained.data_dir}: feature {trained.features.multi_hot[0]!r} is multi-hot; the exported "
            f"model takes one id per feature"
        )
    tables = collect_tables(dlrm.sparse_arch.embedding_bag_collection)
    served = cast(DLRM, inference_model(dlrm, precision))  # tables in `precision`, all frozen
    mode: Optional[str]
    if raw_ids:
        id_map, mode = raw_id_map(trained.data_dir, trained.manifest, trained.num_embeddings)
    else:
        empty = torch.zeros(0, dtype=torch.int64)
        id_map, mode = (
            RawIdMap("none", torch.ones(len(names), dtype=torch.int64), empty, empty),
            trained.manifest.get("mode"),
        )
    dense_names = trained.features.dense
    metadata = {
        "format": FORMAT,
        "precision": precision,
        "inputs": {
            "forward": f"dense float32 [B, {len(dense_names)}] = log(max(x, 0) + 1), ids int64 [B, {len(names)}] (table ids)",
            "score_raw": f"raw_ints int64 [B, {len(dense_names)}], raw_cats int64 [B, {len(names)}] (hex values; missing = 0)",
        },
        "dense_features": dense_names,
        "sparse_features": names,
        "id_map": {"kind": id_map.kind, "data_mode": mode, "data": str(trained.data_dir)},
        "tables": {t.name: _table_info(t) for t in tables},
        "arch": trained.config.model.arch,
        "embedding_dim": tables[0].embedding_dim,
        "checkpoint": str(trained.path),
        "step": int(trained.progress["step"]),
    }
    inter_arch = served.inter_arch  # rewritten for TorchScript and speed, the same arithmetic
    if isinstance(inter_arch, InteractionDCNArch):
        inter_arch.crossnet = StackedLowRankCrossNet(inter_arch.crossnet)
    elif isinstance(inter_arch, InteractionArch):
        inter_arch = FlatInteractionArch(inter_arch.triu_indices, inter_arch.F)
    else:
        raise ExportError(f"unknown interaction {type(inter_arch).__name__}: export supports DLRM and DLRM_DCN")
    module = InferenceDLRM(
        served.sparse_arch.embedding_bag_collection.one_id_per_feature(names),  # reads [B, 26] ids
        id_map,
        served.dense_arch,
        inter_arch,
        served.over_arch,
        len(dense_names),
        json.dumps(metadata, sort_keys=True),
    )
    return module, tables


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript of ``module`` (deprecation warning muted: see ``load_model``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


def save(module: torch.jit.ScriptModule, path: PathLike) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(module, str(path))


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def size_report(
    file: Path, module: torch.jit.ScriptModule, tables: List[AnyTable], num_embeddings: List[int]
) -> Dict[str, Any]:
    """The file's real size, what its tensors take, and the fp32 models it replaces."""
    state = module.state_dict()
    grouped = store_bytes({k: v for k, v in state.items() if k.startswith("embeddings.")})
    del grouped["feature_index"]  # counted below with every other small tensor
    dense_layers = [k for k in state if k.split(".")[0] in ("dense_arch", "inter_arch", "over_arch")]
    grouped["id_map"] = _tensor_bytes(v for k, v in state.items() if k.startswith("id_map."))
    grouped["dense_layers"] = _tensor_bytes(state[k] for k in dense_layers)
    grouped["feature_index"] = _tensor_bytes(state.values()) - sum(grouped.values())
    file_bytes = file.stat().st_size
    dense_fp32 = sum(p.numel() * 4 for k, p in state.items() if k in dense_layers and p.is_floating_point())
    dim = tables[0].embedding_dim
    uncompressed = sum(n * dim * 4 for n in num_embeddings) + dense_fp32
    compressed = sum(t.fp32_bytes for t in tables) + dense_fp32
    return {
        "file_bytes": file_bytes,
        "tensor_bytes": grouped,
        "format_overhead_bytes": file_bytes - sum(grouped.values()),
        "fp32_uncompressed_bytes": uncompressed,
        "fp32_trained_bytes": compressed,
        "ratio_vs_fp32_uncompressed": uncompressed / file_bytes,
        "ratio_vs_fp32_trained": compressed / file_bytes,
    }


@torch.no_grad()
def compare(
    exported: torch.jit.ScriptModule,
    trained: TrainedModel,
    data_dir: Path,
    split: str,
    max_rows: Optional[int],
    batch_size: int = 4096,
) -> Dict[str, Any]:
    """Predictions of the exported file and of the trained model on ``max_rows`` rows of a split."""
    loader = CriteoParquetLoader(data_dir, split, batch_size, shuffle=False, drop_last=False)
    ours, theirs, labels = [], [], []
    rows = 0
    for batch in loader:
        kjt = batch.sparse_features
        b = batch.dense_features.shape[0]
        names = trained.features.sparse
        if kjt.keys() != names or not bool((kjt.lengths() == 1).all()):
            raise ExportError(f"{data_dir}: expected one id per feature {names}")
        ids = kjt.values().view(len(names), b).t()
        ours.append(exported(batch.dense_features, ids))
        theirs.append(trained.predict(batch.dense_features, kjt))
        labels.append(batch.labels)
        rows += b
        if max_rows and rows >= max_rows:
            break
    if not rows:
        raise ExportError(f"{data_dir}: split {split!r} is empty, nothing to check on")
    p_exp, p_ref = torch.cat(ours)[:max_rows], torch.cat(theirs)[:max_rows]
    y = torch.cat(labels)[:max_rows].numpy()
    diff = (p_exp - p_ref).abs()
    auc_exp, auc_ref = roc_auc(p_exp.double().numpy(), y), roc_auc(p_ref.double().numpy(), y)
    return {
        "data": str(data_dir),
        "split": split,
        "rows": int(p_exp.numel()),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "auc_trained": auc_ref,
        "auc_exported": auc_exp,
        "auc_change": auc_exp - auc_ref,
    }


# Largest |P| difference allowed between the fp32 model rebuilt unsharded and the sharded model
# as trained: float sums in another order only (a different model differs by far more).
PROBE_TOLERANCE = 1e-4


@torch.no_grad()
def compare_probe(
    exported: torch.jit.ScriptModule, trained: TrainedModel, tolerance: float
) -> Optional[Dict[str, Any]]:
    """Predictions of the rebuilt and of the exported model against the sharded model's own, on
    the rows training recorded them for (each rank's first eval batch); None if the checkpoint
    records none for its step (a checkpoint saved between evaluations)."""
    probe = trained.probe
    if probe is None or probe["step"] != trained.progress["step"]:
        return None
    world = len(probe["logits"])
    sharded, rebuilt, ours = [], [], []
    for rank, logits in enumerate(probe["logits"]):
        loader = CriteoParquetLoader(
            trained.data_dir,
            trained.config.data.eval_split,
            probe["batch_size"],
            rank=rank,
            world_size=world,
            seed=trained.config.train.seed,
            shuffle=False,
            drop_last=False,
        )
        loader.set_epoch(0)
        batch = next(iter(loader))
        k = len(logits)
        kjt = batch.sparse_features
        ids = kjt.values().view(len(trained.features.sparse), -1).t()
        sharded.append(torch.sigmoid(torch.tensor(logits)))
        rebuilt.append(trained.predict(batch.dense_features, kjt)[:k])
        ours.append(exported(batch.dense_features, ids)[:k])
    p_sharded, p_rebuilt, p_exported = torch.cat(sharded), torch.cat(rebuilt), torch.cat(ours)
    result = {
        "rows": int(p_sharded.numel()),
        "ranks": world,
        "max_abs_diff_rebuilt": float((p_rebuilt - p_sharded).abs().max()),
        "max_abs_diff_exported": float((p_exported - p_sharded).abs().max()),
        "tolerance_rebuilt": PROBE_TOLERANCE,
        "tolerance_exported": tolerance + PROBE_TOLERANCE,
    }
    result["passed"] = (
        result["max_abs_diff_rebuilt"] <= PROBE_TOLERANCE
        and result["max_abs_diff_exported"] <= tolerance + PROBE_TOLERANCE
    )
    return result


def _check_folder(check_dir: Path, trained: TrainedModel) -> None:
    """A check folder must hold the training folder's ids (same mode, ids within the tables)."""
    manifest = load_manifest(check_dir)
    if manifest.get("mode") != trained.manifest.get("mode"):
        raise ExportError(
            f"{check_dir}: ids are in mode {manifest.get('mode')!r}, the model's data in "
            f"{trained.manifest.get('mode')!r}: check on data converted like the training data"
        )
    for f, n in zip(trained.features.sparse, trained.num_embeddings):
        if manifest["features"][f]["num_embeddings"] > n:
            raise ExportError(
                f"{check_dir}: {f} has {manifest['features'][f]['num_embeddings']} ids, the model's "
                f"table {n} rows: check on data converted like the training data"
            )


def export_checkpoint(
    checkpoint: PathLike,
    out_file: PathLike,
    precision: str = "int8",
    check_data: Optional[PathLike] = None,
    *,
    data: Optional[PathLike] = None,
    check_split: Optional[str] = None,
    check_rows: Optional[int] = 100_000,
    check: bool = True,
    raw_ids: bool = True,
    max_abs_diff: Optional[float] = None,
    auc_change: Optional[float] = None,
) -> Dict[str, Any]:
    """Export a ``memcom train`` checkpoint as one TorchScript file; returns the report.

    checkpoint: a ``step_N`` folder or a ``checkpoint_dir`` (its latest); any world size.
    precision: the tables' storage, ``int8`` (row-wise, fp16 scale and bias), ``fp16`` or
        ``fp32``; MEmCom's per-entity scalars are fp16 (fp32 with ``fp32``), dense layers fp32.
    data: the folder the model was trained on (default: the config's ``data.path``); its id
        mapping goes into the file for ``score_raw`` (``raw_ids=False``: left out).
    check_data / check_split / check_rows: held data to compare predictions on (default: the
        training folder's eval split, first 100,000 rows; ``None`` rows: all).
    max_abs_diff / auc_change: tolerances (default ``TOLERANCES[precision]``); when exceeded
        the file is not written and ``ExportCheckError`` (with the report) is raised.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if check_rows is not None and check_rows < 1:
        raise ValueError(f"check_rows must be a positive number of rows or None (all), got {check_rows}")
    out = Path(out_file)
    trained = TrainedModel(checkpoint, data)
    module, tables = build_inference_model(trained, precision, raw_ids)
    scripted = script(module)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save(scripted, tmp)
    try:
        report: Dict[str, Any] = {
            "checkpoint": str(trained.path),
            "step": int(trained.progress["step"]),
            "out": str(out),
            "precision": precision,
            "methods": {t.name: t.method for t in tables},
            **size_report(tmp, scripted, tables, trained.num_embeddings),
            "check": None,
        }
        if check:
            check_dir = Path(check_data) if check_data else trained.data_dir
            if check_data:
                _check_folder(check_dir, trained)
            tolerance = {
                "max_abs_diff": TOLERANCES[precision]["max_abs_diff"] if max_abs_diff is None else max_abs_diff,
                "auc_change": TOLERANCES[precision]["auc_change"] if auc_change is None else auc_change,
            }
            result = compare(
                load_model(tmp), trained, check_dir, check_split or trained.config.data.eval_split, check_rows
            )
            result["tolerance"] = tolerance
            result["passed"] = result["max_abs_diff"] <= tolerance["max_abs_diff"] and not (
                abs(result["auc_change"]) > tolerance["auc_change"]  # NaN AUC (one class): not judged
            )
            report["check"] = result
            probe = compare_probe(load_model(tmp), trained, tolerance["max_abs_diff"])
            report["check_as_trained"] = probe
            if not result["passed"]:
                raise ExportCheckError(
                    f"exported model differs from the trained one beyond the tolerance: max "
                    f"|dP| {result['max_abs_diff']:.3g} (allowed {tolerance['max_abs_diff']:.3g}), "
                    f"AUC change {result['auc_change']:+.3g} (allowed {tolerance['auc_change']:.3g}); "
                    f"{out} was not written",
                    report,
                )
            if probe is not None and not probe["passed"]:
                raise ExportCheckError(
                    f"the model differs from the sharded model as trained on the {probe['rows']} "
                    f"eval rows training recorded: max |dP| rebuilt {probe['max_abs_diff_rebuilt']:.3g} "
                    f"(allowed {probe['tolerance_rebuilt']:.3g}), exported "
                    f"{probe['max_abs_diff_exported']:.3g} (allowed {probe['tolerance_exported']:.3g}); "
                    f"{out} was not written",
                    report,
                )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def _versus(ratio: float) -> str:
    """``ratio`` = reference bytes / file bytes, in words that stay true below 1."""
    return f"{ratio:.1f}x smaller than" if ratio >= 1 else f"{1 / ratio:.1f}x larger than"


def describe(report: Dict[str, Any]) -> str:
    """A few lines for people: sizes, and the check."""
    mb = 2**20
    lines = [
        f"exported {report['checkpoint']} (step {report['step']}) -> {report['out']} ({report['precision']})",
        f"  file {report['file_bytes'] / mb:.3f} MiB: {_versus(report['ratio_vs_fp32_uncompressed'])} "
        f"the uncompressed fp32 model ({report['fp32_uncompressed_bytes'] / mb:.3f} MiB), "
        f"{_versus(report['ratio_vs_fp32_trained'])} the trained fp32 model "
        f"({report['fp32_trained_bytes'] / mb:.3f} MiB; neither counts the raw-value id map)",
        "  tensors: " + ", ".join(f"{k} {v / mb:.3f} MiB" for k, v in report["tensor_bytes"].items() if v),
    ]
    c = report["check"]
    probe = report.get("check_as_trained")
    if probe is not None:
        lines.append(
            f"  against the sharded model as trained ({probe['rows']} recorded eval rows, "
            f"{probe['ranks']} ranks): max |dP| rebuilt {probe['max_abs_diff_rebuilt']:.2e}, exported "
            f"{probe['max_abs_diff_exported']:.2e}: {'passed' if probe['passed'] else 'FAILED'}"
        )
    elif c is not None:
        lines.append("  (the checkpoint records no outputs of the sharded model at its step: not compared with them)")
    if c is None:
        lines.append("  not checked (--no-check)")
    else:
        t = c["tolerance"]
        lines.append(
            f"  check on {c['data']} [{c['split']}], {c['rows']} rows: max |dP| {c['max_abs_diff']:.2e} "
            f"(tolerance {t['max_abs_diff']:.0e}), mean |dP| {c['mean_abs_diff']:.2e}; AUC "
            f"{c['auc_trained']:.5f} -> {c['auc_exported']:.5f} ({c['auc_change']:+.5f}, tolerance "
            f"{t['auc_change']:.0e}): {'passed' if c['passed'] else 'FAILED'}"
        )
    if c is not None and math.isnan(c["auc_change"]):
        lines.append("  (AUC undefined: the check rows hold one class only)")
    return "\n".join(lines)
