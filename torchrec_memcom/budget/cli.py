"""`memcom budget search|heuristic`: an allocation for budgeted tables, written to a file that a
training config names (``compression: {method: budgeted, params: {allocation: FILE}}``)."""

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchrec_memcom.modules.budget_bytes import OPTIMIZER_STATE

DEFAULT_DIM = 16


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    budget = subparsers.add_parser(
        "budget",
        help="allocations for budgeted tables (BET): search or heuristic",
        description=__doc__,
    )
    commands = budget.add_subparsers(dest="budget_command", required=True)
    search = commands.add_parser(
        "search",
        help="BET's search: sample allocations in the budget, rank them with a DeepSets "
        "predictor, label the best by short DLRM training, refit, repeat",
    )
    heuristic = commands.add_parser("heuristic", help="the quick popularity heuristic (size ~ count^0.25), no training")
    for p in (search, heuristic):
        p.add_argument(
            "--config",
            help="training config (YAML, see configs/): data, dim, model, "
            "which tables are budgeted and the budget in their params",
        )
        p.add_argument("--data", help="data folder of `memcom data convert|synth` (overrides the config's)")
        p.add_argument("--dim", type=int, help=f"embedding dim (default: the config's, else {DEFAULT_DIM})")
        size = p.add_mutually_exclusive_group()
        size.add_argument("--budget-bytes", type=int, help="the budget in bytes")
        size.add_argument("--budget-ratio", type=float, help="the budget as uncompressed bytes / budget")
        p.add_argument(
            "--optimizer", choices=sorted(OPTIMIZER_STATE), help="count this sparse optimizer's state in the budget too"
        )
        p.add_argument(
            "--tail", action="store_true", default=None, help="the rarest ids may share rows of a MEmCom tier"
        )
        p.add_argument(
            "--sizes",
            help="tier dims, comma-separated multiples of 4 up to the dim (BET's candidate "
            "set; default: 4, 8, 16, ... doubling, and the dim: every size is a tier)",
        )
        p.add_argument("--out", required=True, help="allocation file to write (JSON)")
    search.add_argument("--rounds", type=int, default=3, help="predictor rounds (default 3)")
    search.add_argument(
        "--initial", type=int, default=3, help="labels before the first fit: the heuristic and random ones (default 3)"
    )
    search.add_argument("--per-round", type=int, default=2, help="labels per round (default 2)")
    search.add_argument("--pool", type=int, default=500, help="samples scored per round (default 500)")
    search.add_argument("--steps", type=int, default=300, help="training steps per label (default 300)")
    search.add_argument("--batch-size", type=int, help="default: the config's, else 512")
    search.add_argument("--val-batches", type=int, default=8, help="validation batches per label (default 8)")
    search.add_argument("--lr", type=float, help="Adagrad lr (default: the config's sparse lr, else 0.05)")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: fastest for these small models)"
    )
    search.set_defaults(func=_search)
    heuristic.set_defaults(func=_heuristic)


