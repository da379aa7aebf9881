"""AUC and log loss against compression ratio for every compression method, in one harness.

For each dataset, method and target ratio (2x .. 64x), the same DLRM trains on the same data
for the same steps, batch size and learning rates, with each of the same seeds; the result is
the mean and spread over seeds of AUC and log loss on the evaluation split, the paired change
against the uncompressed model of the same seed, and the compression ratio the run actually
reached, over the tables it compresses (those of ``--min-rows`` rows or more: what the target
asks of them) and over all tables (``compression_ratio`` of its results.json). A ratio a method
cannot reach on the tables it compresses, within the 1% every method gets, is recorded as
unreachable, with the reason, and not trained.

Datasets:

* ``synthetic``: Criteo-shaped data from a known click model (``memcom data synth``), so the
  best possible AUC (``best_auc`` in its manifest) is known.
* ``criteo``: the real 8,000-line Criteo Kaggle sample (``../shared/data``), converted once in
  mod mode (every table ``num_embeddings`` rows); its first 6,000 lines train, the last 2,000
  evaluate. It is small: AUC differences under about 0.01 are noise.

Training runs in this process, one rank (``trainer.train`` makes and destroys its own gloo
group), with ``--threads`` torch threads for every run.

    .venv/bin/python benchmarks/quality.py              # the full run: docs/quality_results.{json,png}
    .venv/bin/python benchmarks/quality.py --dim 128 --min-rows 20000 --synthetic-rows 100000 \
        --name quality_dim128                           # every method at 2x-64x
    .venv/bin/python benchmarks/quality.py --dim 128 --min-rows 20000 --synthetic-rows 100000 \
        --dry-run                                       # the ratio of every arm, no training
    .venv/bin/python benchmarks/quality.py --smoke      # what CI runs: tiny, checks structure
"""

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from torchrec_memcom.bench import (  # the sweep's pieces, shared with `memcom bench`
    add_cells,
    build_meta,
    compressed_tables_ratio,
    compression,
    hanley_mcneil_se,
    plot,
    table,
    unreachable,
    within_tolerance,
)

REPO = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = REPO.parent / "shared" / "data" / "criteo_kaggle_sample_8k.tsv"
RATIOS = [2, 4, 8, 16, 32, 64]


# ---------------------------------------------------------------------------------------------
# Shared with speed.py


