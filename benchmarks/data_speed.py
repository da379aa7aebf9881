"""Measure the Criteo data path on this machine: conversion rows/s and loader examples/s.

    .venv/bin/python benchmarks/data_speed.py [--workdir /tmp/memcom_data_speed] [--repeat 250]
        [--synthetic-rows 4000000] [--runs 3] [--json results.json] [--torch-threads N] [--smoke]

Inputs are built in --workdir (reused when present): the real Kaggle sample
(../shared/data/criteo_kaggle_sample_8k.tsv) concatenated --repeat times, plain and gzip (left
out when the sample is absent), and a synthetic Criteo TSV of --synthetic-rows rows. Every
conversion runs in a fresh process (timed around the `convert` call only, peak RSS from the
kernel), --runs times; the table gives the best and the median. The loader is timed over one
epoch of the converted synthetic train split without its prefetch thread (the cost of building
batches), and a DLRM train step is timed on pre-built batches and fed by the loader with and
without prefetch, for comparison: the loader must be much faster than training. --smoke runs
every part on a tiny synthetic input in seconds (for the tests; its numbers mean nothing).
"""

import argparse
import gzip
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "criteo_kaggle_sample_8k.tsv"

_CHILD = """
import json, sys, time
from torchrec_memcom.data import convert
args = json.loads(sys.argv[1])
start, cpu = time.perf_counter(), time.process_time()
manifest = convert(args["input"], args["out"], progress=False, **args["options"])
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                  "rows": manifest["rows_read"]}))
"""


def build_inputs(workdir: Path, repeat: int, synthetic_rows: int, real_sample: bool) -> Dict[str, Path]:
    from torchrec_memcom.data import write_synthetic_tsv

    workdir.mkdir(parents=True, exist_ok=True)
    inputs: Dict[str, Path] = {}
    if real_sample and SAMPLE.is_file():
        real = workdir / f"kaggle_sample_x{repeat}.tsv"
        if not real.exists():
            data = SAMPLE.read_bytes()
            with open(real, "wb") as f:
                for _ in range(repeat):
                    f.write(data)
        real_gz = workdir / f"kaggle_sample_x{repeat}.tsv.gz"
        if not real_gz.exists():
            with open(real, "rb") as src, gzip.open(real_gz, "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        inputs.update({"real sample x%d" % repeat: real, "real sample x%d, gzip" % repeat: real_gz})
    elif real_sample:
        print(f"{SAMPLE} not found: timing the synthetic input only\n")
    synthetic = workdir / f"synthetic_{synthetic_rows}.tsv"
    if not synthetic.exists():
        write_synthetic_tsv(synthetic, synthetic_rows, seed=0, progress=False)
    inputs["synthetic %d rows" % synthetic_rows] = synthetic
    return inputs


def time_conversion(path: Path, out: Path, options: Dict[str, Any]) -> Dict[str, float]:
    """One conversion in a fresh process: wall and CPU seconds inside convert(), rows, peak RSS (MiB)."""
    shutil.rmtree(out, ignore_errors=True)
    argument = json.dumps({"input": str(path), "out": str(out), "options": options})
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, argument], stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"conversion of {path} failed")
    result = json.loads(stdout)
    return {**result, "peak_rss_mib": usage.ru_maxrss / 1024}


def time_loader(data_dir: Path, batch_size: int, world_size: int) -> Tuple[float, float]:
    """Examples per wall second and per CPU second of rank 0 over one epoch (batches built, not used)."""
    import torchrec.datasets.utils  # noqa: F401  (import cost is not loader speed)

    from torchrec_memcom.data import CriteoParquetLoader

    loader = CriteoParquetLoader(data_dir, "train", batch_size, rank=0, world_size=world_size, prefetch=0)
    start, cpu = time.perf_counter(), time.process_time()
    examples = sum(len(batch.labels) for batch in loader)
    return examples / (time.perf_counter() - start), examples / (time.process_time() - cpu)


_WARMUP = 2


