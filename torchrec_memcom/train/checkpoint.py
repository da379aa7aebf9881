"""Sharded checkpoints with torch.distributed.checkpoint: never left half written, verified when read.

Every rank writes its shards into ``step_N.tmp``; rank 0 adds the JSON records (the run config,
the progress, the data's manifest) and ``checksums.json`` (SHA-256 and size of every file, each
rank hashing the shards it wrote), renames the folder to ``step_N`` and then atomically rewrites
``latest``. The checkpoint ``latest`` names is never modified or deleted (saving its step again
is an error), so a run killed at any point leaves ``latest`` naming a complete checkpoint (or no
``latest``). What a killed save leaves behind (``step_N.tmp``, ``step_N.stale``, or a ``step_N``
that ``latest`` does not name yet) is cleared by the next save.

Reading verifies every checksum first (ranks share the files) and then loads with no code
execution of its own: DCP's ``.metadata`` (a pickle) through an unpickler that admits only DCP's
metadata classes and torch's dtypes, and non-tensor values with ``torch.load(weights_only=True)``.
"""

import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element  # what the stock load_bytes uses
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

LATEST = "latest"
CONFIG = "config.json"  # the run config, so that a checkpoint describes its own model
CHECKSUMS = "checksums.json"  # SHA-256 and size of every other file
PROGRESS = "progress.json"  # the run's position, loss sums and evaluations (train.trainer)
DATA = "data_manifest.json"  # the manifest of the data the checkpoint was trained on


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the checkpoint and the file."""


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The newest complete checkpoint in ``folder``, if any."""
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    path = folder / pointer.read_text().strip()
    if not path.is_dir():  # only if something other than save_checkpoint changed the folder
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def save_checkpoint(
    folder: Path,
    step: int,
    state: Dict[str, Any],
    config: Dict[str, Any],
    records: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``state`` (sharded), ``config`` as ``config.json`` and each of ``records`` as JSON
    file ``<name>`` (the same on every rank; rank 0 writes them) into ``folder/step_<step>`` and
    make it ``latest``; collective. Raises if ``step`` is the latest checkpoint already: that one
    is never touched."""
    final, tmp, stale = (folder / f"step_{step}{suffix}" for suffix in ("", ".tmp", ".stale"))
    latest = latest_checkpoint(folder) if folder.is_dir() else None
    if latest is not None and latest.name == final.name:
        raise CheckpointError(f"{final} is the latest checkpoint already; a step is saved once")
    rank = dist.get_rank()
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in [*folder.glob("step_*.tmp"), *folder.glob("step_*.stale")]:
            shutil.rmtree(leftover)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    # DCP names each rank's data files __<rank>_<n>.distcp: each rank hashes its own
    own = {p.name: _digest(p) for p in sorted(tmp.glob(f"__{rank}_*.distcp"))}
    everyone: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, own)
    if rank == 0:
        files = {CONFIG: config, **(records or {})}
        for name, value in files.items():
            _write_synced(tmp / name, json.dumps(value, indent=1, allow_nan=False))
        sums = {k: v for d in everyone for k, v in d.items()}
        for path in sorted(tmp.iterdir()):
            if path.name not in sums:  # .metadata and the records
                sums[path.name] = _digest(path)
        _write_synced(tmp / CHECKSUMS, json.dumps(dict(sorted(sums.items())), indent=1))
        if final.exists():  # a killed save's, which `latest` does not name: move it out of the way whole
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(tmp, final)
        pointer = folder / f"{LATEST}.tmp"
        _write_synced(pointer, final.name)
        os.replace(pointer, folder / LATEST)
        _sync_folder(folder)
    dist.barrier()
    return final


def _digest(path: Path) -> Dict[str, Any]:
    sha = hashlib.sha256()  # read in blocks: hashlib.file_digest is Python 3.11+
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {"sha256": sha.hexdigest(), "bytes": path.stat().st_size}


def _write_synced(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and flush it to disk before it is renamed into place."""
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(folder: Path) -> None:
    """Flush the renames in ``folder`` to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path: Path, share: int = 0, shares: int = 1) -> None:
    """Check the sizes and SHA-256 of the files ``checksums.json`` lists (every ``shares``-th
    one from ``share``: ranks split the work), and that it lists every file; raises naming the
    first file that differs."""
    listing = path / CHECKSUMS
    try:
        sums = json.loads(listing.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{listing}: cannot read the checksums ({e}); the checkpoint is incomplete "
            "or was not written by memcom train"
        ) from None
    present = {p.name for p in path.iterdir()} - {CHECKSUMS}
    extra, missing = sorted(present - set(sums)), sorted(set(sums) - present)
    if missing or extra:
        name, what = (missing[0], "is missing") if missing else (extra[0], "is not in checksums.json")
        raise CheckpointError(f"{path / name} {what}: the checkpoint was changed after it was written")
    for name in sorted(sums)[share::shares]:
        actual = _digest(path / name)
        if actual != sums[name]:
            raise CheckpointError(
                f"{path / name}: checksum mismatch ({actual['bytes']} bytes, sha256 {actual['sha256'][:12]}..; "
                f"written as {sums[name]['bytes']} bytes, {sums[name]['sha256'][:12]}..): the file is corrupt"
            )


def read_record(path: Path, name: str) -> Any:
    """A JSON record of checkpoint ``path`` (``config.json``, ``progress.json``, ...)."""
    try:
        return json.loads((path / name).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / name}: cannot read it ({e})") from None


# DCP's .metadata is a plain pickle (torch.load's weights_only reads only torch's own format):
# admit exactly the classes it holds (named, never a module: a dotted name would reach any
# attribute), none of which runs code when built
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "ChunkStorageMetadata",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout from its name
    "torch": {"Size"},
    "pathlib": {"PosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's .metadata")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, reading the metadata with ``_MetadataUnpickler`` (the rest is the stock
    ``read_metadata``), so that a checkpoint's ``.metadata`` pickle runs no code of its own.

    Args:
        path: the checkpoint folder (as for ``FileSystemReader``).

    Example::

        dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))  # private: where the stock method reads
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor values as weights only (no pickle code
    runs).

    Args:
        flatten_state_dict, flatten_sharded_tensors, allow_partial_load: as for DCP's
            ``DefaultLoadPlanner``.

    Example::

        dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
    """

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_checkpoint(path: Path, state: Dict[str, Any], verify: bool = True) -> None:
    """Fill ``state`` (the same structure that was saved) in place from ``path``, after
    verifying its checksums; collective when a process group is up. Errors are one
    ``CheckpointError`` naming the checkpoint (DCP's own ``CheckpointException`` derives from
    ``BaseException`` and would pass ``except Exception``)."""
    distributed = dist.is_available() and dist.is_initialized()
    if verify:
        share, shares = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        error: Optional[str] = None
        try:
            verify_checkpoint(path, share, shares)
        except CheckpointError as e:
            error = str(e)
        if distributed:
            errors: List[Any] = [None] * shares
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e), None)
        if error:
            raise CheckpointError(error)
    try:
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), no_dist=not distributed)
    except CheckpointException as e:
        failure = next(iter(e.failures.values()), e)  # rank -> (exception, traceback)
        first = failure[0] if isinstance(failure, tuple) else failure
        raise CheckpointError(f"{path}: cannot load the checkpoint: {_one_line(first)}") from None
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot load the checkpoint: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"
