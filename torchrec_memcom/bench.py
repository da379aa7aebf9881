"""`memcom bench`: the method comparison of `benchmarks/quality.py`, on the user's data and cluster.

`benchmarks/quality.py` trains in one process on the built-in datasets; `memcom bench` runs the
same sweep (methods x target ratios x seeds, the stock model as baseline) through the training app
(`memcom train`, torchrun with `--nproc` processes) on the user's own converted data or TorchRec
npy days, from the user's own config. Every arm trains in its own folder under `--out/arms/`; a
finished arm (its `results.json`) is kept, and an unfinished one resumes from its checkpoints when
the config sets `train.checkpoint_dir`, so a sweep that stopped goes on where it stopped. The JSON,
the markdown tables and the plot are the built-in benchmark's (the functions below are shared).
"""

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


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


def within_tolerance(
    block: Dict[str, Any], dim: int, sizes: Sequence[int], names: Optional[Sequence[str]] = None
) -> Dict[str, Any]:
    """``block``, or for a budget below the smallest feasible one by at most 1%, that smallest
    budget: the tolerance the other methods' ratio solvers give (they accept a size within 1%
    of the target), so that budgeted tables are not unreachable where the others are not."""
    if block.get("method") != "budgeted":
        return block
    from torchrec_memcom.modules.budget_bytes import smallest_feasible_bytes, uncompressed_bytes

    shapes = {f"t_{f}": (n, dim) for f, n in zip(_names(sizes, names), sizes) if n >= block["min_rows"]}
    floor = smallest_feasible_bytes(shapes, None, bool(block["params"].get("tail")))
    best = sum(uncompressed_bytes(n, d, None) for n, d in shapes.values()) / floor
    ratio = block["params"]["budget_ratio"]
    if best < ratio <= 1.01 * best:
        params = {k: v for k, v in block["params"].items() if k != "budget_ratio"}
        return {**block, "params": {**params, "budget_bytes": floor}}
    return block


def unreachable(
    method: str, block: Dict[str, Any], dim: int, sizes: Sequence[int], names: Optional[Sequence[str]] = None
) -> Optional[str]:
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


