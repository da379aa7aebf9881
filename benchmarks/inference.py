"""Inference latency and file size of exported MEmCom and budgeted tables against exported stock tables.

Synthetic Criteo-shaped rows are written as raw TSV and converted like Criteo Kaggle (mod mode,
100,000 ids per feature: TorchRec's DLRM default), so the tables have realistic sizes and the
exported files need no id map. The same DLRM (the synthetic default's: dim 32; MEmCom 16x, or
budgeted tables at a budget 16x below the uncompressed tables with a MEmCom tail, on tables of
1000+ rows) is trained briefly with stock tables, with MEmCom and budgeted, each checkpoint is
exported in fp32, fp16 and int8 (`memcom export`, self-check included), and every file is timed
on held rows at batch 1 and 512, on one thread and on torch's default threads: p50 / p99 of the
whole `forward`, p50 of the table lookup alone (`embed`), and for int8 `score_raw` (raw values
in, the id mapping included). The trained model run by TorchRec's own modules in eager mode
(fp32) is timed alongside as the before-export baseline. Writes JSON and a plot into docs/.

    .venv/bin/python benchmarks/inference.py             # the full run (a few minutes)
    .venv/bin/python benchmarks/inference.py --smoke     # what CI runs: tiny, no timing claims
    .venv/bin/python benchmarks/inference.py --models budgeted_16x --sizes-only   # no timing
"""

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
import yaml
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_memcom.data import CriteoParquetLoader, convert, write_synthetic_tsv
from torchrec_memcom.data.schema import CAT_NAMES, kaggle_split
from torchrec_memcom.export.export import TrainedModel, export_checkpoint
from torchrec_memcom.export.inference import PRECISIONS, load_model
from torchrec_memcom.export.raw import parse_lines
from torchrec_memcom.train.cli import launch

REPO = Path(__file__).resolve().parents[1]
MODELS: Dict[str, Dict[str, Any]] = {
    "stock": {"method": "none"},
    "memcom_16x": {"method": "memcom", "params": {"ratio": 16}, "min_rows": 1000},
    # the frequencies that rank the ids are the data folder's, added by `train`
    "budgeted_16x": {"method": "budgeted", "params": {"budget_ratio": 16, "tail": True}, "min_rows": 1000},
}
BATCHES = (1, 512)


