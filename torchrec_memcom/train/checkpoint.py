"""Sharded checkpoints with torch.distributed.checkpoint, never left half written.

Every rank writes its shards into ``step_N.tmp``; after a barrier rank 0 renames it to
``step_N`` and then atomically rewrites ``latest``. A run killed at any point leaves ``latest``
naming a complete checkpoint (or none); a stale ``.tmp`` is cleared before the next save.
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
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
    return path


def save_checkpoint(folder: Path, step: int, state: Dict[str, Any], config: Dict[str, Any]) -> Path:
    """Write ``state`` (sharded) and ``config`` as ``folder/step_<step>``; collective."""
    final, tmp = folder / f"step_{step}", folder / f"step_{step}.tmp"
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = folder / f"{LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, folder / LATEST)
    dist.barrier()
    return final


def load_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Fill ``state`` (the same structure that was saved) in place from ``path``."""
    dcp.load(state, checkpoint_id=str(path))
