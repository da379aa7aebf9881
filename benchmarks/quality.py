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
import math
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = REPO.parent / "shared" / "data" / "criteo_kaggle_sample_8k.tsv"
RATIOS = [2, 4, 8, 16, 32, 64]
BASE_METHODS = ["hash", "qr", "memcom"]


# ---------------------------------------------------------------------------------------------
# Shared with speed.py


def methods() -> List[str]:
    """``none`` and every registered compression method (``budgeted`` once it is registered)."""
    from torchrec_memcom.compression import METHODS

    extra = [m for m in ("budgeted",) if m in METHODS]
    return ["none", *[m for m in BASE_METHODS if m in METHODS], *extra]


def compression(method: str, ratio: float, min_rows: int, data: Path) -> Dict[str, Any]:
    """The config's ``embeddings.compression`` block for ``method`` at a target ``ratio``."""
    if method == "none":
        return {"method": "none"}
    if method == "budgeted":
        # one budget for the collection of all tables of at least min_rows rows, parameters
        # only; the heuristic allocation, with a MEmCom tail for the rarest ids (BET's option)
        params: Dict[str, Any] = {"budget_ratio": ratio, "frequencies": str(data), "tail": True}
    else:
        params = {"ratio": ratio}
    return {"method": method, "params": params, "min_rows": min_rows}


def _names(sizes: Sequence[int], names: Optional[Sequence[str]]) -> List[str]:
    """The categorical features of tables of ``sizes``: ``names``, else Criteo's cat_0, cat_1, ..."""
    return list(names) if names is not None else [f"cat_{i}" for i in range(len(sizes))]


def build_meta(block: Dict[str, Any], dim: int, sizes: Sequence[int], names: Optional[Sequence[str]] = None) -> Any:
    """The compressed collection ``block`` asks for, on the meta device (no memory); the
    method's own solver raises ``ValueError`` if it cannot build it. ``names``: the features
    (default Criteo's)."""
    import torch
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from torchrec_memcom.compression import CompressionSpec, compress_collection
    from torchrec_memcom.train.config import _build
    from torchrec_memcom.train.model import table_configs

    spec = _build(CompressionSpec, block, "embeddings.compression")
    ebc = EmbeddingBagCollection(table_configs(dim, list(sizes), _names(sizes, names)), device=torch.device("meta"))
    return compress_collection(ebc, spec)[0]