def train(name: str, compression: Dict[str, Any], data: Path, work: Path, steps: int, nproc: int) -> Path:
    """Train one model briefly; its checkpoint folder."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    if compression["method"] == "budgeted":
        compression = {**compression, "params": {**compression["params"], "frequencies": str(data)}}
    config = {
        "data": {"path": str(data)},
        "model": {"dense_arch_layer_sizes": [64], "over_arch_layer_sizes": [64, 32, 1]},
        "embeddings": {"dim": 32, "compression": compression},
        "train": {
            "batch_size": 512,
            "steps": steps,
            "run_dir": str(folder / "run"),
            "checkpoint_dir": str(folder / "ckpt"),
        },
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    if launch(str(path), nproc) != 0:
        raise RuntimeError(f"training {name} failed")
    return folder / "ckpt"


def held_rows(data: Path, raw: Path, total: int, rows: int) -> Dict[str, torch.Tensor]:
    """The first ``rows`` validation rows: dense features and ids, and their raw values."""
    dense, ids = [], []
    for batch in CriteoParquetLoader(data, "val", 4096, shuffle=False, drop_last=False):
        b = batch.dense_features.shape[0]
        dense.append(batch.dense_features)
        ids.append(batch.sparse_features.values().view(len(CAT_NAMES), b).t())
        if sum(len(d) for d in dense) >= rows:
            break
    start, _ = kaggle_split(total)["val"]
    with raw.open() as f:
        lines = list(itertools.islice(f, start, start + rows))
    parsed = parse_lines(lines, str(raw), start + 1)
    return {
        "dense": torch.cat(dense)[:rows],
        "ids": torch.cat(ids)[:rows].contiguous(),
        "raw_ints": parsed.ints,
        "raw_cats": parsed.cats,
    }


def kjt(ids: torch.Tensor) -> KeyedJaggedTensor:
    """The TorchRec input of ids ``[B, 26]`` (one id per feature)."""
    return KeyedJaggedTensor.from_lengths_sync(
        keys=CAT_NAMES, values=ids.t().reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.int32)
    )


ROUNDS = 10  # every variant is timed in each round, so all of them share the machine's load


def timed(runs: Dict[str, Callable[[int], Any]], iterations: int, inputs: int) -> Dict[str, Dict[str, float]]:
    """Per-call latency of each ``run(i)``: ``iterations`` calls cycling through ``inputs``
    batches, in ``ROUNDS`` interleaved rounds (a shared machine's load drifts; this spreads it)."""
    per_round = max(1, iterations // ROUNDS)
    samples: Dict[str, List[np.ndarray]] = {name: [] for name in runs}
    for call in runs.values():  # warm-up
        for i in range(min(per_round, 50)):
            call(i % inputs)
    for _ in range(ROUNDS):
        for name, call in runs.items():
            times = np.empty(per_round)
            for i in range(per_round):
                start = time.perf_counter_ns()
                call(i % inputs)
                times[i] = time.perf_counter_ns() - start
            samples[name].append(times / 1e3)
    out = {}
    for name, parts in samples.items():
        us = np.concatenate(parts)
        out[name] = {
            "p50_us": float(np.percentile(us, 50)),
            "p99_us": float(np.percentile(us, 99)),
            "mean_us": float(us.mean()),
            "iterations": len(us),
        }
    return out


def measure(
    models: Dict[str, Dict[str, Any]], held: Dict[str, torch.Tensor], iterations: Dict[int, int], threads: List[int]
) -> List[Dict[str, Any]]:
    """Latency rows for every model, precision (plus TorchRec eager), batch size and thread count."""
    rows = []
    loaded = {name: {p: load_model(f) for p, f in entry["files"].items()} for name, entry in models.items()}
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for batch in BATCHES:
            count = max(1, min(len(held["ids"]) // batch, 64))
            b = {key: [t[i * batch : (i + 1) * batch] for i in range(count)] for key, t in held.items()}
            d, x, k = b["dense"], b["ids"], [kjt(t) for t in b["ids"]]
            runs: Dict[Tuple[str, str], Callable[[int], Any]] = {}
            for name, entry in models.items():
                trained: TrainedModel = entry["trained"]
                runs[name, "torchrec_eager_fp32"] = lambda i, t=trained: t.predict(d[i], k[i])  # noqa: B023  (timed below)
                for precision, model in loaded[name].items():
                    runs[name, precision] = lambda i, m=model: m(d[i], x[i])  # noqa: B023  (timed below)
                    runs[name, f"{precision}_embed"] = lambda i, m=model: m.embed(x[i])  # noqa: B023  (timed below)
                runs[name, "int8_score_raw"] = lambda i, m=loaded[name]["int8"]: m.score_raw(
                    b["raw_ints"][i],  # noqa: B023  (timed below)
                    b["raw_cats"][i],  # noqa: B023
                )
            with torch.no_grad():
                results = timed(runs, iterations[batch], count)
            for (name, variant), r in results.items():
                rows.append({"model": name, "variant": variant, "batch": batch, "threads": n_threads, **r})
                print(
                    f"{name:12s} {variant:22s} batch {batch:4d} threads {n_threads}: "
                    f"p50 {r['p50_us']:9.1f} us  p99 {r['p99_us']:9.1f} us",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI")
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic rows (the demo's)")
    parser.add_argument(
        "--num-embeddings",
        type=int,
        default=100_000,
        help="ids per feature (mod mode), also the synthetic cardinality cap",
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--nproc", type=int, default=2, help="training processes")
    parser.add_argument("--iterations", type=int, default=3000, help="timed calls at batch 1 (a tenth at 512)")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=list(MODELS),
        help="models to train and export (default: all)",
    )
    parser.add_argument(
        "--sizes-only",
        action="store_true",
        help="train and export only: sizes and checks, no timing (writes inference_sizes.json)",
    )
    parser.add_argument("--out", default=str(REPO / "docs"))
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.steps, args.nproc, args.iterations, args.num_embeddings = 8000, 3, 1, 20, 2000
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="memcom_inference_") as tmp:
        work = Path(tmp)
        raw, data = work / "raw.tsv", work / "data"
        write_synthetic_tsv(raw, args.rows, seed=0, max_cardinality=args.num_embeddings, progress=False)
        convert([str(raw)], data, num_embeddings=args.num_embeddings, progress=False)
        models: Dict[str, Dict[str, Any]] = {}
        for name in args.models:
            checkpoint = train(name, MODELS[name], data, work, args.steps, args.nproc)
            files, reports = {}, {}
            for precision in PRECISIONS:
                files[precision] = work / f"{name}_{precision}.pt"
                reports[precision] = export_checkpoint(checkpoint, files[precision], precision)
            models[name] = {"files": files, "reports": reports, "trained": TrainedModel(checkpoint)}
        load_before = os.getloadavg()[0]
        latency = (
            []
            if args.sizes_only
            else measure(
                models,
                held_rows(data, raw, args.rows, 4096),
                {1: args.iterations, 512: max(1, args.iterations // 10)},
                sorted({1, default_threads}),
            )
        )
    sizes = {
        name: {
            precision: {
                key: r[key]
                for key in (
                    "file_bytes",
                    "tensor_bytes",
                    "fp32_uncompressed_bytes",
                    "fp32_trained_bytes",
                    "ratio_vs_fp32_uncompressed",
                )
            }
            | {
                "check": {
                    k: r["check"][k] for k in ("rows", "max_abs_diff", "auc_trained", "auc_exported", "auc_change")
                }
            }
            for precision, r in m["reports"].items()
        }
        for name, m in models.items()
    }
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/inference.py", *sys.argv[1:]]),
        "device": f"cpu ({platform.processor() or platform.machine()}), {default_threads} default torch threads",
        "torch": torch.__version__,
        "load_average_1min": {"before_timing": load_before, "after_timing": os.getloadavg()[0]},
        "rows": args.rows,
        "num_embeddings": args.num_embeddings,
        "steps": args.steps,
        "smoke": args.smoke,
        "models": sizes,
        "latency": latency,
    }
    name = "inference_smoke" if args.smoke else "inference"
    if args.sizes_only:
        (out / "inference_sizes.json").write_text(json.dumps(result, indent=2) + "\n")
        return
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, out / f"{name}.png")


def _plot(result: Dict[str, Any], path: Path) -> None:
    """File size per precision, and p50 latency (p99 as a tick) per batch size on one thread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    variants = ["torchrec_eager_fp32", *PRECISIONS]
    colors = {"stock": "gray", "memcom_16x": "tab:blue", "budgeted_16x": "tab:orange"}
    fig, axes = plt.subplots(1, 1 + len(BATCHES), figsize=(13, 3.8))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        sizes = [result["models"][name][p]["file_bytes"] / 2**20 for p in PRECISIONS]
        axes[0].bar(np.arange(len(PRECISIONS)) + j * width, sizes, width, label=name, color=colors[name])
    center = width * (len(names) - 1) / 2
    axes[0].set_xticks(np.arange(len(PRECISIONS)) + center, PRECISIONS)
    axes[0].set_ylabel("exported file (MiB)")
    axes[0].set_yscale("log")
    axes[0].set_title("file size")
    axes[0].legend()
    for ax, batch in zip(axes[1:], BATCHES):
        for j, name in enumerate(names):
            rows = {
                r["variant"]: r
                for r in result["latency"]
                if r["model"] == name and r["batch"] == batch and r["threads"] == 1
            }
            x = np.arange(len(variants)) + j * width
            ax.bar(x, [rows[v]["p50_us"] for v in variants], width, color=colors[name], label=name)
            ax.scatter(x, [rows[v]["p99_us"] for v in variants], marker="_", s=200, color="black")
        ax.set_xticks(np.arange(len(variants)) + center, ["torchrec\neager fp32", *PRECISIONS])
        ax.set_ylabel("latency (us): bar p50, tick p99")
        ax.set_title(f"batch {batch}, 1 thread")
    fig.suptitle(f"Exported DLRM inference ({result['device']}, torch {result['torch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
