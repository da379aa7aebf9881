"""Training throughput, peak memory and eager inference latency of each compression method,
against the stock `EmbeddingBagCollection` with the same shapes, measured in the same run.

Training: every method (none, hash, QR, MEmCom, and budgeted tables once registered) at one
compression ratio (``--ratio``, or the nearest one the method reaches) trains the same DLRM on
the same synthetic Criteo-shaped data for the same steps, on 1 and on 2 processes (gloo on CPU;
nccl, one GPU per process, when GPUs are present), each run a fresh ``torchrun`` job so that
peak memory is its own. Every repeat runs every arm once, methods in a rotated order, so that
load on a shared machine hits all alike; a method's throughput ratio is the median over repeats
of its examples/s over the stock model's in the same repeat. Every process of every arm uses
``--threads`` torch/OpenMP threads.

Inference: the model each method trained (1-process run of the first repeat, loaded from its
checkpoint into the unsharded eager module, no DMP) answers batches of 1 and 512 validation
examples; p50 and p99 latency over all calls, methods interleaved. (The exported-model latency
is benchmarks/inference.py's.)

    .venv/bin/python benchmarks/speed.py                         # the full run: docs/speed.{json,png}
    .venv/bin/python benchmarks/speed.py --smoke --out /tmp/x     # what CI runs: tiny, no timing claims
    .venv/bin/python benchmarks/speed.py --profile none memcom    # cProfile of in-process training
    .venv/bin/python benchmarks/speed.py --nprocs 1 --name gpu    # one process only, docs/gpu.{json,png} (gpu_check.sh)
"""

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (  # noqa: E402  (the shared harness pieces)
    compression,
    free_port,
    machine,
    methods,
    quiet,
    unreachable,
)

if TYPE_CHECKING:  # torch is imported inside the functions that run it
    import torch

REPO = Path(__file__).resolve().parents[1]
BATCHES = (1, 512)
DIAGNOSTIC_ARMS = ["hash@table_wise", "memcom@table_wise", "qr@table_wise", "budgeted@table_wise"]


def config_dict(
    data: Path,
    block: Dict[str, Any],
    a: argparse.Namespace,
    run_dir: Path,
    checkpoint_dir: Optional[Path] = None,
    steps: Optional[int] = None,
) -> Dict[str, Any]:
    # evaluation is not timed; a few batches keep each job short
    train: Dict[str, Any] = {
        "batch_size": a.batch_size,
        "steps": steps or a.steps,
        "run_dir": str(run_dir),
        "seed": 0,
        "eval_batches": 20,
    }
    if checkpoint_dir is not None:
        train["checkpoint_dir"] = str(checkpoint_dir)
    return {
        "data": {"path": str(data)},
        "model": {"arch": "DLRM", "dense_arch_layer_sizes": [64], "over_arch_layer_sizes": [64, 32, 1]},
        "embeddings": {"dim": a.dim, "compression": block},
        "optimizer": {"sparse": {"type": "rowwise_adagrad", "lr": 0.05}, "dense": {"type": "adagrad", "lr": 0.05}},
        "train": train,
    }


