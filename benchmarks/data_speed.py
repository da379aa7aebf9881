"""Measure the Criteo data path on this machine: conversion rows/s and loader examples/s.

    .venv/bin/python benchmarks/data_speed.py [--workdir /tmp/memcom_data_speed] [--repeat 250]
        [--synthetic-rows 4000000] [--runs 3] [--json results.json]

Inputs are built in --workdir (reused when present): the real Kaggle sample
(../shared/data/criteo_kaggle_sample_8k.tsv) concatenated --repeat times, plain and gzip, and a
synthetic Criteo TSV of --synthetic-rows rows. Every conversion runs in a fresh process (timed
around the `convert` call only, peak RSS from the kernel), --runs times; the table gives the best
and the median. The loader is timed over one epoch of the converted synthetic train split, and a
DLRM train step on the same batches is timed for comparison: the loader must be much faster.
"""

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

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


def build_inputs(workdir: Path, repeat: int, synthetic_rows: int) -> Dict[str, Path]:
    from torchrec_memcom.data import write_synthetic_tsv

    workdir.mkdir(parents=True, exist_ok=True)
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
    synthetic = workdir / f"synthetic_{synthetic_rows}.tsv"
    if not synthetic.exists():
        write_synthetic_tsv(synthetic, synthetic_rows, seed=0, progress=False)
    return {"real sample x%d" % repeat: real, "real sample x%d, gzip" % repeat: real_gz,
            "synthetic %d rows" % synthetic_rows: synthetic}


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

    loader = CriteoParquetLoader(data_dir, "train", batch_size, rank=0, world_size=world_size)
    start, cpu = time.perf_counter(), time.process_time()
    examples = sum(len(batch.labels) for batch in loader)
    return examples / (time.perf_counter() - start), examples / (time.process_time() - cpu)


def time_dlrm(data_dir: Path, batch_size: int, steps: int = 10) -> Tuple[float, float]:
    """Examples per wall and CPU second of a small DLRM train step (embedding dim 16), for comparison."""
    import torch
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from torchrec_memcom.data import CriteoParquetLoader

    loader = CriteoParquetLoader(data_dir, "train", batch_size)
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_{name}", embedding_dim=16, num_embeddings=size, feature_names=[name])
        for name, size in loader.num_embeddings.items()
    ])
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=[64, 16],
                 over_arch_layer_sizes=[64, 1])
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.01)
    batches = [batch for _, batch in zip(range(steps + 2), loader)]
    for step, batch in enumerate(batches):
        if step == 2:  # two warm-up steps
            start, cpu = time.perf_counter(), time.process_time()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(batch.dense_features, batch.sparse_features).squeeze(-1), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    examples = (len(batches) - 2) * batch_size
    return examples / (time.perf_counter() - start), examples / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/memcom_data_speed"))
    parser.add_argument("--repeat", type=int, default=250, help="copies of the 8,000-line sample")
    parser.add_argument("--synthetic-rows", type=int, default=4_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    inputs = build_inputs(args.workdir, args.repeat, args.synthetic_rows)
    results: Dict[str, Any] = {"cpus": os.cpu_count(), "conversion": [], "loader": []}
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPUs\n")
    print("| input | size | mode | rows | best rows/s | median rows/s | rows per CPU-s | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for name, path in inputs.items():
        for mode, options in (("mod", {}), ("frequency", {"mode": "frequency", "min_count": 3})):
            runs: List[Dict[str, float]] = [
                time_conversion(path, args.workdir / "out", options) for _ in range(args.runs)
            ]
            rates = [r["rows"] / r["seconds"] for r in runs]
            row: Dict[str, Any] = {"input": name, "bytes": path.stat().st_size, "mode": mode, "rows": runs[0]["rows"],
                   "best_rows_per_s": max(rates), "median_rows_per_s": statistics.median(rates),
                   "rows_per_cpu_s": max(r["rows"] / r["cpu_seconds"] for r in runs),
                   "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}
            results["conversion"].append(row)
            print(f"| {name} | {row['bytes'] / 2**20:,.0f} MiB | {mode} | {row['rows']:,} | "
                  f"{row['best_rows_per_s']:,.0f} | {row['median_rows_per_s']:,.0f} | "
                  f"{row['rows_per_cpu_s']:,.0f} | {row['peak_rss_mib']:,.0f} MiB |", flush=True)

    data = args.workdir / "synthetic_converted"
    if not (data / "manifest.json").exists():
        from torchrec_memcom.data import convert

        convert(inputs["synthetic %d rows" % args.synthetic_rows], data, progress=False)
    print("\n| loader (synthetic train split) | batch | ranks | best examples/s | median examples/s | examples per CPU-s |")
    print("|---|---|---|---|---|---|")
    for batch_size, world_size in ((2048, 1), (8192, 1), (8192, 2)):
        measured = [time_loader(data, batch_size, world_size) for _ in range(args.runs)]
        rates = [wall for wall, _ in measured]
        row = {"batch_size": batch_size, "world_size": world_size, "best_examples_per_s": max(rates),
               "median_examples_per_s": statistics.median(rates),
               "examples_per_cpu_s": max(cpu for _, cpu in measured)}
        results["loader"].append(row)
        print(f"| rank 0 | {batch_size} | {world_size} | {row['best_examples_per_s']:,.0f} | "
              f"{row['median_examples_per_s']:,.0f} | {row['examples_per_cpu_s']:,.0f} |", flush=True)
    dlrm_wall, dlrm_cpu = time_dlrm(data, 8192)
    results["dlrm_train"] = {"examples_per_s": dlrm_wall, "examples_per_cpu_s": dlrm_cpu}
    print(f"\nDLRM train step (CPU, dim 16, batch 8192, Adagrad): {dlrm_wall:,.0f} examples/s, "
          f"{dlrm_cpu:,.0f} examples per CPU-s")
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
