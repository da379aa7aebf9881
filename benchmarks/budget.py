"""Budgeted tables against uniform smaller dims and MEmCom at equal bytes; writes docs/budget_*.

    .venv/bin/python benchmarks/budget.py            # about 5-10 minutes on 2 cores
    .venv/bin/python benchmarks/budget.py --smoke    # what CI runs: tiny, checks structure; writes
                                                     # budget_smoke.* to a temporary folder

Per dataset (synthetic data of `memcom data synth`, the real Criteo sample converted by
`memcom data convert --mode frequency`) and per budget (what uniform dim-8 or dim-4 tables with
their projections to the model dim 32 cost: about 4x and 8x smaller than the uncompressed
tables): uniform tables at that dim; MEmCom with the shared rows that fit; budgeted tables by the
heuristic, with and without a MEmCom tail, and by the search (MEmCom tails allowed, labels on
the validation split), all with the tier dims of ``LADDER``.
Every method trains the same DLRM on the same batches for the same steps, 3 seeds each, and is
scored on the test split; the uncompressed tables train alongside as the ceiling.
"""

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_memcom.budget.cli import Problem
from torchrec_memcom.budget.labeler import TrainSettings, load_batches, train_and_evaluate
from torchrec_memcom.budget.search import SearchSettings, search
from torchrec_memcom.data import CAT_NAMES, convert, load_frequencies, load_manifest, synthesize
from torchrec_memcom.methods.budgeted import budgeted_collection
from torchrec_memcom.modules.budget_allocation import Allocation, TableAllocation, Tier
from torchrec_memcom.modules.budget_bytes import Budget, table_bytes
from torchrec_memcom.modules.frequency import table_counts
from torchrec_memcom.modules.memcom_config import MEmComConfig
from torchrec_memcom.modules.memcom_embedding_bag import MEmComEmbeddingBagCollection
from torchrec_memcom.train.model import table_configs

REPO = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = REPO.parent / "shared" / "data" / "criteo_kaggle_sample_8k.tsv"
DIM = 32
UNIFORM_DIMS = (8, 4)  # the budgets: what uniform tables of these dims cost
# Tier dims of the budgeted methods, pinned: the doubling ladder docs/budget_benchmark.json was
# made with, whatever size_ladder's default.
LADDER = (4, 8, 16, 32)
DATASETS = {
    # name: (batch size, training steps, search label steps, Adagrad lr); the real sample is
    # 6,858 training rows: one epoch, after which every method overfits
    "synthetic": (512, 300, 200, 0.05),
    "criteo_sample": (128, 53, 53, 0.02),
}


@dataclasses.dataclass(frozen=True)
class Scale:
    """How much a run does: synthetic rows and their cardinality cap, training steps (None: each
    dataset's own, ``DATASETS``), validation and test batches, and the search."""

    synthetic_rows: int
    max_cardinality: int
    steps: Optional[int]
    eval_batches: int
    search: SearchSettings


FULL = Scale(200_000, 20_000, None, 64, SearchSettings(rounds=3, initial=3, per_round=2, pool=500, seed=0))
SMOKE = Scale(3_000, 300, 3, 2, SearchSettings(rounds=1, initial=2, per_round=1, pool=20, seed=0))


def prepare(name: str, work: Path, scale: Scale) -> Path:
    out = work / name
    if name == "synthetic":
        synthesize(scale.synthetic_rows, out, seed=0, max_cardinality=scale.max_cardinality, progress=False)
    else:
        convert(CRITEO_SAMPLE, out, mode="frequency", min_count=1, progress=False)
    return out


def uniform(tables: List[EmbeddingBagConfig], dim: int) -> Allocation:
    return Allocation({t.name: TableAllocation((Tier(t.num_embeddings, dim),)) for t in tables})


def memcom_rows(tables: List[EmbeddingBagConfig], budget: int) -> Dict[str, int]:
    """Shared rows ``m = max(1, a * n)`` per table, the largest ``a`` whose total fits."""

    def rows(a: float) -> Dict[str, int]:
        return {t.name: int(min(t.num_embeddings, max(1, a * t.num_embeddings))) for t in tables}

    def cost(m: Dict[str, int]) -> int:
        return sum(4 * (m[t.name] * t.embedding_dim + t.num_embeddings) for t in tables)

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(rows(mid)) <= budget else (lo, mid)
    return rows(lo)