def write_config(path: Path, config: Dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def resolve_ratio(
    method: str, target: float, a: argparse.Namespace, data: Path, sizes: List[int]
) -> Tuple[float, Dict[str, Any]]:
    """``target``, or the reachable ratio nearest to it (in log scale), and its config block."""
    if method == "none":
        return 1.0, compression("none", 1, a.min_rows, data)
    candidates = [target] + [target * 2 ** (s * k / 8) for k in range(1, 33) for s in (-1, 1)]
    for ratio in candidates:
        ratio = round(ratio, 2)
        if ratio < 1:
            continue
        block = compression(method, ratio, a.min_rows, data)
        if unreachable(method, block, a.dim, sizes) is None:
            return ratio, block
    raise ValueError(f"{method}: no ratio near {target} is reachable on these tables")


def launch_arm(config: Path, nproc: int, threads: int, sharding: Optional[str]) -> Dict[str, Any]:
    """One training job of ``nproc`` processes (torchrun); its results.json."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(Path(__file__).resolve()),
        "--worker",
        "--config",
        str(config),
        "--threads",
        str(threads),
    ]
    if sharding:
        cmd += ["--sharding", sharding]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{config} on {nproc} processes failed:\n{done.stdout[-4000:]}")
    from torchrec_memcom.train.config import load_config

    results = json.loads((Path(load_config(config).train.run_dir) / "results.json").read_text())
    results["loadavg_1min_before"] = load
    return results


def pin_sharding(sharding: Optional[str]) -> Callable[[], None]:
    """Diagnostic arms (``method@table_wise``): offer the planner only this sharding type, for
    our sharders and the stock ones alike (by default it picks, e.g., row-wise for MEmCom and
    hashed tables on one CPU rank, where the stock EBC, without row-wise on CPU, gets
    table-wise). Returns a function that undoes it."""
    if not sharding:
        return lambda: None
    from torchrec.distributed.sharding_plan import get_default_sharders

    import torchrec_memcom.methods  # noqa: F401  (registers them)
    from torchrec_memcom.registry import methods

    classes = {type(s) for s in get_default_sharders()} | {type(m.sharder(None)) for m in methods()}
    originals = {k: vars(k)["sharding_types"] for c in classes for k in c.__mro__ if "sharding_types" in vars(k)}
    for cls, original in originals.items():

        def sharding_types(self: Any, compute_device_type: str, _original: Any = original) -> List[str]:
            types = _original(self, compute_device_type)
            return [t for t in types if t == sharding] or types

        cls.sharding_types = sharding_types

    def undo() -> None:
        for cls, original in originals.items():
            cls.sharding_types = original

    return undo


def planned_sharding(config_path: Path, nproc: int, sharding: Optional[str]) -> Dict[str, int]:
    """The sharding types (and kernels) the trainer's planner gives this arm's tables, counted:
    the same planner, topology and sharders as the trainer, run here without a process group."""
    import torch
    from torchrec.distributed.planner import Topology

    from torchrec_memcom.data import load_manifest
    from torchrec_memcom.data.schema import CAT_NAMES
    from torchrec_memcom.distributed.planner import memcom_planner
    from torchrec_memcom.train.config import load_config
    from torchrec_memcom.train.model import build_model

    config = load_config(config_path)
    manifest = load_manifest(config.data.path)
    sizes = [manifest["features"][f]["num_embeddings"] for f in CAT_NAMES]
    undo = pin_sharding(sharding)
    try:
        gpu = torch.cuda.is_available()
        model, sharders = build_model(config, sizes, torch.device("cuda" if gpu else "cpu"))
        if gpu:
            topology = Topology(
                world_size=nproc,
                local_world_size=nproc,
                compute_device="cuda",
                hbm_cap=torch.cuda.get_device_properties(0).total_memory,
            )
        else:
            ddr = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // nproc
            topology = Topology(world_size=nproc, local_world_size=nproc, compute_device="cpu", ddr_cap=ddr)
        plan = memcom_planner(topology, batch_size=config.train.batch_size).plan(model, sharders)
    finally:
        undo()
    counts: Dict[str, int] = {}
    for per_module in plan.plan.values():
        for p in per_module.values():  # type: ignore[attr-defined]
            key = f"{p.sharding_type}/{p.compute_kernel}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def split_arm(arm: str) -> Tuple[str, Optional[str]]:
    """``"memcom@table_wise"`` -> ("memcom", "table_wise"); ``"memcom"`` -> ("memcom", None)."""
    method, _, sharding = arm.partition("@")
    return method, sharding or None


def worker(config: str, threads: int, sharding: Optional[str]) -> None:
    """The per-rank entry point of a training arm (torchrun starts it)."""
    import torch

    torch.set_num_threads(threads)
    quiet()
    pin_sharding(sharding)
    from torchrec_memcom.train.main import run_rank

    run_rank(config, debug=True)  # a benchmark failure is a bug to trace: its traceback too


# ---------------------------------------------------------------------------------------------
# Inference


def eager_model(config_path: Path, checkpoint: Path, work: Path) -> Any:
    """The trained DLRM, unsharded and eager: built on CPU as the trainer builds it (same
    compression), weights from the run's final DCP checkpoint."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from torchrec_memcom.compression import compress
    from torchrec_memcom.data import load_manifest
    from torchrec_memcom.data.schema import CAT_NAMES, INT_NAMES
    from torchrec_memcom.train.config import load_config
    from torchrec_memcom.train.model import table_configs

    config = load_config(config_path)
    manifest = load_manifest(config.data.path)
    sizes = [manifest["features"][f]["num_embeddings"] for f in CAT_NAMES]
    cpu = torch.device("cpu")
    ebc = EmbeddingBagCollection(table_configs(config.embeddings.dim, sizes), device=cpu)
    dlrm = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=len(INT_NAMES),
        dense_arch_layer_sizes=config.model.dense_arch_layer_sizes + [config.embeddings.dim],
        over_arch_layer_sizes=config.model.over_arch_layer_sizes,
        dense_device=cpu,
    )
    model, _ = compress(DLRMTrain(dlrm), config.embeddings.compression)
    latest = checkpoint / (checkpoint / "latest").read_text().strip()
    flat = work / f"{checkpoint.name}.pt"
    dcp_to_torch_save(latest, flat)
    state = torch.load(flat, weights_only=False)["model"]
    flat.unlink()
    model.load_state_dict(state, strict=True)
    return model.model.eval()


