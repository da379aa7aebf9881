"""Run a test body on several processes on this machine: gloo (CI has no GPU), or nccl with one
GPU per process."""

import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, backend: str, fn: Callable[..., None], args: Any, errors: Any
) -> None:
    # all of a rank's variables: an in-process single-rank run earlier in the session leaves
    # LOCAL_WORLD_SIZE=1 behind, which would make TorchRec place shards as if on other hosts
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # leave together
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalisation, as torchrec_memcom.train.main.run_rank does and for its reason
    # (a Gloo thread freeing a collective's tensors during finalisation aborts a rank that passed).
    os._exit(0)


def run_multiprocess(fn: Callable[..., None], world_size: int = 2, *args: Any, backend: str = "gloo") -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes (``backend``: gloo, or
    nccl with GPU ``rank`` each); re-raise a failure."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, errors)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    if not errors.empty():
        raise AssertionError(errors.get())
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world_size, f"exit codes {codes}"