def within_tolerance(block: Dict[str, Any], dim: int, sizes: Sequence[int],
                     names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``block``, or for a budget below the smallest feasible one by at most 1%, that smallest
    budget: the tolerance the other methods' ratio solvers give (they accept a size within 1%
    of the target), so that budgeted tables are not unreachable where the others are not."""
    if block.get("method") != "budgeted":
        return block
    from torchrec_memcom.modules.budget_config import smallest_feasible_bytes, uncompressed_bytes

    shapes = {f"t_{f}": (n, dim) for f, n in zip(_names(sizes, names), sizes) if n >= block["min_rows"]}
    floor = smallest_feasible_bytes(shapes, None, bool(block["params"].get("tail")))
    best = sum(uncompressed_bytes(n, d, None) for n, d in shapes.values()) / floor
    ratio = block["params"]["budget_ratio"]
    if best < ratio <= 1.01 * best:
        params = {k: v for k, v in block["params"].items() if k != "budget_ratio"}
        return {**block, "params": {**params, "budget_bytes": floor}}
    return block


def unreachable(method: str, block: Dict[str, Any], dim: int, sizes: Sequence[int],
                names: Optional[Sequence[str]] = None) -> Optional[str]:
    """Why ``method`` cannot build these tables as ``block`` asks (None: it can).

    Builds the compressed collection on the meta device, so the method's own ratio solver
    decides (QR tops out near sqrt(n)/2 per table, MEmCom and budgeted tables below the dim).
    """
    if method == "none":
        return None
    try:
        build_meta(block, dim, sizes, names)
    except ValueError as e:
        return str(e)
    return None


def compressed_tables_ratio(embedding_bytes: int, sizes: Sequence[int], dim: int, min_rows: int) -> float:
    """The ratio over the compressed tables only (those of at least ``min_rows`` rows): what the
    target asks for. The tables left stock cost ``n*d`` fp32 each, so they come off both sides."""
    stock = sum(4 * n * dim for n in sizes if n < min_rows)
    full = 4 * dim * sum(sizes)
    return 1.0 if full == stock else (full - stock) / (embedding_bytes - stock)


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
    return {"path": path, "manifest": manifest,
            "description": f"synthetic, {rows} rows (seed 0), max_cardinality {max_cardinality}"}


def prepare_criteo(work: Path, sample: Path, train_lines: int) -> Dict[str, Any]:
    """The real sample, converted in mod mode (default num_embeddings): the first
    ``train_lines`` lines train, the rest evaluate (the Kaggle split would leave 572 rows to
    evaluate on: an AUC standard error near 0.025)."""
    from torchrec_memcom.data import convert

    days = work / "criteo_tsv"
    days.mkdir(parents=True, exist_ok=True)
    lines = sample.read_bytes().splitlines(keepends=True)
    (days / "day_0.tsv").write_bytes(b"".join(lines[:train_lines]))
    (days / "day_1.tsv").write_bytes(b"".join(lines[train_lines:]))
    path = work / "criteo"
    manifest = convert([days / "day_0.tsv", days / "day_1.tsv"], path, mode="mod", split="days",
                       train_days=[0], val_days=[1], test_days=[], progress=False)
    return {"path": path, "manifest": manifest,
            "description": f"{sample.name}: lines 1-{train_lines} train, {train_lines + 1}-{len(lines)} "
                           f"evaluate; mod mode, {manifest['features']['cat_0']['num_embeddings']} rows per table"}


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
        "optimizer": {"sparse": {"type": "rowwise_adagrad", "lr": t["lr"]}, "dense": {"type": "adagrad", "lr": t["lr"]}},
        "train": {"batch_size": t["batch_size"], "epochs": t["epochs"], "steps": t.get("steps"), "seed": seed,
                  "run_dir": str(run_dir)},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    os.environ["MASTER_PORT"] = str(free_port())
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        results = train(load_config(path))  # (its progress bar and JSON lines)
    gc.collect()
    return results


def hanley_mcneil_se(auc: float, positives: int, negatives: int) -> float:
    """Standard error of an AUC on a fixed evaluation set (Hanley and McNeil, 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc))
    return math.sqrt(var / (positives * negatives))