def state_bytes(state: Union[nn.Module, Dict[str, torch.Tensor]]) -> int:
    """Bytes of a module's state dict (or of a part of one)."""
    values = state.state_dict().values() if isinstance(state, nn.Module) else state.values()
    return sum(v.numel() * v.element_size() for v in values)


def run_dataset(name: str, work: Path, seeds: List[int], scale: Scale, log: Callable[[str], None]) -> Dict[str, Any]:
    data = prepare(name, work, scale)
    batch_size, steps, label_steps, lr = DATASETS[name]
    steps, label_steps = (scale.steps, scale.steps) if scale.steps else (steps, label_steps)
    manifest = load_manifest(data)
    tables = table_configs(DIM, [manifest["features"][f]["num_embeddings"] for f in CAT_NAMES])
    counts = table_counts(tables, load_frequencies(data))
    full_bytes = sum(4 * t.num_embeddings * t.embedding_dim for t in tables)
    train = load_batches(str(data), "train", batch_size, steps, seed=0)
    val = load_batches(str(data), "val", batch_size, scale.eval_batches)
    test = load_batches(str(data), "test", batch_size, scale.eval_batches)

    def evaluate(build: Callable[[], nn.Module], budget: int) -> Dict[str, Any]:
        runs = [train_and_evaluate(build, train, test, TrainSettings(steps=steps, lr=lr, seed=s)) for s in seeds]
        auc = np.array([r["auc"] for r in runs])
        logloss = np.array([r["logloss"] for r in runs])
        module = build()
        size = state_bytes(module)
        remap = {k: v for k, v in module.state_dict().items() if k.startswith("remap.")}
        return {
            "bytes": size,
            "remap_bytes": state_bytes(remap),
            "within_budget": size <= budget,
            "auc": auc.tolist(),
            "auc_mean": float(auc.mean()),
            "auc_std": float(auc.std(ddof=1)) if len(auc) > 1 else 0.0,
            "logloss_mean": float(logloss.mean()),
            "logloss_std": float(logloss.std(ddof=1)) if len(logloss) > 1 else 0.0,
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in runs])),
        }

    def show(method: str, r: Dict[str, Any]) -> None:
        log(
            f"  {method:<28} {r['bytes']:>10} bytes  test AUC {r['auc_mean']:.4f} ± {r['auc_std']:.4f}"
            f"  logloss {r['logloss_mean']:.4f}"
        )

    log(f"{name}: {len(tables)} tables, {full_bytes} bytes uncompressed")
    ceiling = evaluate(lambda: EmbeddingBagCollection(tables), full_bytes)
    show("uncompressed", ceiling)
    budgets = {}
    for dim in UNIFORM_DIMS:
        budget_bytes = sum(table_bytes(a, DIM, False, None).total for a in uniform(tables, dim).tables.values())
        log(f"{name}, budget of uniform dim {dim}: {budget_bytes} bytes ({full_bytes / budget_bytes:.2f}x smaller)")
        problem = Problem(
            data=str(data),
            budgeted=tables,
            plain=[],
            counts=counts,
            budget=Budget(bytes=budget_bytes),
            tail=True,
            sizes=list(LADDER),
            batch_size=batch_size,
            lr=lr,
            dense_arch_layer_sizes=list(TrainSettings.dense_arch_layer_sizes),
            over_arch_layer_sizes=list(TrainSettings.over_arch_layer_sizes),
        )
        start = time.perf_counter()
        label_settings = TrainSettings(steps=label_steps, lr=lr)
        searched, labelled = search(
            problem.space(),
            lambda a: train_and_evaluate(lambda: problem.collection(a), train, val, label_settings),  # noqa: B023  (called in this iteration)
            scale.search,
            log=lambda line: log(f"  search {line}"),
        )
        search_seconds = time.perf_counter() - start

        def budgeted(allocation: Any = None, tail: bool = False) -> Callable[[], nn.Module]:
            return lambda: budgeted_collection(
                tables,
                budget_bytes=budget_bytes,  # noqa: B023  (built in this iteration)
                frequencies=counts,
                allocation=allocation,
                tail=tail,
                sizes=LADDER,
            )

        rows = memcom_rows(tables, budget_bytes)
        methods: Dict[str, Callable[[], nn.Module]] = {
            f"uniform dim {dim}": budgeted(uniform(tables, dim)),
            "MEmCom": lambda: MEmComEmbeddingBagCollection(
                tables,
                {t.name: MEmComConfig(num_hash_rows=rows[t.name]) for t in tables},  # noqa: B023  (built in this iteration)
            ),
            "budgeted heuristic": budgeted(),
            "budgeted heuristic + tail": budgeted(tail=True),
            "budgeted searched": budgeted(searched),
        }
        results = {}
        for method, build in methods.items():
            results[method] = evaluate(build, budget_bytes)
            show(method, results[method])
        budgets[f"uniform dim {dim}"] = {
            "budget_bytes": budget_bytes,
            "ratio": full_bytes / budget_bytes,
            "search": {
                "seconds": search_seconds,
                "label_steps": label_steps,
                "labels": [{"round": x.round, "val_auc": x.metrics["auc"], "predicted": x.predicted} for x in labelled],
                "heuristic_val_auc": labelled[0].metrics["auc"],
                "best_val_auc": max(x.metrics["auc"] for x in labelled),
            },
            "searched_allocation": {
                n: [[t.rows, t.dim] + ([t.hash_rows] if t.hash_rows else []) for t in a.tiers]
                for n, a in searched.tables.items()
            },
            "methods": results,
        }
    return {
        "data": {
            "kind": name,
            "rows": {s: v["rows"] for s, v in manifest["splits"].items()},
            "best_auc": manifest.get("best_auc"),
        },
        "tables": {t.name: t.num_embeddings for t in tables},
        "dim": DIM,
        "sizes": list(LADDER),
        "batch_size": batch_size,
        "steps": steps,
        "lr": lr,
        "seeds": seeds,
        "uncompressed_bytes": full_bytes,
        "uncompressed": ceiling,
        "budgets": budgets,
    }


