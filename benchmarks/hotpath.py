"""The per-step hot path of our sharded collections against the stock EBC: forward, backward and
the fused update of the sharded collection alone, arms alternated in the same processes (robust
to a loaded machine).

Every process (gloo on CPU, nccl with one GPU per process) shards, with the same table-wise
plan, a stock ``EmbeddingBagCollection`` and the collection of each method of ``--methods`` at
``--ratio`` (default MEmCom alone) over 26 Criteo-shaped tables (Criteo Kaggle's cardinalities
capped at ``--max-rows``), fused row-wise Adagrad, and times steps of ``--batch-size`` examples
per process with one id per feature (ids skewed like Criteo's). MEmCom is a
``MEmComEmbeddingBagCollection`` of all tables (those under ``--min-rows`` plain); QR and
budgeted tables are built as the benchmarks build them, by ``compress()`` with ``--min-rows``
(the smaller tables in a plain child of a mixed collection), budgeted tables with the heuristic
allocation and a MEmCom tail, their ids ranked by synthetic skewed counts (a sample of the
batches' distribution). Each round runs every arm for ``--steps`` steps, arms in a rotated
order; a ratio is the median over rounds of the stock arm's per-step time over the arm's in the
same round, by wall-clock time and by the main thread's CPU time (which, on a shared machine,
leaves out the time other jobs held the core). ``--baseline DIR`` adds each method's collection
from another checkout (its repository root, e.g. a ``git worktree`` of main) as the arm
``<method>_baseline``, alternated with the rest in the same processes: old against new code
under the same load.

    .venv/bin/python benchmarks/hotpath.py --out /tmp/hotpath.json
    .venv/bin/python benchmarks/hotpath.py --baseline /tmp/main --nprocs 1 2
    .venv/bin/python benchmarks/hotpath.py --methods qr budgeted --baseline /tmp/main --rounds 30
    .venv/bin/python benchmarks/hotpath.py --profile --nprocs 1   # torch.profiler tables, rank 0
    .venv/bin/python benchmarks/hotpath.py --check --baseline /tmp/main --steps 10   # bit-equal to main?
    .venv/bin/python benchmarks/hotpath.py --smoke --nprocs 1 --out /tmp/x.json   # CI: tiny, no claims

DMP wraps a sharded collection with dense parameters in DDP (MEmCom's data-parallel scalars,
empty here; budgeted tables' projections) but not the stock one; in a whole model (DLRM) DDP
wraps both alike.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

# read before any checkout's modules are loaded (and purged) below
from torchrec_memcom.data.schema import KAGGLE_CARDINALITIES

PACKAGE = "torchrec_memcom"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _purge() -> None:
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def _classes(root: Optional[str]) -> Dict[str, Any]:
    """MEmCom's collection, config and sharder classes and ``compress()`` with its spec from the
    checkout at ``root`` (None: the one on ``sys.path``), imported afresh; a checkout's modules
    keep their own globals (and method registry), so the classes of two checkouts run side by
    side."""
    _purge()
    if root is not None:
        sys.path.insert(0, root)
    try:
        from torchrec_memcom.compression import CompressionSpec, compress
        from torchrec_memcom.distributed.memcom_embeddingbag import MEmComEmbeddingBagCollectionSharder
        from torchrec_memcom.modules.memcom_config import MEmComConfig
        from torchrec_memcom.modules.memcom_embedding_bag import MEmComEmbeddingBagCollection
    finally:
        if root is not None:
            sys.path.remove(root)
            _purge()
    return {
        "collection": MEmComEmbeddingBagCollection,
        "config": MEmComConfig,
        "sharder": MEmComEmbeddingBagCollectionSharder,
        "compress": compress,
        "spec": CompressionSpec,
    }


def _frequencies(sizes: List[int], draws: int = 100_000) -> Dict[str, Any]:
    """Per table, synthetic skewed counts of its ids: a sample of ``draws`` ids of the batches'
    distribution (``u**4 * n``); ties and noise leave most tables needing the rank remap."""
    import torch

    g = torch.Generator().manual_seed(7)
    return {
        f"t_{i}": torch.bincount((torch.rand(draws, generator=g) ** 4 * n).long(), minlength=n)
        for i, n in enumerate(sizes)
    }


def _batches(a: argparse.Namespace, sizes: List[int], rank: int, device: Any) -> List[Any]:
    """A few KJTs of ``--batch-size`` bags of one id per feature; ids skewed (u**4 * n)."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(4):
        ids = [(torch.rand(a.batch_size, generator=g) ** 4 * n).long() for n in sizes]
        out.append(
            KeyedJaggedTensor.from_lengths_sync(
                keys=[f"cat_{i}" for i in range(len(sizes))],
                values=torch.cat(ids),
                lengths=torch.ones(len(sizes) * a.batch_size, dtype=torch.int32),
            ).to(device)
        )
    return out


