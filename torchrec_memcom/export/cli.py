"""`memcom export` (checkpoint -> one TorchScript file) and `memcom score` (raw TSV -> P(click))."""

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, TextIO

import torch

from torchrec_memcom.export.inference import PRECISIONS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="write a trained checkpoint as one small TorchScript file for CPU inference (checked)",
        description="Export a memcom train checkpoint (any world size) as one TorchScript file that "
        "plain torch loads (torch.jit.load), check its predictions against the trained model on held "
        "data, and report its size. See docs/export.md.",
    )
    export.add_argument("checkpoint", help="a step_N checkpoint folder, or a train.checkpoint_dir (its latest)")
    export.add_argument("--out", required=True, help="the file to write")
    export.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="int8",
        help="embedding table storage: int8 row-wise (default), fp16 or fp32",
    )
    export.add_argument("--data", help="the data folder the model was trained on (default: its config's data.path)")
    export.add_argument("--check-data", help="held data to check on (default: the training data folder)")
    export.add_argument("--check-split", help="split of the check data (default: the config's eval split)")
    export.add_argument("--check-rows", type=int, default=100_000, help="rows to check on (0: all; default 100000)")
    export.add_argument("--no-check", action="store_true", help="skip the check (not recommended)")
    export.add_argument(
        "--no-raw-ids",
        action="store_true",
        help="leave out the raw-value -> id map (score_raw then refuses; forward on ids works)",
    )
    export.add_argument("--tolerance", type=float, help="largest allowed |P_exported - P_trained|")
    export.add_argument("--auc-tolerance", type=float, help="largest allowed |AUC change|")
    export.add_argument("--report", help="also write the report as JSON here")
    export.set_defaults(func=_guarded("export", _export))

    score = subparsers.add_parser(
        "score",
        help="score raw Criteo TSV lines with an exported model",
        description="Print P(click) of every line (one per line, input order), with the exported "
        "model's own raw-value mapping; for labelled lines, AUC and log loss go to stderr.",
    )
    score.add_argument("model", help="a file written by memcom export")
    score.add_argument("inputs", nargs="+", help="Criteo TSV files, 40 fields (labelled) or 39; .gz works; - is stdin")
    score.add_argument("--out", default="-", help="where to write the probabilities (default: stdout)")
    score.add_argument("--batch-size", type=int, default=4096)
    score.set_defaults(func=_guarded("score", _score))


def _guarded(name: str, command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report input errors as one line on stderr with exit code 1, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        from torchrec_memcom.export.export import ExportCheckError

        try:
            return command(args)
        except ExportCheckError as e:
            _write_report(args, e.report)
            print(f"memcom {name}: error: {e}", file=sys.stderr)
            return 1
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            if getattr(args, "debug", False):
                raise
            print(f"memcom {name}: error: {e}", file=sys.stderr)
            return 1

    return run


def _write_report(args: argparse.Namespace, report: dict) -> None:
    from torchrec_memcom.export.export import describe

    print(describe(report), file=sys.stderr)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")


def _export(args: argparse.Namespace) -> int:
    from torchrec_memcom.export.export import describe, export_checkpoint

    report = export_checkpoint(
        args.checkpoint,
        args.out,
        args.precision,
        args.check_data,
        data=args.data,
        check_split=args.check_split,
        check_rows=args.check_rows or None,
        check=not args.no_check,
        raw_ids=not args.no_raw_ids,
        max_abs_diff=args.tolerance,
        auc_change=args.auc_tolerance,
    )
    print(describe(report))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _score(args: argparse.Namespace) -> int:
    from torchrec_memcom.data import roc_auc
    from torchrec_memcom.export.inference import load_model
    from torchrec_memcom.export.raw import read_batches

    if args.batch_size < 1:
        raise ValueError("--batch-size must be positive")
    if args.out != "-" and Path(args.out).exists():  # opening it truncates: refuse to empty an input
        for given in [args.model, *args.inputs]:
            if given != "-" and Path(given).exists() and os.path.samefile(args.out, given):
                raise ValueError(f"--out {args.out} is the input {given}: writing would empty it")
    model = load_model(args.model)
    scores: List[torch.Tensor] = []
    labels: List[Optional[torch.Tensor]] = []
    out: TextIO = sys.stdout if args.out == "-" else open(args.out, "w")
    try:
        with torch.no_grad():
            for path in args.inputs:
                for batch in read_batches(path, args.batch_size):
                    p = model.score_raw(batch.ints, batch.cats)
                    out.write("".join(f"{v:.6f}\n" for v in p.tolist()))
                    scores.append(p)
                    labels.append(batch.labels)
    finally:
        if out is not sys.stdout:
            out.close()
    if scores and all(y is not None for y in labels):
        p = torch.cat(scores).double()
        y = torch.cat([y for y in labels if y is not None])
        eps = 1e-7
        logloss = float(-(y * p.clamp(eps).log() + (1 - y) * (1 - p).clamp(eps).log()).mean())
        auc = roc_auc(p.numpy(), y.numpy())  # NaN when the lines hold one class only
        print(
            json.dumps({"rows": len(y), "auc": None if math.isnan(auc) else auc, "logloss": logloss}), file=sys.stderr
        )
    return 0