def _reporting(handler: Any) -> Any:
    """Print a budget or allocation error as one line (exit code 2) instead of a traceback."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ValueError as e:
            print(f"memcom budget {args.budget_command}: {e}", file=sys.stderr)
            return 2

    return run


@dataclasses.dataclass
class Problem:
    """What an allocation is searched for: tables, counts, budget, data and model.

    One place for what the config and the flags resolve to, so that ``search`` and ``heuristic``
    see the same tables and budget; ``problem_from_args`` builds it.

    Args:
        data: the data folder of `memcom data convert|synth` (an absolute path).
        budgeted: the ``EmbeddingBagConfig``s of the budgeted tables.
        plain: the other tables' configs (stock ``EmbeddingBagCollection`` tables).
        counts: each budgeted table's id counts, by table name.
        budget: the ``Budget`` the budgeted tables share.
        tail: whether the rarest ids may share rows of a MEmCom tier.
        sizes: the tier dims to use (None: ``size_ladder``'s default).
        batch_size: the batch size of a label's training.
        lr: the Adagrad lr of a label's training.
        dense_arch_layer_sizes: the DLRM's dense arch (the embedding dim is appended).
        over_arch_layer_sizes: the DLRM's over arch.

    Example::

        parser = argparse.ArgumentParser()
        add_parser(parser.add_subparsers())
        argv = ["budget", "heuristic", "--config", "configs/synthetic_budgeted.yaml", "--out", "a.json"]
        problem = problem_from_args(parser.parse_args(argv))
        problem.space().heuristic()  # an Allocation of problem.budgeted that fits problem.budget
    """

    data: str
    budgeted: List[Any]  # EmbeddingBagConfig
    plain: List[Any]
    counts: Dict[str, Any]
    budget: Any  # Budget
    tail: bool
    sizes: Optional[List[int]]
    batch_size: int
    lr: float
    dense_arch_layer_sizes: List[int]
    over_arch_layer_sizes: List[int]

    def space(self) -> Any:
        from torchrec_memcom.budget.space import AllocationSpace

        return AllocationSpace(self.budgeted, self.counts, self.budget, tail=self.tail, sizes=self.sizes)

    def collection(self, allocation: Any) -> Any:
        """The model's embedding collection under ``allocation`` (plain tables stay stock)."""
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection
        from torchrec_memcom.modules.mixed_embedding_bag import MixedEmbeddingBagCollection

        budgeted = BudgetedEmbeddingBagCollection(
            self.budgeted,
            budget_bytes=self.budget.bytes,
            frequencies=self.counts,
            allocation=allocation,
            budget_ratio=self.budget.ratio,
            optimizer=self.budget.optimizer,
        )
        if not self.plain:
            return budgeted
        return MixedEmbeddingBagCollection([budgeted, EmbeddingBagCollection(self.plain)])


def problem_from_args(args: argparse.Namespace) -> Problem:
    """Resolve the config (if any) and the flags, which win, into a ``Problem``."""
    from torchrec_memcom.data import load_frequencies, load_manifest, synthesize
    from torchrec_memcom.data.manifest import features_of
    from torchrec_memcom.modules.budget_bytes import Budget, check_training_optimizer
    from torchrec_memcom.modules.budgeted_embedding_bag import collection_params
    from torchrec_memcom.modules.frequency import table_counts
    from torchrec_memcom.train.model import table_configs

    config = None
    if args.config:
        from torchrec_memcom.train.config import load_config

        config = load_config(args.config)
    data = args.data or (config.data.path if config else None)
    if data is None:
        raise SystemExit("memcom budget: give --data or a --config naming one")
    if config and not args.data and config.data.synthetic and not (Path(data) / "manifest.json").exists():
        s = config.data.synthetic
        synthesize(s.rows, data, seed=s.seed, max_cardinality=s.max_cardinality)
    manifest = load_manifest(data)
    dim = args.dim or (config.embeddings.dim if config else DEFAULT_DIM)
    features = features_of(manifest).sparse
    sizes = [manifest["features"][f]["num_embeddings"] for f in features]
    if config and config.embeddings.num_embeddings != "from_data":
        sizes = list(config.embeddings.num_embeddings)
    tables = table_configs(dim, sizes, features)
    params: Dict[str, Any] = {}
    budgeted = tables
    if config:
        spec = config.embeddings.compression
        chosen = [t for t in tables if spec.for_table(t).method == "budgeted"]
        if chosen:
            budgeted = chosen
            params = collection_params({t.name: spec.for_table(t).params for t in chosen})
    if args.budget_bytes is not None or args.budget_ratio is not None:
        params.update(budget_bytes=args.budget_bytes, budget_ratio=args.budget_ratio)
    if args.optimizer:
        params["optimizer"] = args.optimizer
    if params.get("budget_bytes") is None and params.get("budget_ratio") is None:
        raise SystemExit("memcom budget: give --budget-bytes or --budget-ratio (or budgeted params in the config)")
    budget = Budget(
        bytes=params.get("budget_bytes"), ratio=params.get("budget_ratio"), optimizer=params.get("optimizer")
    )
    if config:
        try:
            check_training_optimizer(budget.optimizer, config.optimizer.sparse.type)
        except ValueError as e:
            raise ValueError(f"{args.config}: {e}") from None
    names = {t.name for t in budgeted}
    return Problem(
        data=str(Path(data).resolve()),
        budgeted=budgeted,
        plain=[t for t in tables if t.name not in names],
        counts=table_counts(budgeted, load_frequencies(data)),
        budget=budget,
        tail=bool(args.tail if args.tail is not None else params.get("tail", False)),
        sizes=[int(s) for s in args.sizes.split(",")] if args.sizes else params.get("sizes"),
        batch_size=getattr(args, "batch_size", None) or (config.train.batch_size if config else 512),
        lr=getattr(args, "lr", None) or (config.optimizer.sparse.lr if config else 0.05),
        dense_arch_layer_sizes=list(config.model.dense_arch_layer_sizes) if config else [64],
        over_arch_layer_sizes=list(config.model.over_arch_layer_sizes) if config else [64, 32, 1],
    )


def _write(problem: Problem, allocation: Any, out: str, **extra: Any) -> None:
    from torchrec_memcom.modules.budget_allocation import Allocation

    meta = {
        **allocation.meta,
        **extra,
        "data": problem.data,
        "table_shapes": {t.name: [t.num_embeddings, t.embedding_dim] for t in problem.budgeted},
    }
    Allocation(allocation.tables, meta).save(out)
    print(f"wrote {out}: {meta['bytes']} of {meta['budget_bytes']} budget bytes")
    for name, table in allocation.tables.items():
        tiers = ", ".join(
            f"{t.rows}x{t.dim}" + (f" (MEmCom, {t.hash_rows} rows)" if t.hash_rows else "") for t in table.tiers
        )
        print(f"  {name}: {tiers}")
    print(f"train with it: compression: {{method: budgeted, params: {{allocation: {out}}}}}")


@_reporting
def _heuristic(args: argparse.Namespace) -> int:
    problem = problem_from_args(args)
    _write(problem, problem.space().heuristic(), args.out)
    return 0


@_reporting
def _search(args: argparse.Namespace) -> int:
    import torch

    from torchrec_memcom.budget.labeler import TrainSettings, load_batches, train_and_evaluate
    from torchrec_memcom.budget.search import SearchSettings, search

    torch.set_num_threads(args.threads)
    problem = problem_from_args(args)
    train = load_batches(problem.data, "train", problem.batch_size, args.steps, seed=args.seed)
    val = load_batches(problem.data, "val", problem.batch_size, args.val_batches)
    settings = TrainSettings(
        steps=args.steps,
        lr=problem.lr,
        seed=args.seed,
        threads=args.threads,
        dense_arch_layer_sizes=problem.dense_arch_layer_sizes,
        over_arch_layer_sizes=problem.over_arch_layer_sizes,
    )
    space = problem.space()
    print(
        f"searching {len(problem.budgeted)} tables, budget {space.limit} bytes; "
        f"{args.initial + args.rounds * args.per_round} labels of {args.steps} steps",
        flush=True,
    )
    allocation, _ = search(
        space,
        lambda a: train_and_evaluate(lambda: problem.collection(a), train, val, settings),
        SearchSettings(
            rounds=args.rounds, initial=args.initial, per_round=args.per_round, pool=args.pool, seed=args.seed
        ),
        log=lambda line: print(line, flush=True),
    )
    _write(problem, allocation, args.out, train_settings=json.loads(json.dumps(dataclasses.asdict(settings))))
    return 0