def _sharded(ebc: Any, sharder: Any, world_size: int, device: Any) -> Any:
    """``ebc`` under DMP with every lookup table table-wise, round-robin over the ranks."""
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    names = list(sharder.shardable_parameters(ebc))
    plan = construct_module_sharding_plan(
        ebc,
        {n: table_wise(rank=i % world_size, compute_kernel="fused") for i, n in enumerate(names)},
        sharder=sharder,
        local_size=world_size,
        world_size=world_size,
        device_type=device.type,
    )
    return DistributedModelParallel(
        ebc,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        plan=ShardingPlan({"": plan}),
        sharders=[sharder],
        device=device,
    )


def _compressed(c: Dict[str, Any], method: str, a: argparse.Namespace, tables: List[Any], fused: Dict[str, Any]) -> Any:
    """``method``'s collection of ``tables`` on meta as ``compress()`` builds it for the
    benchmarks (``--min-rows``; budgeted: a budget ratio, the heuristic with a MEmCom tail),
    and its sharder."""
    import torch
    from torch import nn
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    params: Dict[str, Any] = {"ratio": a.ratio}
    if method == "budgeted":
        params = {
            "budget_ratio": a.ratio,
            "frequencies": _frequencies([t.num_embeddings for t in tables]),
            "tail": True,
        }
    holder = nn.Module()
    holder.ebc = EmbeddingBagCollection(tables, device=torch.device("meta"))
    _, sharders = c["compress"](holder, c["spec"](method=method, params=params, min_rows=a.min_rows), fused)
    return holder.ebc, next(s for s in sharders if s.module_type is type(holder.ebc))


def _arms(a: argparse.Namespace, sizes: List[int], world_size: int, device: Any) -> Dict[str, Any]:
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05, "eps": 1e-8}
    tables = [
        EmbeddingBagConfig(name=f"t_{i}", embedding_dim=a.dim, num_embeddings=n, feature_names=[f"cat_{i}"])
        for i, n in enumerate(sizes)
    ]
    meta = torch.device("meta")
    checkouts = {"": _classes(None)}
    if a.baseline:
        checkouts["_baseline"] = _classes(a.baseline)
    arms = {
        "stock": _sharded(
            EmbeddingBagCollection(tables, device=meta),
            EmbeddingBagCollectionSharder(fused_params=fused),
            world_size,
            device,
        )
    }
    for method in a.methods:
        for suffix, c in checkouts.items():
            if method == "memcom":
                spec = c["config"](ratio=a.ratio, min_rows=a.min_rows, hash=a.hash)
                module, sharder = c["collection"](tables, spec, device=meta), c["sharder"](fused_params=fused)
            else:
                module, sharder = _compressed(c, method, a, tables, fused)
            arms[method + suffix] = _sharded(module, sharder, world_size, device)
    return arms


def _same_steps(new: Any, old: Any, batches: List[Any], grad: Any, steps: int) -> List[int]:
    """Train a method's collection and the baseline's from the same state on the same batches:
    whether their outputs were bit-equal at every step, and their state dicts after (this rank's
    shards)."""
    import torch

    old.load_state_dict(new.state_dict())
    outputs = True
    for i in range(steps):
        kts = [model(batches[i % len(batches)]) for model in (new, old)]
        keys = sorted(kts[0].keys())
        values = [torch.cat([kt[k] for k in keys], dim=1) for kt in kts]  # by key, never position
        outputs = outputs and torch.equal(values[0], values[1])
        for v in values:
            (v * grad).sum().backward()

    def local(value: Any) -> List[Any]:
        return [s.tensor for s in value.local_shards()] if hasattr(value, "local_shards") else [value]

    states = [model.state_dict() for model in (new, old)]
    state = states[0].keys() == states[1].keys() and all(
        torch.equal(x, y) for k in states[0] for x, y in zip(local(states[0][k]), local(states[1][k]))
    )
    return [int(outputs), int(state)]


