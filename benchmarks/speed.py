"""Training throughput and peak memory of each compression method against stock tables.

Every method trains the same DLRM on the same synthetic Criteo-shaped data for the same steps,
in the same run, alternating methods in each repeat so that machine load hits all alike; the
result is the median examples/s and its ratio to the stock `EmbeddingBagCollection`, on 1 and 2
processes (gloo on CPU; nccl when a GPU is present). Writes JSON and a plot into docs/.

    .venv/bin/python benchmarks/speed.py                 # the full run (minutes)
    .venv/bin/python benchmarks/speed.py --smoke         # what CI runs: tiny, no timing claims
"""

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import torch
import yaml

from torchrec_memcom.train.cli import launch

REPO = Path(__file__).resolve().parents[1]
METHODS: Dict[str, Dict[str, Any]] = {
    "none": {"method": "none"},
    "memcom_16x": {"method": "memcom", "params": {"ratio": 16}, "min_rows": 1000},
}


def run(name: str, compression: Dict[str, Any], data: Path, nproc: int, steps: int, work: Path,
        dim: int, batch_size: int) -> Dict[str, Any]:
    """One training run; its results.json."""
    folder = work / f"{name}_{nproc}"
    config = {
        "data": {"path": str(data)},
        "model": {"dense_arch_layer_sizes": [64], "over_arch_layer_sizes": [64, 32, 1]},
        "embeddings": {"dim": dim, "compression": compression},
        "train": {"batch_size": batch_size, "steps": steps, "run_dir": str(folder)},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    if launch(str(path), nproc) != 0:
        raise RuntimeError(f"{name} on {nproc} processes failed")
    return json.loads((folder / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", default=str(REPO / "docs"))
    args = parser.parse_args()
    batch_size = 1024
    if args.smoke:
        args.repeats, args.steps, args.rows, batch_size = 1, 5, 8000, 128
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from torchrec_memcom.data import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        synthesize(args.rows, data, seed=0, max_cardinality=100_000, progress=False)
        samples: Dict[str, Dict[int, List[Dict[str, Any]]]] = {m: {1: [], 2: []} for m in args.methods}
        for _ in range(args.repeats):
            for nproc in (1, 2):
                for name in args.methods:
                    samples[name][nproc].append(
                        run(name, METHODS[name], data, nproc, args.steps, work, dim=64, batch_size=batch_size)
                    )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    table = {}
    for name in args.methods:
        table[name] = {}
        for nproc in (1, 2):
            rs = samples[name][nproc]
            base = statistics.median(r["examples_per_s"] for r in samples["none"][nproc])
            eps = statistics.median(r["examples_per_s"] for r in rs)
            table[name][str(nproc)] = {
                "examples_per_s": eps,
                "examples_per_s_all": [r["examples_per_s"] for r in rs],
                "throughput_ratio_vs_stock": eps / base,
                "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in rs),
                "embedding_bytes": rs[0]["embedding_bytes"],
                "compression_ratio": rs[0]["compression_ratio"],
            }
    result = {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": args.rows,
        "smoke": args.smoke,
        "methods": table,
    }
    name = "speed_smoke.json" if args.smoke else "speed.json"
    (out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(table, indent=2))
    if not args.smoke:
        _plot(table, out / "speed.png", device)


def _plot(table: Dict[str, Any], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, nproc in zip(axes, ("1", "2")):
        ratios = [table[n][nproc]["throughput_ratio_vs_stock"] for n in names]
        ax.bar(names, ratios, color=["gray"] + ["tab:blue"] * (len(names) - 1))
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(0.95, color="red", lw=0.8, ls="--", label="target 0.95x")
        ax.set_title(f"{nproc} process{'es' if nproc == '2' else ''}")
        ax.set_ylabel("training examples/s vs stock EBC")
        ax.tick_params(axis="x", rotation=30)
    axes[0].legend()
    fig.suptitle(f"DLRM training throughput ratio ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