def time_dlrm(data_dir: Path, batch_size: int, steps: int, prefetch: Optional[int]) -> Tuple[float, float]:
    """Examples per wall and CPU second of a small DLRM train step (embedding dim 16, Adagrad).

    prefetch None: on batches built beforehand (the step alone); else fed by the loader as it runs,
    with that prefetch depth (0: built inline, between steps). Batches repeat when the split is short.
    """
    import torch
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from torchrec_memcom.data import CriteoParquetLoader

    loader = CriteoParquetLoader(data_dir, "train", batch_size, prefetch=prefetch or 0)
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=f"t_{name}", embedding_dim=16, num_embeddings=size, feature_names=[name])
            for name, size in loader.num_embeddings.items()
        ]
    )
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=13,
        dense_arch_layer_sizes=[64, 16],
        over_arch_layer_sizes=[64, 1],
    )
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.01)
    batches: Iterable[Any] = itertools.cycle(loader)
    if prefetch is None:
        batches = list(itertools.islice(batches, steps + _WARMUP))
    start, cpu = time.perf_counter(), time.process_time()
    for step, batch in enumerate(itertools.islice(batches, steps + _WARMUP)):
        if step == _WARMUP:
            start, cpu = time.perf_counter(), time.process_time()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(batch.dense_features, batch.sparse_features).squeeze(-1), batch.labels
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    examples = steps * batch_size
    return examples / (time.perf_counter() - start), examples / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/memcom_data_speed"))
    parser.add_argument("--repeat", type=int, default=250, help="copies of the 8,000-line sample")
    parser.add_argument("--synthetic-rows", type=int, default=4_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--torch-threads",
        type=int,
        metavar="N",
        help="torch intra-op threads of the DLRM step (default: torch's, one per CPU)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="synthetic input only, tiny, one run, small batches: checks that everything runs",
    )
    args = parser.parse_args()
    if args.smoke:
        args.repeat, args.synthetic_rows, args.runs = 2, 4000, 1
        args.torch_threads = args.torch_threads or 1  # spinning threads slow a loaded machine's tiny steps
    loader_cells = ((1024, 2),) if args.smoke else ((2048, 1), (8192, 1), (8192, 2))
    train_batch, train_steps = (1536, 1) if args.smoke else (8192, 10)  # smoke: 2 batches, repeated

    inputs = build_inputs(args.workdir, args.repeat, args.synthetic_rows, real_sample=not args.smoke)
    results: Dict[str, Any] = {
        "command": " ".join(["benchmarks/data_speed.py"] + sys.argv[1:]),
        "smoke": args.smoke,
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "conversion": [],
        "loader": [],
    }
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPUs\n")
    print("| input | size | mode | rows | best rows/s | median rows/s | rows per CPU-s | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for name, path in inputs.items():
        for mode, options in (("mod", {}), ("frequency", {"mode": "frequency", "min_count": 3})):
            runs: List[Dict[str, float]] = [
                time_conversion(path, args.workdir / "out", options) for _ in range(args.runs)
            ]
            rates = [r["rows"] / r["seconds"] for r in runs]
            row: Dict[str, Any] = {
                "input": name,
                "bytes": path.stat().st_size,
                "mode": mode,
                "rows": runs[0]["rows"],
                "best_rows_per_s": max(rates),
                "median_rows_per_s": statistics.median(rates),
                "rows_per_cpu_s": max(r["rows"] / r["cpu_seconds"] for r in runs),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            }
            results["conversion"].append(row)
            print(
                f"| {name} | {row['bytes'] / 2**20:,.0f} MiB | {mode} | {row['rows']:,} | "
                f"{row['best_rows_per_s']:,.0f} | {row['median_rows_per_s']:,.0f} | "
                f"{row['rows_per_cpu_s']:,.0f} | {row['peak_rss_mib']:,.0f} MiB |",
                flush=True,
            )

    from torchrec_memcom.data import convert

    # Smoke: small tables, so that the DLRM steps take milliseconds.
    data = args.workdir / f"synthetic_{args.synthetic_rows}_converted{'_smoke' if args.smoke else ''}"
    manifest = convert(
        inputs["synthetic %d rows" % args.synthetic_rows],
        data,
        progress=False,
        num_embeddings=1000 if args.smoke else None,
    )  # no-op when done
    results["loader_train_rows"] = manifest["splits"]["train"]["rows"]
    print(
        f"\n| loader, no prefetch ({manifest['splits']['train']['rows']:,} synthetic train rows) | batch | "
        "ranks | best examples/s | median examples/s | examples per CPU-s |"
    )
    print("|---|---|---|---|---|---|")
    for batch_size, world_size in loader_cells:
        measured = [time_loader(data, batch_size, world_size) for _ in range(args.runs)]
        rates = [wall for wall, _ in measured]
        row = {
            "batch_size": batch_size,
            "world_size": world_size,
            "best_examples_per_s": max(rates),
            "median_examples_per_s": statistics.median(rates),
            "examples_per_cpu_s": max(cpu for _, cpu in measured),
        }
        results["loader"].append(row)
        print(
            f"| rank 0 | {batch_size} | {world_size} | {row['best_examples_per_s']:,.0f} | "
            f"{row['median_examples_per_s']:,.0f} | {row['examples_per_cpu_s']:,.0f} |",
            flush=True,
        )

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(
        f"\nDLRM train (CPU, dim 16, batch {train_batch}, Adagrad, {train_steps} steps after {_WARMUP} warm-up, "
        f"{torch.get_num_threads()} torch threads):"
    )
    results["dlrm_train"] = {"batch_size": train_batch, "steps": train_steps, "torch_threads": torch.get_num_threads()}
    for key, prefetch, what in (
        ("prebuilt", None, "on batches built beforehand"),
        ("loader_prefetch_0", 0, "fed by the loader, no prefetch"),
        ("loader_prefetch_2", 2, "fed by the loader, prefetch 2"),
    ):
        wall, cpu = time_dlrm(data, train_batch, train_steps, prefetch)
        results["dlrm_train"][key] = {"examples_per_s": wall, "examples_per_cpu_s": cpu}
        print(f"  {what}: {wall:,.0f} examples/s, {cpu:,.0f} examples per CPU-s", flush=True)
    results["load_average_after"] = os.getloadavg()
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