def measure_latency(models: Dict[str, Any], data: Path, a: argparse.Namespace) -> Dict[str, Any]:
    """p50/p99 of one forward per batch size, all methods interleaved in every repeat."""
    import numpy as np
    import torch

    from torchrec_memcom.data import CriteoParquetLoader

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.set_num_threads(a.latency_threads)
    inputs = {}
    for bs in BATCHES:
        loader = CriteoParquetLoader(data, "val", bs, shuffle=False, drop_last=True)
        batches = []
        for batch in loader:
            batches.append((batch.dense_features.to(device), batch.sparse_features.to(device)))
            if len(batches) == (64 if bs == 1 else 8):
                break
        inputs[bs] = batches
    models = {m: model.to(device) for m, model in models.items()}
    iters = {1: a.latency_iters_1, 512: a.latency_iters_512}
    samples: Dict[str, Dict[int, List[float]]] = {m: {bs: [] for bs in BATCHES} for m in models}
    names = list(models)
    with torch.inference_mode():
        for m in names:  # warm-up: allocator, first-call paths
            for bs in BATCHES:
                for x in inputs[bs][:5]:
                    models[m](*x)
        for rep in range(a.latency_repeats):
            for m in names[rep % len(names) :] + names[: rep % len(names)]:
                for bs in BATCHES:
                    batches = inputs[bs]
                    for i in range(iters[bs]):
                        x = batches[i % len(batches)]
                        sync()
                        t0 = time.perf_counter()
                        models[m](*x)
                        sync()
                        samples[m][bs].append(time.perf_counter() - t0)
    out: Dict[str, Any] = {}
    for m in names:
        out[m] = {}
        for bs in BATCHES:
            s = np.array(samples[m][bs]) * 1e3
            out[m][str(bs)] = {
                "p50_ms": float(np.percentile(s, 50)),
                "p99_ms": float(np.percentile(s, 99)),
                "mean_ms": float(s.mean()),
                "calls": int(s.size),
            }
    for m in names:
        for bs in map(str, BATCHES):
            base = out["none"][bs] if "none" in out else None
            if base:
                out[m][bs]["p50_ratio_vs_stock"] = out[m][bs]["p50_ms"] / base["p50_ms"]
                out[m][bs]["p99_ratio_vs_stock"] = out[m][bs]["p99_ms"] / base["p99_ms"]
    return {
        "device": str(device),
        "torch_threads": a.latency_threads,
        "repeats": a.latency_repeats,
        "calls_per_repeat": {str(k): v for k, v in iters.items()},
        "methods": out,
    }


# ---------------------------------------------------------------------------------------------
# Profile