def hanley_mcneil_se(auc: float, positives: int, negatives: int) -> float:
    """Standard error of an AUC on a fixed evaluation set (Hanley and McNeil, 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)
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
        "runs": [
            {k: r[k] for k in ("seed", "auc", "logloss", "train_loss", "compression_ratio", "seconds")} for r in runs
        ],
    }
    if all(r["seed"] in baseline for r in runs):
        out["delta_auc_vs_none"] = _mean_std([r["auc"] - baseline[r["seed"]]["auc"] for r in runs])
        out["delta_logloss_vs_none"] = _mean_std([r["logloss"] - baseline[r["seed"]]["logloss"] for r in runs])
    return out


def add_cells(
    entry: Dict[str, Any],
    runs: Dict[Any, List[Dict[str, Any]]],
    blocks: Dict[Any, Dict[str, Any]],
    sizes: Sequence[int],
    dim: int,
    min_rows: int,
) -> Dict[int, Dict[str, Any]]:
    """Summarize each arm's seeds into ``entry["methods"][method][ratio]``, paired with the
    uncompressed arm of the same seed; returns that baseline by seed (empty if it failed)."""
    baseline = {r["seed"]: r for r in runs.get(("none", 1.0), []) if "error" not in r}
    for (method, ratio), rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        key = "1" if method == "none" else f"{ratio:g}"
        params = {k: v for k, v in blocks[(method, ratio)].get("params", {}).items() if k != "frequencies"}
        cell: Dict[str, Any] = {
            "target_ratio": ratio,
            "reachable": True,
            "params": params,
            "errors": [r for r in rs if "error" in r],
        }
        if ok:
            cell.update(summarize(ok, baseline))
            cell["achieved_ratio_compressed_tables"] = compressed_tables_ratio(
                cell["embedding_bytes"], sizes, dim, min_rows
            )
        entry["methods"][method][key] = cell
    return baseline


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
        lines += [
            "",
            "| method | target | achieved (compressed tables / all) | AUC | dAUC vs none | log loss | "
            "dlogloss vs none |",
            "|---|---|---|---|---|---|---|",
        ]
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
        lines += [
            "",
            "paired AUC change vs stock (same seed), mean ± std over seeds:",
            "",
            "| method | " + " | ".join(f"{k}x" for k in keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
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


STYLE = {
    "none": ("black", "s"),
    "hash": ("tab:orange", "o"),
    "qr": ("tab:green", "^"),
    "memcom": ("tab:blue", "D"),
    "budgeted": ("tab:purple", "v"),
}


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
    rows = (
        ("auc", "validation AUC"),
        ("delta_auc_vs_none", "AUC change vs stock (same seed)"),
        ("logloss", "validation log loss"),
    )
    fig, axes = plt.subplots(len(rows), len(datasets), figsize=(6.2 * len(datasets), 3.6 * len(rows)), squeeze=False)
    for col, dataset in enumerate(datasets):
        entry = result["datasets"][dataset]
        for row, (metric, label) in enumerate(rows):
            ax = axes[row][col]
            for method, cells in entry["methods"].items():
                pts = sorted(
                    (on_compressed(result, entry, c), c[metric]["mean"], c[metric]["std"])
                    for c in cells.values()
                    if c.get("reachable") and metric in c
                )
                if not pts:
                    continue
                color, marker = STYLE.get(method, ("gray", "x"))
                xs, ys, es = zip(*pts)
                ax.errorbar(
                    xs,
                    ys,
                    yerr=es,
                    color=color,
                    marker=marker,
                    capsize=3,
                    lw=1.2,
                    label="none (stock EBC)" if method == "none" else method,
                )
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
            ax.set_title(
                f"{dataset}: {entry['train_rows']} train / {entry['eval_rows']} eval rows; "
                f"{kept} of {len(entry['table_rows'])} tables compressed",
                fontsize=10,
            )
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    seeds = len(result["seeds"])
    fig.suptitle(
        f"DLRM, dim {result['setup']['dim']}: mean ± std over {seeds} seed{'s' if seeds > 1 else ''}"
        + (" (SMOKE RUN: not a result)" if result["smoke"] else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _data_facts(config: Any, path: str) -> Dict[str, Any]:
    """Table rows and split sizes of the data the sweep trains on."""
    from torchrec_memcom.data.schema import CAT_NAMES

    if config.data.format == "torchrec_npy":
        from torchrec_memcom.data.torchrec_npy import describe

        if config.embeddings.num_embeddings == "from_data":
            raise ValueError(f"{path}: TorchRec npy data needs embeddings.num_embeddings in the config")
        splits = describe(path)["splits"]
        return {
            "sizes": list(config.embeddings.num_embeddings),
            "train_rows": splits["train"]["rows"],
            "eval_rows": splits[config.data.eval_split]["rows"],
            "manifest": {},
        }
    from torchrec_memcom.data import load_manifest

    manifest = load_manifest(path)
    sizes = config.embeddings.num_embeddings
    if sizes == "from_data":
        sizes = [manifest["features"][f]["num_embeddings"] for f in CAT_NAMES]
    return {
        "sizes": list(sizes),
        "train_rows": manifest["splits"][config.data.train_split]["rows"],
        "eval_rows": manifest["splits"][config.data.eval_split]["rows"],
        "manifest": manifest,
    }


def sweep(
    config_path: str,
    data: str,
    methods: Sequence[str],
    ratios: Sequence[float],
    seeds: Sequence[int],
    nproc: int,
    out: Path,
    min_rows: int,
    name: str = "bench",
) -> Dict[str, Any]:
    """Train every arm (resuming or keeping finished ones); write `out/name.{json,png}`; the result."""
    import yaml

    from torchrec_memcom.train.cli import launch
    from torchrec_memcom.train.config import as_dict, load_config

    config = load_config(config_path)
    config.data.path = data
    facts = _data_facts(config, data)
    sizes, dim = facts["sizes"], config.embeddings.dim
    base = as_dict(config)
    names = ["none", *[m for m in methods if m != "none"]]
    entry: Dict[str, Any] = {
        "description": f"{data} ({config.data.format}), config {config_path}",
        "train_rows": facts["train_rows"],
        "eval_rows": facts["eval_rows"],
        "batch_size": config.train.batch_size,
        "table_rows": sizes,
        "uncompressed_tables": [f"t_cat_{i}" for i, n in enumerate(sizes) if n < min_rows],
        "best_auc": facts["manifest"].get("best_auc", {}).get("val"),
        "best_logloss": facts["manifest"].get("best_logloss", {}).get("val"),
        "methods": {},
    }
    blocks = {}
    for method, ratio in [("none", 1.0)] + [(m, float(r)) for r in ratios for m in names if m != "none"]:
        block = within_tolerance(compression(method, ratio, min_rows, Path(data)), dim, sizes)
        why = unreachable(method, block, dim, sizes)
        key = "1" if method == "none" else f"{ratio:g}"
        if why is not None:
            entry["methods"].setdefault(method, {})[key] = {"target_ratio": ratio, "reachable": False, "reason": why}
        else:
            entry["methods"].setdefault(method, {})
            blocks[(method, ratio)] = block
    started = time.time()
    runs: Dict[Any, List[Dict[str, Any]]] = {arm: [] for arm in blocks}
    for seed in seeds:
        for (method, ratio), block in blocks.items():
            arm = out / "arms" / f"{method}_{ratio:g}_s{seed}"
            results = arm / "run" / "results.json"
            if results.is_file():
                r = json.loads(results.read_text())
                print(f"{arm.name}: finished before, kept", flush=True)
            else:
                arm_config = copy.deepcopy(base)
                arm_config["embeddings"]["compression"] = block
                arm_config["train"].update(seed=seed, run_dir=str(arm / "run"))
                if arm_config["train"].get("checkpoint_dir"):
                    arm_config["train"]["checkpoint_dir"] = str(arm / "checkpoints")
                arm.mkdir(parents=True, exist_ok=True)
                (arm / "config.yaml").write_text(yaml.safe_dump(arm_config))
                t0 = time.time()
                code = launch(str(arm / "config.yaml"), nproc)
                if code != 0 or not results.is_file():
                    print(f"{arm.name}: FAILED (exit code {code}; see {arm})", flush=True)
                    runs[(method, ratio)].append({"seed": seed, "error": f"exit code {code}"})
                    continue
                r = {**json.loads(results.read_text()), "seconds": time.time() - t0}
                results.write_text(json.dumps(r, indent=1))
            r = {**r, "seed": seed}
            runs[(method, ratio)].append(r)
            print(
                f"{arm.name}: auc {r['auc']:.4f} logloss {r['logloss']:.4f} achieved {r['compression_ratio']:.2f}x",
                flush=True,
            )
    add_cells(entry, runs, blocks, sizes, dim, min_rows)
    result: Dict[str, Any] = {
        "command": " ".join(["memcom", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else "memcom bench",
        "smoke": False,
        "methods": names,
        "target_ratios": list(ratios),
        "seeds": list(seeds),
        "setup": {
            "model": f"{config.model.arch}, dense arch {config.model.dense_arch_layer_sizes}, over arch "
            f"{config.model.over_arch_layer_sizes}",
            "dim": dim,
            "min_rows": min_rows,
            "nproc": nproc,
            "config": base,
        },
        "datasets": {Path(data).name: entry},
        "seconds": time.time() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{name}.png")
    print(table(result))
    return result


def _bench(args: argparse.Namespace) -> int:
    try:
        result = sweep(
            args.config,
            args.data,
            args.methods,
            args.ratios,
            args.seeds,
            args.nproc,
            Path(args.out),
            args.min_rows,
            args.name,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"memcom bench: error: {e}", file=sys.stderr)
        return 1
    failed = [
        c
        for cells in result["datasets"][Path(args.data).name]["methods"].values()
        for c in cells.values()
        if c.get("errors")
    ]
    return 1 if failed else 0


def add_parser(subparsers: Any) -> None:
    """Register `memcom bench`."""
    bench = subparsers.add_parser(
        "bench",
        help="the method comparison (quality vs compression ratio) on your data, through memcom train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--config", required=True, help="a memcom train config: model, optimizer, train settings")
    bench.add_argument(
        "--data", required=True, help="the data folder (or TorchRec npy folder, as the config's data.format)"
    )
    bench.add_argument("--methods", nargs="+", default=["hash", "qr", "memcom"], help="besides none (always run)")
    bench.add_argument("--ratios", nargs="+", type=float, default=[2, 4, 8, 16, 32, 64])
    bench.add_argument("--seeds", nargs="+", type=int, default=[0])
    bench.add_argument("--nproc", type=int, default=1, help="processes of every training run (torchrun)")
    bench.add_argument("--min-rows", type=int, default=1000, help="smaller tables stay uncompressed")
    bench.add_argument("--out", required=True, help="folder for the arms and the results")
    bench.add_argument("--name", default="bench", help="stem of the JSON and PNG written into --out")
    bench.set_defaults(func=_bench)