def _mean_std(xs: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarize(runs: List[Dict[str, Any]], baseline: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """Mean and std over seeds, and the paired change against the same seed's stock model."""
    out = {
        "achieved_ratio": _mean_std([r["compression_ratio"] for r in runs]),
        "embedding_bytes": runs[0]["embedding_bytes"],
        "auc": _mean_std([r["auc"] for r in runs]),
        "logloss": _mean_std([r["logloss"] for r in runs]),
        "seeds": [r["seed"] for r in runs],
        "runs": [{k: r[k] for k in ("seed", "auc", "logloss", "train_loss", "compression_ratio", "seconds")}
                 for r in runs],
    }
    if all(r["seed"] in baseline for r in runs):
        out["delta_auc_vs_none"] = _mean_std([r["auc"] - baseline[r["seed"]]["auc"] for r in runs])
        out["delta_logloss_vs_none"] = _mean_std([r["logloss"] - baseline[r["seed"]]["logloss"] for r in runs])
    return out


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
    parser.add_argument("--dry-run", action="store_true",
                        help="only build every arm on the meta device and print the ratio it reaches (no training)")
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
        "setup": {"model": "DLRM, dense arch [64, dim], over arch [64, 32, 1]", "dim": args.dim,
                  "min_rows": args.min_rows, "optimizer": f"row-wise Adagrad (sparse) and Adagrad (dense), lr {args.lr}",
                  "epochs": args.epochs, "steps": steps},
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
                    print(f"[{dataset}] {method:>8} {ratio:>4g}x seed {seed}: auc {r['auc']:.4f} logloss "
                          f"{r['logloss']:.4f} achieved {r['compression_ratio']:.2f}x ({r['seconds']:.1f}s)", flush=True)
            baseline = {r["seed"]: r for r in runs.get(("none", 1.0), []) if "error" not in r}
            for (method, ratio), rs in runs.items():
                ok = [r for r in rs if "error" not in r]
                key = "1" if method == "none" else f"{ratio:g}"
                params = {k: v for k, v in blocks[(method, ratio)].get("params", {}).items() if k != "frequencies"}
                cell: Dict[str, Any] = {"target_ratio": ratio, "reachable": True, "params": params,
                                        "errors": [r for r in rs if "error" in r]}
                if ok:
                    cell.update(summarize(ok, baseline))
                    cell["achieved_ratio_compressed_tables"] = compressed_tables_ratio(
                        cell["embedding_bytes"], sizes, args.dim, args.min_rows)
                entry["methods"][method][key] = cell
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


def dry_run(dataset: str, blocks: Dict[Any, Dict[str, Any]], entry: Dict[str, Any], dim: int,
            sizes: Sequence[int], min_rows: int) -> str:
    """What ``--dry-run`` prints: per arm, the ratio its meta-device build reaches over the
    compressed tables and over all tables, or why it is unreachable."""
    from torchrec_memcom.train.model import embedding_bytes

    full = 4 * dim * sum(sizes)
    lines = [f"[{dataset}] {len(sizes) - len(entry['uncompressed_tables'])} of {len(sizes)} tables compressed "
             f"({sum(n for n in sizes if n >= min_rows) / sum(sizes):.1%} of the rows)"]
    for method, cells in entry["methods"].items():
        for key, c in cells.items():
            lines.append(f"  {method:>8} {key:>3}x: unreachable: {c['reason']}")
    for (method, ratio), block in blocks.items():
        tables = [f"t_cat_{i}" for i in range(len(sizes))]
        total = sum(embedding_bytes(build_meta(block, dim, sizes), tables).values())
        lines.append(f"  {method:>8} {ratio:>3g}x: {compressed_tables_ratio(total, sizes, dim, min_rows):.2f}x "
                     f"on the compressed tables, {full / total:.2f}x on all")
    return "\n".join(lines)


def _eval_positives(data: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    labels = pads.dataset(str(data / "val"), format="parquet").to_table(columns=["label"])["label"]
    return int(pc.sum(labels).as_py())


# ---------------------------------------------------------------------------------------------
# Report


def on_compressed(result: Dict[str, Any], entry: Dict[str, Any], cell: Dict[str, Any]) -> float:
    """A cell's achieved ratio over the compressed tables (also for files written before it was
    stored: from their bytes, table sizes, dim and min_rows)."""
    setup = result["setup"]
    return compressed_tables_ratio(cell["embedding_bytes"], entry["table_rows"], setup["dim"], setup["min_rows"])


def table(result: Dict[str, Any]) -> str:
    """Markdown tables: per dataset, one row per method and target ratio, then the paired AUC
    change against the stock model by method and target (the tables of docs/benchmarks.md)."""
    lines = []
    for dataset, entry in result["datasets"].items():
        lines += [f"\n{dataset}: {entry['description']}"]
        if entry.get("best_auc") is not None:
            lines += [f"best possible AUC (val) {entry['best_auc']:.4f}, log loss {entry['best_logloss']:.4f}"]
        lines += ["", "| method | target | achieved (compressed tables / all) | AUC | dAUC vs none | log loss | "
                  "dlogloss vs none |", "|---|---|---|---|---|---|---|"]
        for method, cells in entry["methods"].items():
            for key, c in sorted(cells.items(), key=lambda kv: float(kv[0])):
                if not c["reachable"]:
                    lines.append(f"| {method} | {key}x | unreachable | | | | |")
                    continue
                if "auc" not in c:
                    lines.append(f"| {method} | {key}x | failed | | | | |")
                    continue
                d = c.get("delta_auc_vs_none", {"mean": 0.0, "std": 0.0})
                dl = c.get("delta_logloss_vs_none", {"mean": 0.0, "std": 0.0})
                lines.append(
                    f"| {method} | {key}x | {on_compressed(result, entry, c):.2f}x / "
                    f"{c['achieved_ratio']['mean']:.2f}x | "
                    f"{c['auc']['mean']:.4f} ± {c['auc']['std']:.4f} | {d['mean']:+.4f} ± {d['std']:.4f} | "
                    f"{c['logloss']['mean']:.4f} ± {c['logloss']['std']:.4f} | {dl['mean']:+.4f} ± {dl['std']:.4f} |"
                )
        keys = [f"{r:g}" for r in result["target_ratios"]]
        lines += ["", "paired AUC change vs stock (same seed), mean ± std over seeds:", "",
                  "| method | " + " | ".join(f"{k}x" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for method, cells in entry["methods"].items():
            if method == "none":
                continue
            row = []
            for k in keys:
                c = cells.get(k, {})
                d = c.get("delta_auc_vs_none")
                if d:
                    row.append(f"{d['mean']:+.4f} ± {d['std']:.4f}")
                else:
                    row.append("unreachable" if c.get("reachable") is False else "")
            lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


STYLE = {"none": ("black", "s"), "hash": ("tab:orange", "o"), "qr": ("tab:green", "^"),
         "memcom": ("tab:blue", "D"), "budgeted": ("tab:purple", "v")}


def plot(result: Dict[str, Any], path: Path) -> None:
    """AUC, its paired change against the stock model, and log loss against the achieved ratio
    over the compressed tables (log2 axis), one column per dataset; error bars: std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    datasets = list(result["datasets"])
    if not datasets:
        return
    rows = (("auc", "validation AUC"), ("delta_auc_vs_none", "AUC change vs stock (same seed)"),
            ("logloss", "validation log loss"))
    fig, axes = plt.subplots(len(rows), len(datasets), figsize=(6.2 * len(datasets), 3.6 * len(rows)), squeeze=False)
    for col, dataset in enumerate(datasets):
        entry = result["datasets"][dataset]
        for row, (metric, label) in enumerate(rows):
            ax = axes[row][col]
            for method, cells in entry["methods"].items():
                pts = sorted((on_compressed(result, entry, c), c[metric]["mean"], c[metric]["std"])
                             for c in cells.values() if c.get("reachable") and metric in c)
                if not pts:
                    continue
                color, marker = STYLE.get(method, ("gray", "x"))
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, color=color, marker=marker, capsize=3, lw=1.2,
                            label="none (stock EBC)" if method == "none" else method)
                if method == "none":
                    ax.axhline(ys[0], color="black", lw=0.6, ls=":")
            best = {"auc": entry.get("best_auc"), "logloss": entry.get("best_logloss")}.get(metric)
            if best is not None:
                ax.axhline(best, color="gray", ls="--", lw=1, label=f"best possible ({best:.3f})")
            se = entry.get("auc_standard_error_of_eval_set")
            if metric == "delta_auc_vs_none" and se:
                ax.axhspan(-se, se, color="gray", alpha=0.12, label=f"± eval-set AUC s.e. ({se:.3f})")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
            ax.set_xlabel("achieved compression ratio of the compressed tables' parameters")
            ax.set_ylabel(label)
            kept = len(entry["table_rows"]) - len(entry["uncompressed_tables"])
            ax.set_title(f"{dataset}: {entry['train_rows']} train / {entry['eval_rows']} eval rows; "
                         f"{kept} of {len(entry['table_rows'])} tables compressed", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    seeds = len(result["seeds"])
    fig.suptitle(f"DLRM, dim {result['setup']['dim']}: mean ± std over {seeds} seed{'s' if seeds > 1 else ''}"
                 + (" (SMOKE RUN: not a result)" if result["smoke"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def replot(json_path: Path) -> None:
    """Redraw the plot and reprint the tables of an earlier run (``--replot FILE``)."""
    result = json.loads(json_path.read_text())
    plot(result, json_path.with_suffix(".png"))
    print(table(result))


if __name__ == "__main__":
    sys.exit(main())
