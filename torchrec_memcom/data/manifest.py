"""The files beside the shards: `manifest.json` and the per-feature id frequencies.

A data folder is complete exactly when `manifest.json` exists: it is written last, atomically,
and it lists the shards, so nothing reads the shards of an unfinished conversion.
"""

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .schema import CAT_NAMES, INT_NAMES, SPLITS, Features
from .sources import PathLike

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
STATE = ".convert_state.json"  # progress of an unfinished conversion
LOCK = ".lock"  # held by the process writing the folder
PARTS = ".parts"  # a conversion in parts (one per host): part K in .parts/K until merged
PART = "part.json"  # in .parts/K: written last, when part K is finished
VOCAB = "vocab"  # frequency mode: raw id of each id
COUNTS = ".counts"  # frequency mode, several workers: each one's raw-id counts until merged
FREQUENCIES = "frequencies"
FORMAT = "torchrec-memcom-criteo/1"


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary name and rename, so readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    """Hold `data_dir`'s lock while writing it; refuse, naming the holder, if another process has it.

    An flock: the kernel releases it when its holder dies, so a killed run never leaves it behind.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(
                f"{data_dir} is in use by process {holder}: wait for it to finish, or write to another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def clear(data_dir: Path) -> None:
    """Remove what a conversion or synthesis writes in `data_dir`, nothing else."""
    for name in (MANIFEST, STATE):
        (data_dir / name).unlink(missing_ok=True)
    for name in (FREQUENCIES, VOCAB, COUNTS, PARTS):
        shutil.rmtree(data_dir / name, ignore_errors=True)
    for split in SPLITS:
        for pattern in ("part-*.parquet", ".part-*.parquet.tmp"):
            for path in (data_dir / split).glob(pattern):
                path.unlink()


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def load_manifest(data_dir: PathLike) -> Dict[str, Any]:
    """The manifest of a converted or synthesized folder (rows, splits, shards, features)."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        hint = (
            "a conversion there is unfinished: run the same `memcom data convert` again to finish it"
            if (Path(data_dir) / STATE).is_file()
            else "convert or synthesize data first (`memcom data convert` / `memcom data synth`)"
        )
        raise FileNotFoundError(f"{path} not found: {hint}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def features_of(manifest: Mapping[str, Any]) -> Features:
    """The feature names of a data folder; manifests without ``dense_features`` (written before
    other datasets were supported) are Criteo's: 13 dense features and ``features``' 26; a
    description without ``features`` (TorchRec's npy days) has Criteo's 26."""
    sparse = manifest.get("features", {name: {} for name in CAT_NAMES})
    return Features(
        dense=list(manifest.get("dense_features", INT_NAMES)),
        sparse=list(sparse),
        multi_hot=[name for name, f in sparse.items() if f.get("multi_hot")],
    )


def load_frequencies(data_dir: PathLike) -> Dict[str, "torch.Tensor"]:
    """Per feature, how often each id occurs in the train split: int64 [num_embeddings]."""
    import torch

    manifest = load_manifest(data_dir)  # refuse unfinished folders
    folder = Path(data_dir) / FREQUENCIES
    return {name: torch.from_numpy(np.load(folder / f"{name}.npy")) for name in manifest["features"]}


def _add_counts(counts: np.ndarray, ids: np.ndarray) -> None:
    """counts[ids] += 1 for every occurrence, cheaply for both small and huge id spaces."""
    if len(counts) <= 8 * len(ids):
        counts += np.bincount(ids, minlength=len(counts))
    else:
        unique, occurrences = np.unique(ids, return_counts=True)
        counts[unique] += occurrences


def read_ids(path: Path, name: str) -> np.ndarray:
    """Every id of one feature column of a shard (a multi-hot column's lists flattened)."""
    column = pq.read_table(path, columns=[name]).column(0)
    if isinstance(column.type, (pa.ListType, pa.LargeListType)):
        column = pc.list_flatten(column)
    return column.to_numpy()


def count_feature(data_dir: Path, shards: Mapping[str, List[str]], name: str, size: int) -> int:
    """Read feature `name`'s ids back from the shards, write its train frequencies; its cardinality
    (distinct ids seen in all splits). Memory: one id space per split."""
    per_split = {split: np.zeros(size, dtype=np.int64) for split in shards}
    for split, paths in shards.items():
        for rel in paths:
            ids = read_ids(data_dir / rel, name)
            if ids.size and (ids.min() < 0 or ids.max() >= size):
                raise ValueError(f"{rel}: {name} has ids outside [0, {size})")
            _add_counts(per_split[split], ids)
    folder = data_dir / FREQUENCIES
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, per_split.get("train", np.zeros(size, dtype=np.int64)))
    os.replace(tmp, folder / f"{name}.npy")
    return int(np.count_nonzero(sum(per_split.values())))


def finish(
    data_dir: Path,
    shards: Mapping[str, List[Dict[str, Any]]],
    num_embeddings: Mapping[str, int],
    fields: Mapping[str, Any],
    map_fn: Callable[..., Iterable[Any]] = map,
    features: Features = Features(),
) -> Dict[str, Any]:
    """Count ids, write the frequencies, then the manifest (last: it marks the folder complete).

    `shards[split]` lists `{"path": relative path, "rows": n}`; `fields` adds kind-specific keys
    (and may replace the Criteo descriptions of label and dense columns); `num_embeddings` has
    the categorical features in `features.sparse` order. `map_fn` (e.g. a process pool's `map`)
    counts the features, one feature per call.
    """
    paths = {s: [d["path"] for d in lst] for s, lst in shards.items()}
    names = list(features.sparse)
    n = len(names)
    cardinality = dict(
        zip(names, map_fn(count_feature, [data_dir] * n, [paths] * n, names, [int(num_embeddings[c]) for c in names]))
    )
    manifest: Dict[str, Any] = {"format": FORMAT, **fields}
    manifest["splits"] = {split: {"rows": sum(d["rows"] for d in lst), "shards": lst} for split, lst in shards.items()}
    manifest["dense_features"] = list(features.dense)
    manifest["features"] = {
        name: {
            "num_embeddings": int(num_embeddings[name]),
            "cardinality": cardinality[name],
            **({"multi_hot": True} if name in features.multi_hot else {}),
        }
        for name in features.sparse
    }
    manifest.setdefault("label", "int8 0/1")
    manifest.setdefault("dense", "float32 log(max(x, 0) + 1), missing -> 0")
    manifest["frequencies"] = f"{FREQUENCIES}/<feature>.npy: int64 [num_embeddings], train split"
    write_json_atomic(data_dir / MANIFEST, manifest)
    return manifest
