"""torchx components for `memcom` jobs: training (`train`) and conversion on several hosts (`convert`).

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


def convert(
    inputs: str,
    out: str,
    nnodes: int = 2,
    workers: int = 2,
    num_embeddings: str = "100000",
    image: str = ".",
    name: str = "memcom-convert",
    cpu: int = 2,
    memMB: int = 8192,
    python: str = sys.executable,
    extra: str = "",
) -> specs.AppDef:
    """Criteo TSV day files -> one data folder on ``nnodes`` hosts (mod mode; ``out`` on storage all share).

    Role ``convert`` (``nnodes`` replicas): replica K converts days K, K + nnodes, ... with
    ``workers`` processes into ``out/.parts/K``. Role ``merge`` (one replica, started with them):
    waits for every part, moves the shards into place, counts ids and writes the manifest. The
    folder equals what one process writes; every step resumes when run again.

    Args:
        inputs: day files or a folder of them (space-separated), as seen from every host
        out: the data folder (shared storage)
        nnodes: hosts converting, one share of the days each
        workers: processes per host (``memcom data convert --workers``)
        num_embeddings: ``--num-embeddings`` (one size, or 26 comma-separated)
        image: image (container schedulers) or working directory (local_cwd)
        name: job name
        cpu: CPUs per host
        memMB: memory per host in MB
        python: the Python with this package (by default this one; ``python`` in an image)
        extra: more ``memcom data convert`` options, e.g. ``--on-bad-line skip --val-days 23``
    """
    common = ["-m", "torchrec_memcom.cli", "data", "convert", *inputs.split(), "--out", out,
              "--num-embeddings", num_embeddings, "--workers", str(workers), "--quiet", *extra.split()]
    resource = specs.Resource(cpu=cpu, gpu=0, memMB=memMB)
    return specs.AppDef(name=name, roles=[
        specs.Role(name="convert", image=image, entrypoint=python, num_replicas=nnodes, resource=resource,
                   args=[*common, "--part", f"{specs.macros.replica_id}/{nnodes}"]),
        specs.Role(name="merge", image=image, entrypoint=python, num_replicas=1, resource=resource,
                   args=[*common, "--merge-parts", str(nnodes)]),
    ])


def bench(
    config: str,
    data: str,
    out: str,
    methods: str = "hash qr memcom",
    ratios: str = "2 4 8 16 32 64",
    seeds: str = "0",
    nproc: int = 2,
    image: str = ".",
    name: str = "memcom-bench",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    python: str = sys.executable,
) -> specs.AppDef:
    """``memcom bench`` as a job on one host: every arm trains with ``nproc`` processes (torchrun).

    Args:
        config: memcom train config (model, optimizer, train settings)
        data: converted data folder or TorchRec npy folder
        out: folder for the arms and the results (a re-run keeps finished arms)
        methods: methods besides none, space-separated
        ratios: target ratios, space-separated
        seeds: seeds, space-separated
        nproc: processes per training run (one per GPU)
        image: image (container schedulers) or working directory (local_cwd)
        name: job name
        cpu: CPUs
        gpu: GPUs
        memMB: memory in MB
        python: the Python with this package (by default this one; ``python`` in an image)
    """
    args = ["-m", "torchrec_memcom.cli", "bench", "--config", config, "--data", data, "--out", out,
            "--methods", *methods.split(), "--ratios", *ratios.split(), "--seeds", *seeds.split(),
            "--nproc", str(nproc)]
    return specs.AppDef(name=name, roles=[specs.Role(
        name="bench", image=image, entrypoint=python, num_replicas=1,
        resource=specs.Resource(cpu=cpu, gpu=gpu, memMB=memMB), args=args)])
