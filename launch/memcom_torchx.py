"""torchx component for `memcom` training jobs.

Local (2 processes here)::

    .venv/bin/torchx run -s local_cwd launch/memcom_torchx.py:train --nproc 2 --config configs/synthetic_memcom.yaml

Multi-node (the same component; see docs/training.md)::

    torchx run -s slurm launch/memcom_torchx.py:train --nnodes 4 --nproc 8 --config ...
    torchx run -s kubernetes launch/memcom_torchx.py:train --image <image> --torchrun torchrun ...
"""

import shutil
import sys
from pathlib import Path

import torchx.specs as specs
from torchx.components import dist


def _venv_torchrun() -> str:
    """The torchrun next to this Python (the venv's), not whatever PATH finds first."""
    local = Path(sys.executable).with_name("torchrun")
    return str(local) if local.exists() else (shutil.which("torchrun") or "torchrun")


def train(
    config: str,
    nproc: int = 2,
    nnodes: int = 1,
    image: str = ".",
    name: str = "memcom-train",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    torchrun: str = _venv_torchrun(),
    max_retries: int = 0,
    allow_changes: bool = False,
) -> specs.AppDef:
    """DLRM training with compressed tables on ``nnodes`` x ``nproc`` workers.

    Args:
        config: YAML run config (relative to the job's working directory)
        nproc: processes per node (one per GPU on GPU nodes)
        nnodes: nodes
        image: image (container schedulers) or working directory (local_cwd)
        name: job name
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        torchrun: the torchrun launcher to use: by default the one beside this Python (the
            venv's); give the image's (e.g. ``torchrun``) on container schedulers
        max_retries: scheduler retries of a failed job (it resumes from its latest checkpoint)
        allow_changes: resume a checkpoint trained with another config or data (refused by default)
    """
    app = dist.ddp(
        "--config",
        config,
        *(["--allow-changes"] if allow_changes else []),
        m="torchrec_memcom.train.main",
        image=image,
        name=name,
        j=f"{nnodes}x{nproc}",
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        max_retries=max_retries,
    )
    for role in app.roles:
        # dist.ddp shells out to a bare `torchrun`; point it at the right one.
        role.args = [a.replace("torchrun ", f"{torchrun} ", 1) if a.startswith("torchrun ") else a for a in role.args]
    return app