def plot(results: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, level, r, b) for name, r in results.items() for level, b in r["budgets"].items()]
    fig, axes = plt.subplots(
        len(results), len(UNIFORM_DIMS), figsize=(6 * len(UNIFORM_DIMS), 3.8 * len(results)), squeeze=False
    )
    for ax, (name, level, r, b) in zip(axes.flat, panels):
        entries = {"uncompressed": r["uncompressed"], **b["methods"]}
        methods = list(entries)
        means = np.array([entries[m]["auc_mean"] for m in methods])
        stds = np.array([entries[m]["auc_std"] for m in methods])
        colors = [
            "#999999" if m == "uncompressed" else "#4c72b0" if m.startswith("budgeted") else "#dd8452" for m in methods
        ]
        ax.barh(range(len(methods)), means, xerr=stds, color=colors, capsize=3)
        ax.set_yticks(
            range(len(methods)), [f"{m} ({entries[m]['bytes'] / 2**20:.2f} MiB)" for m in methods], fontsize=8
        )
        pad = 3 * max(float(stds.max()), 0.002)
        ax.set_xlim(float(means.min()) - pad, float(means.max()) + pad)
        ax.invert_yaxis()
        ax.set_xlabel(f"test AUC, mean ± std over {len(r['seeds'])} seeds", fontsize=9)
        ax.set_title(f"{name}, budget of {level}: {b['ratio']:.1f}x smaller", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work",
        help="where the data folders go (default: a folder in the system's temporary "
        "one, outside the repo: one is converted from the shared sample)",
    )
    parser.add_argument(
        "--out",
        help="where budget_benchmark.json/png go (default docs/; with --smoke, "
        "budget_smoke.json/png in a temporary folder)",
    )
    parser.add_argument("--seeds", type=int, help="training seeds per method (default 3; 1 with --smoke)")
    parser.add_argument(
        "--datasets", nargs="+", choices=list(DATASETS), help="default: all (synthetic only with --smoke)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run for CI: one seed, 3,000 synthetic rows, 3 steps, a 3-label search",
    )
    args = parser.parse_args(argv)
    name = "budget_smoke" if args.smoke else "budget_benchmark"
    work = Path(args.work or Path(tempfile.gettempdir()) / f"torchrec_memcom_bench_{name}")
    out = Path(args.out or (tempfile.mkdtemp(prefix="budget_smoke_") if args.smoke else REPO / "docs"))
    seeds = list(range(args.seeds or (1 if args.smoke else 3)))
    datasets = args.datasets or (["synthetic"] if args.smoke else list(DATASETS))
    scale = SMOKE if args.smoke else FULL
    torch.set_num_threads(1)
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f}s] {line}", flush=True)

    results = {d: run_dataset(d, work, seeds, scale, log) for d in datasets}
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python benchmarks/budget.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "smoke": args.smoke,
        "seconds": time.perf_counter() - start,
        "torch_threads": 1,
        "results": results,
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(results, out / f"{name}.png")
    log(f"wrote {out / f'{name}.json'} and {out / f'{name}.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