def methods() -> List[str]:
    """``none`` and every registered compression method, in the registry's order."""
    import torchrec_memcom.methods  # noqa: F401  (registers them)
    from torchrec_memcom.registry import method_names

    return method_names(with_none=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet() -> None:
    """Keep the planner's and DMP's per-run warnings out of a long benchmark log."""
    warnings.filterwarnings("ignore")
    for name in ("torchrec", "torch.distributed", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)


def machine() -> Dict[str, Any]:
    import torch

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------
# Datasets


def prepare_synthetic(work: Path, rows: int, max_cardinality: int) -> Dict[str, Any]:
    from torchrec_memcom.data import synthesize

    path = work / "synthetic"
    manifest = synthesize(rows, path, seed=0, max_cardinality=max_cardinality, progress=False)
    return {
        "path": path,
        "manifest": manifest,
        "description": f"synthetic, {rows} rows (seed 0), max_cardinality {max_cardinality}",
    }


def prepare_criteo(work: Path, sample: Path, train_lines: int, test: bool = False) -> Dict[str, Any]:
    """The real sample, converted in mod mode (default num_embeddings): the first
    ``train_lines`` lines train, the rest evaluate (the Kaggle split would leave 572 rows to
    evaluate on: an AUC standard error near 0.025); ``test``: the rest halved into val and test."""
    from torchrec_memcom.data import convert

    days = work / "criteo_tsv"
    days.mkdir(parents=True, exist_ok=True)
    lines = sample.read_bytes().splitlines(keepends=True)
    (days / "day_0.tsv").write_bytes(b"".join(lines[:train_lines]))
    (days / "day_1.tsv").write_bytes(b"".join(lines[train_lines:]))
    path = work / "criteo"
    manifest = convert(
        [days / "day_0.tsv", days / "day_1.tsv"],
        path,
        mode="mod",
        split="days",
        train_days=[0],
        val_days=[1],
        test_days=[1] if test else [],
        progress=False,
    )
    return {
        "path": path,
        "manifest": manifest,
        "description": f"{sample.name}: lines 1-{train_lines} train, {train_lines + 1}-{len(lines)} "
        f"{'halved into val and test' if test else 'evaluate'}; mod mode, "
        f"{manifest['features']['cat_0']['num_embeddings']} rows per table",
    }


# ---------------------------------------------------------------------------------------------
# Runs


def train_once(run_dir: Path, data: Path, block: Dict[str, Any], seed: int, t: Dict[str, Any]) -> Dict[str, Any]:
    """One in-process, single-rank training run, evaluated on ``t["eval_split"]`` (default
    val); its results (results.json)."""
    import yaml

    from torchrec_memcom.train.config import load_config
    from torchrec_memcom.train.trainer import train

    config = {
        "data": {"path": str(data), "eval_split": t.get("eval_split", "val")},
        "model": {"arch": "DLRM", "dense_arch_layer_sizes": [64], "over_arch_layer_sizes": [64, 32, 1]},
        "embeddings": {"dim": t["dim"], "compression": block},
        "optimizer": {
            "sparse": {"type": "rowwise_adagrad", "lr": t["lr"]},
            "dense": {"type": "adagrad", "lr": t["lr"]},
        },
        "train": {
            "batch_size": t["batch_size"],
            "epochs": t["epochs"],
            "steps": t.get("steps"),
            "seed": seed,
            "run_dir": str(run_dir),
        },
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    os.environ["MASTER_PORT"] = str(free_port())
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        results = train(load_config(path))  # (its progress bar and JSON lines)
    gc.collect()
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI (one seed, two ratios, few steps)")
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "criteo"], choices=["synthetic", "criteo"])
    parser.add_argument("--methods", nargs="+", default=None, help="default: none and every registered method")
    parser.add_argument("--ratios", nargs="+", type=float, default=RATIOS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--min-rows", type=int, default=1000, help="smaller tables stay uncompressed")
    parser.add_argument("--lr", type=float, default=0.05, help="sparse and dense learning rate")
    parser.add_argument("--synthetic-rows", type=int, default=200_000)
    parser.add_argument("--max-cardinality", type=int, default=100_000)
    parser.add_argument("--synthetic-batch-size", type=int, default=512)
    parser.add_argument("--criteo-batch-size", type=int, default=128)
    parser.add_argument("--criteo-sample", default=str(CRITEO_SAMPLE))
    parser.add_argument("--criteo-train-lines", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    parser.add_argument("--out", default=str(REPO / "docs"))
    parser.add_argument("--name", default="quality_results", help="stem of the JSON and PNG written into --out")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the plot and tables of a results file")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="only build every arm on the meta device and print the ratio it reaches (no training)",
    )
    args = parser.parse_args(argv)
    if args.replot:
        replot(Path(args.replot))
        return 0
    steps = None
    if args.smoke:
        args.seeds, args.ratios = args.seeds[:1], [2, 4]
        args.synthetic_rows, args.max_cardinality, steps = 8000, 5000, 8
        args.synthetic_batch_size = args.criteo_batch_size = 64
    names = args.methods or methods()
    if "none" not in names:
        names = ["none", *names]
    quiet()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result: Dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
        "smoke": args.smoke,
        "machine": {**machine(), "torch_threads": args.threads},
        "methods": names,
        "target_ratios": args.ratios,
        "seeds": args.seeds,
        "setup": {
            "model": "DLRM, dense arch [64, dim], over arch [64, 32, 1]",
            "dim": args.dim,
            "min_rows": args.min_rows,
            "optimizer": f"row-wise Adagrad (sparse) and Adagrad (dense), lr {args.lr}",
            "epochs": args.epochs,
            "steps": steps,
        },
        "datasets": {},
    }
    failures = 0
    with tempfile.TemporaryDirectory(prefix="memcom_quality_") as tmp:
        work = Path(tmp)
        for dataset in args.datasets:
            if dataset == "synthetic":
                ds = prepare_synthetic(work, args.synthetic_rows, args.max_cardinality)
                batch_size = args.synthetic_batch_size
            else:
                sample = Path(args.criteo_sample)
                if not sample.exists():
                    print(f"skipping criteo: {sample} not found", flush=True)
                    continue
                ds = prepare_criteo(work, sample, args.criteo_train_lines)
                batch_size = args.criteo_batch_size
            manifest = ds["manifest"]
            sizes = [manifest["features"][f"cat_{i}"]["num_embeddings"] for i in range(26)]
            t = {"dim": args.dim, "lr": args.lr, "batch_size": batch_size, "epochs": args.epochs, "steps": steps}
            entry: Dict[str, Any] = {
                "description": ds["description"],
                "train_rows": manifest["splits"]["train"]["rows"],
                "eval_rows": manifest["splits"]["val"]["rows"],
                "batch_size": batch_size,
                "table_rows": sizes,
                "uncompressed_tables": [f"t_cat_{i}" for i, n in enumerate(sizes) if n < args.min_rows],
                "best_auc": manifest.get("best_auc", {}).get("val"),
                "best_logloss": manifest.get("best_logloss", {}).get("val"),
                "methods": {},
            }
            arms = [("none", 1.0)] + [(m, r) for r in args.ratios for m in names if m != "none"]
            blocks = {}
            for method, ratio in arms:
                block = within_tolerance(compression(method, ratio, args.min_rows, ds["path"]), args.dim, sizes)
                why = unreachable(method, block, args.dim, sizes)
                key = "1" if method == "none" else f"{ratio:g}"
                slot = entry["methods"].setdefault(method, {})
                if why is not None:
                    slot[key] = {"target_ratio": ratio, "reachable": False, "reason": why}
                else:
                    blocks[(method, ratio)] = block
            if args.dry_run:
                print(dry_run(dataset, blocks, entry, args.dim, sizes, args.min_rows), flush=True)
                continue
            runs: Dict[Any, List[Dict[str, Any]]] = {arm: [] for arm in blocks}
            for seed in args.seeds:
                for (method, ratio), block in blocks.items():
                    t0 = time.time()
                    run_dir = work / "runs" / dataset / f"{method}_{ratio:g}_s{seed}"
                    try:
                        r = train_once(run_dir, ds["path"], block, seed, t)
                    except Exception as e:  # one failing arm must not lose the others
                        failures += 1
                        print(f"[{dataset}] {method} {ratio:g}x seed {seed}: FAILED: {e!r}", flush=True)
                        runs[(method, ratio)].append({"seed": seed, "error": repr(e)})
                        continue
                    finally:
                        shutil.rmtree(run_dir, ignore_errors=True)
                    r = {**r, "seed": seed, "seconds": time.time() - t0}
                    runs[(method, ratio)].append(r)
                    print(
                        f"[{dataset}] {method:>8} {ratio:>4g}x seed {seed}: auc {r['auc']:.4f} logloss "
                        f"{r['logloss']:.4f} achieved {r['compression_ratio']:.2f}x ({r['seconds']:.1f}s)",
                        flush=True,
                    )
            baseline = add_cells(entry, runs, blocks, sizes, args.dim, args.min_rows)
            if baseline:
                positives = _eval_positives(ds["path"])
                negatives = entry["eval_rows"] - positives
                auc = entry["methods"]["none"]["1"]["auc"]["mean"]
                entry["eval_positives"] = positives
                entry["auc_standard_error_of_eval_set"] = hanley_mcneil_se(auc, positives, negatives)
            result["datasets"][dataset] = entry
    if args.dry_run:
        return 0
    result["seconds"] = time.time() - started
    name = "quality_smoke" if args.smoke else args.name
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{name}.png")
    print(table(result))
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')} in {result['seconds']:.0f}s", flush=True)
    return 1 if failures else 0