def profile(names: List[str], data: Path, a: argparse.Namespace, sizes: List[int], work: Path) -> Dict[str, Any]:
    """cProfile over in-process single-rank training (``--profile-steps`` steps) per method."""
    import torch

    from torchrec_memcom.train.config import load_config
    from torchrec_memcom.train.trainer import train

    torch.set_num_threads(a.threads)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    out_dir = Path(a.profile_out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    for arm in names:
        method, sharding = split_arm(arm)
        ratio, block = resolve_ratio(method, a.ratio, a, data, sizes)
        path = write_config(
            work / f"profile_{arm}" / "config.yaml",
            config_dict(data, block, a, work / f"profile_{arm}", steps=a.profile_steps),
        )
        os.environ["MASTER_PORT"] = str(free_port())
        undo = pin_sharding(sharding)
        prof = cProfile.Profile()
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            results = prof.runcall(train, load_config(path))
        undo()
        prof.dump_stats(str(out_dir / f"{arm}.prof"))
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(60)
        (out_dir / f"{arm}.txt").write_text(text.getvalue())
        report[arm] = {
            "ratio": ratio,
            "examples_per_s_under_profiler": results["examples_per_s"],
            "stats": str(out_dir / f"{arm}.prof"),
            "text": str(out_dir / f"{arm}.txt"),
        }
        print(
            f"== {arm} ({ratio:g}x): {results['examples_per_s']:.0f} examples/s under cProfile; "
            f"top functions by own time:"
        )
        stats.stream = sys.stdout
        stats.sort_stats("tottime").print_stats(15)
    return report


def kernel_costs(a: argparse.Namespace, sizes: List[int], device: "torch.device", iters: int = 200) -> Dict[str, Any]:
    """FBGEMM's table-batched kernel alone, forward + backward with the fused row-wise Adagrad,
    on MEmCom's shared tables at ``--ratio``: unweighted (a stock lookup) against weighted with
    per-sample weights that need a gradient (MEmCom's lookup). Interleaved; medians in ms."""
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        PoolingMode,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    from torchrec_memcom.modules.memcom_config import MEmComConfig

    torch.set_num_threads(a.threads)
    rows = [
        MEmComConfig(ratio=a.ratio).hash_rows(n, a.dim, f"cat_{i}") if n >= a.min_rows else n
        for i, n in enumerate(sizes)
    ]
    cuda = device.type == "cuda"
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [
            (
                r,
                a.dim,
                EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST,
                ComputeDevice.CUDA if cuda else ComputeDevice.CPU,
            )
            for r in rows
        ],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01,
        pooling_mode=PoolingMode.SUM,
        device=device,
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, r, (a.batch_size,), generator=g) for r in rows]).to(device)
    offsets = torch.arange(ids.numel() + 1, device=device)  # Criteo: one id per feature and bag
    times: Dict[str, List[float]] = {"unweighted": [], "weighted": []}
    for i in range(2 * iters + 20):
        arm = "weighted" if i % 2 else "unweighted"
        w = torch.rand(ids.numel(), device=device, requires_grad=True) if arm == "weighted" else None
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        tbe(ids, offsets, per_sample_weights=w).sum().backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= 20:  # warm-up
            times[arm].append((time.perf_counter() - t) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "tables": len(rows),
        "rows": rows,
        "ids_per_step": ids.numel(),
        "iters": iters,
        "unweighted_ms": med["unweighted"],
        "weighted_ms": med["weighted"],
        "weighted_over_unweighted": med["weighted"] / med["unweighted"],
    }


