"""Sharded checkpoints with torch.distributed.checkpoint, never left half written.

Every rank writes its shards into ``step_N.tmp``; after a barrier rank 0 renames it to
``step_N`` and then atomically rewrites ``latest``. The checkpoint ``latest`` names is never
modified or deleted (saving its step again is an error), so a run killed at any point leaves
``latest`` naming a complete checkpoint (or no ``latest``). What a killed save leaves behind
(``step_N.tmp``, ``step_N.stale``, or a ``step_N`` that ``latest`` does not name yet) is cleared
by the next save.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

LATEST = "latest"
CONFIG = "config.json"  # the run config, so that a checkpoint describes its own model


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The newest complete checkpoint in ``folder``, if any."""
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    path = folder / pointer.read_text().strip()
    if not path.is_dir():  # only if something other than save_checkpoint changed the folder
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
    return path


def save_checkpoint(folder: Path, step: int, state: Dict[str, Any], config: Dict[str, Any]) -> Path:
    """Write ``state`` (sharded) and ``config`` as ``folder/step_<step>`` and make it ``latest``;
    collective. Raises if ``step`` is the latest checkpoint already: that one is never touched."""
    final, tmp, stale = (folder / f"step_{step}{suffix}" for suffix in ("", ".tmp", ".stale"))
    latest = latest_checkpoint(folder) if folder.is_dir() else None
    if latest is not None and latest.name == final.name:
        raise ValueError(f"{final} is the latest checkpoint already; a step is saved once")
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in [*folder.glob("step_*.tmp"), *folder.glob("step_*.stale")]:
            shutil.rmtree(leftover)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        _write_synced(tmp / CONFIG, json.dumps(config, indent=2))
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


def load_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Fill ``state`` (the same structure that was saved) in place from ``path``."""
    dcp.load(state, checkpoint_id=str(path))