def _worker(rank: int, world_size: int, port: int, a: argparse.Namespace, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(a.threads)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world_size)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    sizes = [min(n, a.max_rows) for n in KAGGLE_CARDINALITIES]
    arms = _arms(a, sizes, world_size, device)
    batches = _batches(a, sizes, rank, device)
    grad = torch.randn(a.batch_size, len(sizes) * a.dim, device=device)

    def step(model: Any, i: int) -> None:
        out = model(batches[i % len(batches)])
        (out.values() * grad).sum().backward()

    if a.check:
        report = {}
        for method in a.methods:
            pair = _same_steps(arms[method], arms[method + "_baseline"], batches, grad, a.steps)
            same = torch.tensor(pair, dtype=torch.int32)
            dist.all_reduce(same, op=dist.ReduceOp.MIN)
            report[method] = {"outputs_bit_equal": bool(same[0]), "state_bit_equal": bool(same[1])}
        if rank == 0:
            queue.put(report)
        dist.barrier()
        dist.destroy_process_group()
        return
    names = list(arms)
    for name in names:  # warm-up: caches, allocator, first-call paths
        for i in range(5):
            step(arms[name], i)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        report = {}
        for name in [n for n in names if n != "stock"] + ["stock"]:
            with profile(activities=activities) as prof:
                for i in range(a.steps):
                    step(arms[name], i)
                sync()
            report[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        if rank == 0:
            queue.put(report)
        dist.barrier()
        dist.destroy_process_group()
        return
    # wall time, and the main thread's CPU time: on a shared machine the latter leaves out the
    # time other jobs held the core (1 torch thread; gloo's threads and GPU kernels not counted)
    times: Dict[str, Dict[str, List[List[float]]]] = {c: {n: [] for n in names} for c in ("wall", "cpu")}
    for r in range(a.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = [], []
            dist.barrier()
            for i in range(a.steps):
                sync()
                t, c = time.perf_counter(), time.thread_time()
                step(arms[name], i)
                sync()
                wall.append((time.perf_counter() - t) * 1e3)
                cpu.append((time.thread_time() - c) * 1e3)
            times["wall"][name].append(wall)
            times["cpu"][name].append(cpu)
    if rank == 0:
        queue.put(times)
    dist.barrier()
    dist.destroy_process_group()


def run(a: argparse.Namespace, world_size: int) -> Any:
    """Spawn ``world_size`` processes; rank 0's result."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, a, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    result = queue.get()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"hot-path run on {world_size} processes failed: exit codes {[p.exitcode for p in procs]}")
    return result


def summarize(times: Dict[str, List[List[float]]]) -> Dict[str, Any]:
    """Per arm: median ms per step (over all steps), and per round the stock median over the
    arm's; their median is the arm's speed relative to stock."""
    out = {}
    stock = [statistics.median(r) for r in times["stock"]]
    for name, rounds in times.items():
        med = [statistics.median(r) for r in rounds]
        ratios = sorted(s / m for s, m in zip(stock, med))
        out[name] = {
            "ms_per_step": statistics.median(x for r in rounds for x in r),
            "speed_vs_stock": statistics.median(ratios),
            "speed_vs_stock_quartiles": [ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]],
        }
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    parser.add_argument(
        "--methods", nargs="+", default=["memcom"], choices=["memcom", "qr", "budgeted"], help="the arms beside stock"
    )
    parser.add_argument("--batch-size", type=int, default=2048, help="per process")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=16)
    parser.add_argument("--min-rows", type=int, default=1000)
    parser.add_argument("--max-rows", type=int, default=100_000, help="cap on a table's rows")
    parser.add_argument("--hash", default="mod", choices=["mod", "mix"])
    parser.add_argument("--steps", type=int, default=2, help="steps per arm and round")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--baseline", help="repository root of another checkout: its collections as further arms")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of rank 0 instead")
    parser.add_argument(
        "--check",
        action="store_true",
        help="instead: train each method's collection and --baseline's from the same state for --steps steps; "
        "exit 1 unless outputs and state stay bit-equal",
    )
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: structure only, no timing claims")
    a = parser.parse_args(argv)
    if a.smoke:
        a.batch_size, a.max_rows, a.steps, a.rounds = 64, 5000, 1, 2
    if a.baseline:
        a.baseline = str(Path(a.baseline).resolve())
    elif a.check:
        parser.error("--check needs --baseline")
    result: Dict[str, Any] = {
        "setup": {k: v for k, v in vars(a).items() if k not in ("out", "profile")},
        "machine": {"cpu_count": os.cpu_count(), "loadavg_1min_before": os.getloadavg()[0]},
        "nprocs": {},
    }
    for n in a.nprocs:
        out = run(a, n)
        if a.check:
            for method, same in out.items():
                print(f"{n} proc, {method}, {a.steps} steps against {a.baseline}: {same}")
            if not all(all(same.values()) for same in out.values()):
                return 1
            continue
        if a.profile:
            for name, table in out.items():
                print(f"== {name}, {n} process(es), rank 0, {a.steps} steps\n{table}")
            continue
        result["nprocs"][str(n)] = summary = {clock: summarize(t) for clock, t in out.items()}
        for clock, per in summary.items():
            for name, s in per.items():
                q = s["speed_vs_stock_quartiles"]
                print(
                    f"{n} proc {clock:>4} {name:>16}: {s['ms_per_step']:7.2f} ms/step, speed vs stock "
                    f"{s['speed_vs_stock']:.3f} (quartiles {q[0]:.3f}-{q[1]:.3f})",
                    flush=True,
                )
    if a.out and not (a.profile or a.check):
        Path(a.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