# ---------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: structure only, no timing claims")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="arms: METHOD or METHOD@SHARDING_TYPE (a diagnostic arm whose planner may use only "
        "that sharding type); default: none, every registered method, and "
        f"{' '.join(DIAGNOSTIC_ARMS)} (not in --smoke)",
    )
    parser.add_argument("--ratio", type=float, default=16, help="target ratio (else the nearest reachable)")
    parser.add_argument("--min-rows", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=512, help="per process")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rows", type=int, default=400_000, help="synthetic rows")
    parser.add_argument("--max-cardinality", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of every training process")
    parser.add_argument("--latency-threads", type=int, default=1)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--latency-iters-1", type=int, default=200, help="batch-1 calls per method and repeat")
    parser.add_argument("--latency-iters-512", type=int, default=20, help="batch-512 calls per method and repeat")
    parser.add_argument(
        "--profile",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="instead of the benchmark: cProfile in-process training of these methods",
    )
    parser.add_argument("--profile-steps", type=int, default=200)
    parser.add_argument("--profile-out", default=str(Path(tempfile.gettempdir()) / "memcom_speed_profile"))
    parser.add_argument("--out", default=str(REPO / "docs"))
    parser.add_argument(
        "--name",
        default=None,
        help="file name of the results, NAME.json and NAME.png in --out (default speed, speed_smoke)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--sharding", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.worker:
        worker(a.config, a.threads, a.sharding)
        return 0
    if a.smoke:
        a.repeats, a.steps, a.rows, a.max_cardinality, a.batch_size = 1, 5, 8000, 5000, 64
        a.latency_repeats, a.latency_iters_1, a.latency_iters_512 = 1, 5, 2
    quiet()
    import torch

    from torchrec_memcom.data import synthesize

    names = a.methods or methods() + ([] if a.smoke else DIAGNOSTIC_ARMS)
    if "none" not in names:
        names = ["none", *names]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nprocs = [n for n in a.nprocs if not gpus or n <= gpus]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="memcom_speed_") as tmp:
        work = Path(tmp)
        data = work / "data"
        manifest = synthesize(a.rows, data, seed=0, max_cardinality=a.max_cardinality, progress=False)
        sizes = [manifest["features"][f"cat_{i}"]["num_embeddings"] for i in range(26)]
        if a.profile:
            profile(a.profile, data, a, sizes, work)
            return 0
        blocks = {m: resolve_ratio(split_arm(m)[0], a.ratio, a, data, sizes) for m in names}
        samples: Dict[str, Dict[int, List[Dict[str, Any]]]] = {m: {n: [] for n in nprocs} for m in names}
        for rep in range(a.repeats):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for nproc in nprocs:
                for m in order:
                    run_dir = work / "runs" / f"{m}_{nproc}_{rep}"
                    ckpt = work / "ckpt" / m if (rep == 0 and nproc == nprocs[0]) else None
                    path = write_config(run_dir / "config.yaml", config_dict(data, blocks[m][1], a, run_dir, ckpt))
                    r = launch_arm(path, nproc, a.threads, split_arm(m)[1])
                    r["config_path"] = str(path)
                    samples[m][nproc].append(r)
                    print(
                        f"repeat {rep} nproc {nproc} {m:>8}: {r['examples_per_s']:9.0f} examples/s, peak "
                        f"{r['peak_memory_bytes'] / 2**20:7.1f} MiB, ratio {r['compression_ratio']:.2f}x "
                        f"(load {r['loadavg_1min_before']:.1f})",
                        flush=True,
                    )
        training = summarize(samples, names, nprocs)
        for m in names:
            for nproc in nprocs:
                training[m][str(nproc)]["planned_sharding"] = planned_sharding(
                    Path(samples[m][nproc][0]["config_path"]), nproc, split_arm(m)[1]
                )
        models = {}
        for m in (m for m in names if "@" not in m):  # a pinned arm's eager model is its method's
            first = samples[m][nprocs[0]][0]  # the run that saved a checkpoint
            models[m] = eager_model(Path(first["config_path"]), work / "ckpt" / m, work)
        latency = measure_latency(models, data, a)
        kernel = kernel_costs(a, sizes, torch.device("cuda" if gpus else "cpu"), iters=20 if a.smoke else 200)
    result = {
        "smoke": a.smoke,
        "machine": machine(),
        "backend": "nccl" if gpus else "gloo",
        "threads_per_process": a.threads,
        "omp_num_threads": a.threads,
        "setup": {
            "model": "DLRM, dense arch [64, dim], over arch [64, 32, 1]",
            "dim": a.dim,
            "batch_size_per_process": a.batch_size,
            "steps": a.steps,
            "rows": a.rows,
            "max_cardinality": a.max_cardinality,
            "min_rows": a.min_rows,
            "target_ratio": a.ratio,
            "optimizer": "row-wise Adagrad (sparse, fused) + Adagrad (dense), lr 0.05",
        },
        "repeats": a.repeats,
        "nprocs": nprocs,
        "ratios": {m: blocks[m][0] for m in names},
        "training": training,
        "inference": latency,
        "kernel": kernel,
        "seconds": time.time() - started,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = a.name or ("speed_smoke" if a.smoke else "speed")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    _plot(result, out / f"{name}.png")
    print(tables(result))
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')} in {result['seconds']:.0f}s")
    return 0


def summarize(
    samples: Dict[str, Dict[int, List[Dict[str, Any]]]], names: List[str], nprocs: List[int]
) -> Dict[str, Any]:
    """Medians over repeats, and ratios to the stock run of the same repeat (then their median)."""
    table: Dict[str, Any] = {}
    for m in names:
        table[m] = {}
        for nproc in nprocs:
            rs, base = samples[m][nproc], samples["none"][nproc]
            tput = [r["examples_per_s"] / b["examples_per_s"] for r, b in zip(rs, base)]
            mem = [r["peak_memory_bytes"] / b["peak_memory_bytes"] for r, b in zip(rs, base)]
            table[m][str(nproc)] = {
                "examples_per_s": statistics.median(r["examples_per_s"] for r in rs),
                "examples_per_s_all": [r["examples_per_s"] for r in rs],
                "throughput_ratio_vs_stock": statistics.median(tput),
                "throughput_ratio_all": tput,
                "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in rs),
                "peak_memory_ratio_vs_stock": statistics.median(mem),
                "peak_memory_ratio_all": mem,
                "embedding_bytes": rs[0]["embedding_bytes"],
                "compression_ratio": rs[0]["compression_ratio"],
                "auc_after_training": statistics.median(r["auc"] for r in rs),
                "loadavg_1min_before": [r["loadavg_1min_before"] for r in rs],
            }
    return table


def tables(result: Dict[str, Any]) -> str:
    lines = [
        "| method | ratio | procs | examples/s | vs stock (min-max) | peak memory MiB | vs stock |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, per in result["training"].items():
        for nproc, r in per.items():
            lines.append(
                f"| {m} | {r['compression_ratio']:.2f}x | {nproc} | {r['examples_per_s']:.0f} | "
                f"{r['throughput_ratio_vs_stock']:.3f} ({min(r['throughput_ratio_all']):.3f}-{max(r['throughput_ratio_all']):.3f}) | "
                f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['peak_memory_ratio_vs_stock']:.3f} |"
            )
    k = result["kernel"]
    lines += [
        "",
        f"FBGEMM kernel alone ({k['tables']} tables, {k['ids_per_step']} ids, forward + backward): "
        f"unweighted {k['unweighted_ms']:.3f} ms, weighted {k['weighted_ms']:.3f} ms "
        f"({k['weighted_over_unweighted']:.2f}x)",
    ]
    if result["inference"]:
        lines += ["", "| method | batch | p50 ms | p99 ms | p50 vs stock | p99 vs stock |", "|---|---|---|---|---|---|"]
        for m, per in result["inference"]["methods"].items():
            for bs, r in per.items():
                lines.append(
                    f"| {m} | {bs} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                    f"{r.get('p50_ratio_vs_stock', 1):.3f} | {r.get('p99_ratio_vs_stock', 1):.3f} |"
                )
    return "\n".join(lines)


COLORS = {"none": "gray", "hash": "tab:orange", "qr": "tab:green", "memcom": "tab:blue", "budgeted": "tab:purple"}


def _plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    training = result["training"]
    names = list(training)
    nprocs = [str(n) for n in result["nprocs"]]
    panels = 2 + (len(BATCHES) if result["inference"] else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4))
    width = 0.8 / len(nprocs)
    x = np.arange(len(names))
    for ax, key, title in (
        (axes[0], "throughput", "training examples/s vs stock"),
        (axes[1], "peak_memory", "peak memory vs stock"),
    ):
        for j, nproc in enumerate(nprocs):
            mid = [training[m][nproc][f"{key}_ratio_vs_stock"] for m in names]
            alls = [training[m][nproc][f"{key}_ratio_all"] for m in names]
            err = [[v - min(a) for v, a in zip(mid, alls)], [max(a) - v for v, a in zip(mid, alls)]]
            ax.bar(
                x + (j - (len(nprocs) - 1) / 2) * width,
                mid,
                width,
                yerr=err,
                capsize=3,
                label=f"{nproc} process{'es' if nproc != '1' else ''}",
                hatch=["", "//", "xx"][j % 3],
                color=[COLORS.get(split_arm(m)[0], "gray") for m in names],
                edgecolor="black",
            )
        ax.axhline(1.0, color="black", lw=0.8)
        if key == "throughput":
            ax.axhline(0.95, color="red", lw=0.8, ls="--", label="MEmCom target 0.95x")
        ax.set_xticks(x, [f"{m} {result['ratios'][m]:g}x" for m in names], fontsize=8, rotation=35, ha="right")
        ax.set_title(title + "\n(median of repeats; bars: min-max)", fontsize=9)
        ax.legend(fontsize=7)
    if result["inference"]:
        inf = result["inference"]["methods"]
        eager = list(inf)
        xe = np.arange(len(eager))
        for ax, bs in zip(axes[2:], map(str, BATCHES)):
            p50 = [inf[m][bs]["p50_ms"] for m in eager]
            p99 = [inf[m][bs]["p99_ms"] for m in eager]
            ax.bar(xe, p50, color=[COLORS.get(m, "gray") for m in eager], edgecolor="black", label="p50")
            ax.scatter(xe, p99, color="black", marker="_", s=300, label="p99", zorder=3)
            ax.set_xticks(xe, eager, rotation=35, ha="right")
            ax.set_ylabel("ms per forward")
            ax.set_title(f"eager inference latency, batch {bs}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(
        f"DLRM dim {result['setup']['dim']}, {result['machine']['device']} "
        f"({result['machine']['processor']}, {result['backend']}, {result['threads_per_process']} thread/process)"
        + (" SMOKE RUN: not a result" if result["smoke"] else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