def dry_run(
    dataset: str,
    blocks: Dict[Any, Dict[str, Any]],
    entry: Dict[str, Any],
    dim: int,
    sizes: Sequence[int],
    min_rows: int,
) -> str:
    """What ``--dry-run`` prints: per arm, the ratio its meta-device build reaches over the
    compressed tables and over all tables, or why it is unreachable."""
    from torchrec_memcom.train.model import embedding_bytes

    full = 4 * dim * sum(sizes)
    lines = [
        f"[{dataset}] {len(sizes) - len(entry['uncompressed_tables'])} of {len(sizes)} tables compressed "
        f"({sum(n for n in sizes if n >= min_rows) / sum(sizes):.1%} of the rows)"
    ]
    for method, cells in entry["methods"].items():
        for key, c in cells.items():
            lines.append(f"  {method:>8} {key:>3}x: unreachable: {c['reason']}")
    for (method, ratio), block in blocks.items():
        tables = [f"t_cat_{i}" for i in range(len(sizes))]
        total = sum(embedding_bytes(build_meta(block, dim, sizes), tables).values())
        lines.append(
            f"  {method:>8} {ratio:>3g}x: {compressed_tables_ratio(total, sizes, dim, min_rows):.2f}x "
            f"on the compressed tables, {full / total:.2f}x on all"
        )
    return "\n".join(lines)


def _eval_positives(data: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    labels = pads.dataset(str(data / "val"), format="parquet").to_table(columns=["label"])["label"]
    return int(pc.sum(labels).as_py())


# ---------------------------------------------------------------------------------------------
# Report


def replot(json_path: Path) -> None:
    """Redraw the plot and reprint the tables of an earlier run (``--replot FILE``)."""
    result = json.loads(json_path.read_text())
    plot(result, json_path.with_suffix(".png"))
    print(table(result))


if __name__ == "__main__":
    sys.exit(main())
