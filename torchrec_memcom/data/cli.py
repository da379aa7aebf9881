"""`memcom data {convert,synth,movielens,info}`: the command-line side of torchrec_memcom.data.

Only argparse is imported at module level, so `memcom --help` stays fast; each command imports
what it needs when it runs.
"""

import argparse
import json
import sys
from typing import Any, Dict, List, Union


def _num_embeddings(text: str) -> Union[int, List[int]]:
    values = [int(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def _summary(manifest: Dict[str, Any], out: str) -> str:
    lines = [
        f"{out}: {manifest['rows_written']:,} rows written, {manifest['rows_skipped']:,} skipped, "
        f"{manifest['rows_read']:,} read ({manifest['mode']})"
    ]
    for split, info in manifest["splits"].items():
        lines.append(f"  {split:5s} {info['rows']:>12,} rows in {len(info['shards'])} shards")
    skipped = {k: v for k, v in manifest.get("skipped_by_reason", {}).items() if v}
    if skipped:
        lines.append(f"  skipped by reason: {skipped}")
    if "best_auc" in manifest:
        lines.append(
            "  best AUC (true click probabilities): "
            + ", ".join(f"{s} {v:.4f}" for s, v in manifest["best_auc"].items())
        )
    return "\n".join(lines)


def _part(text: str) -> Any:
    k, sep, n = text.partition("/")
    try:
        return int(k), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (e.g. 0/4), got {text!r}") from None


def _convert(args: argparse.Namespace) -> int:
    from .converter import convert
    from .sources import parse_days

    def days(spec: Any) -> Any:
        return None if spec is None else parse_days(spec)

    manifest = convert(
        args.inputs,
        args.out,
        mode=args.mode,
        num_embeddings=args.num_embeddings,
        min_count=args.min_count,
        split=args.split,
        train_days=days(args.train_days),
        val_days=days(args.val_days),
        test_days=days(args.test_days),
        rows_per_shard=args.rows_per_shard,
        on_bad_line=args.on_bad_line,
        block_size=args.block_size,
        progress=not args.quiet,
        overwrite=args.overwrite,
        workers=args.workers,
        part=args.part,
        merge_parts=args.merge_parts,
        wait_s=args.wait,
    )
    if args.part is not None:
        rows = sum(r["rows_written"] for r in manifest["shards"])
        print(f"{args.out}: part {args.part[0]}/{args.part[1]} done, {rows:,} rows in {len(manifest['shards'])} shards")
        return 0
    print(_summary(manifest, args.out))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from .synth import synthesize, write_synthetic_tsv

    for flag, value in (("--rows", args.rows), ("--rows-per-shard", args.rows_per_shard)):
        if value < 1:
            raise ValueError(f"{flag}: must be >= 1, got {value}")
    options = dict(
        max_cardinality=args.max_cardinality,
        zipf_exponent=args.zipf_exponent,
        base_ctr=args.base_ctr,
        progress=not args.quiet,
    )
    if args.format == "tsv":
        write_synthetic_tsv(args.out, args.rows, args.seed, **options)
        print(f"{args.out}: {args.rows:,} rows of Criteo TSV")
        return 0
    manifest = synthesize(
        args.rows, args.out, args.seed, rows_per_shard=args.rows_per_shard, overwrite=args.overwrite, **options
    )
    print(_summary(manifest, args.out))
    return 0


def _movielens(args: argparse.Namespace) -> int:
    from .movielens import convert_movielens

    manifest = convert_movielens(
        args.src,
        args.out,
        seed=args.seed,
        on_bad_line=args.on_bad_line,
        rows_per_shard=args.rows_per_shard,
        overwrite=args.overwrite,
    )
    print(_summary(manifest, args.out))
    return 0


def _info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .manifest import MANIFEST, load_manifest

    if not (Path(args.dir) / MANIFEST).exists() and any(Path(args.dir).glob("day_*_labels.npy")):
        from .torchrec_npy import describe

        info = describe(args.dir)
        if args.json:
            print(json.dumps(info, indent=1))
            return 0
        rows = sum(info["days"].values())
        print(
            f"{args.dir}: TorchRec npy files (data.format torchrec_npy), {len(info['days'])} days, "
            f"{rows:,} rows, sparse {info['sparse_dtype']}"
        )
        for split, part in info.get("splits", {}).items():
            days = part["days"]
            print(
                f"  {split:5s} {part['rows']:>12,} rows  days {days[0]}-{days[-1]}"
                + (" (half)" if split != "train" else "")
            )
        print(f"  ids: {info['ids']}")
        return 0
    manifest = load_manifest(args.dir)
    if args.json:
        print(json.dumps(manifest, indent=1))
        return 0
    print(_summary(manifest, args.dir))
    print(f"  {'feature':8s} {'num_embeddings':>15s} {'cardinality':>12s}")
    for name, feature in manifest["features"].items():
        print(f"  {name:8s} {feature['num_embeddings']:>15,} {feature['cardinality']:>12,}")
    return 0


def _guarded(command: Any) -> Any:
    """Report data, option and file errors as one line on stderr with exit code 1, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ValueError, OSError, EOFError) as e:
            if getattr(args, "debug", False):
                raise
            print(f"memcom data {args.data_command}: error: {e}", file=sys.stderr)
            return 1

    return run


def add_parser(subparsers: Any) -> None:
    """Register `memcom data` and its subcommands."""
    data = subparsers.add_parser(
        "data",
        help="convert (Criteo, MovieLens), synthesize and inspect data",
        description="Criteo TSV or MovieLens -> Parquet shards, synthetic data, manifests.",
    )
    commands = data.add_subparsers(dest="data_command", required=True)

    convert = commands.add_parser(
        "convert",
        help="convert Criteo TSV (plain or .gz, a file or day files) to Parquet shards",
        description="Convert Criteo TSV into DIR/<split>/part-XXXXX.parquet, DIR/manifest.json and "
        "DIR/frequencies/. Re-running an interrupted conversion resumes it.",
    )
    convert.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="Kaggle train.txt, day_N files, or a folder of day_N[.gz] files"
    )
    convert.add_argument("--out", required=True, metavar="DIR")
    convert.add_argument(
        "--mode",
        choices=["mod", "frequency"],
        default="mod",
        help="ids: hex value modulo num_embeddings, or by train-split frequency "
        "(ids seen fewer than --min-count times share id 0; needs a counting pass)",
    )
    convert.add_argument(
        "--num-embeddings",
        type=_num_embeddings,
        default=None,
        metavar="N[,N...]",
        help="mod mode id-space size, one for all features or 26 (default 100000)",
    )
    convert.add_argument(
        "--min-count",
        type=int,
        default=3,
        metavar="K",
        help="frequency mode: minimum train count for an own id (default 3)",
    )
    convert.add_argument(
        "--split",
        choices=["auto", "kaggle", "days", "none"],
        default="auto",
        help="kaggle: first 6/7 of the lines train, last 1/7 halved val/test; days: "
        "by file; none: all train; auto: kaggle for one file, else days",
    )
    for name, default in (("train", "all days not in val/test"), ("val", "last day"), ("test", "last day")):
        convert.add_argument(
            f"--{name}-days",
            metavar="SPEC",
            help=f"days split: days for {name}, e.g. 0-22 or 0,3,5-7 (default: {default}; "
            "a day in both val and test is halved)",
        )
    convert.add_argument(
        "--rows-per-shard", type=int, default=1_000_000, metavar="N", help="input lines per shard (default 1000000)"
    )
    convert.add_argument(
        "--on-bad-line",
        choices=["error", "skip"],
        default="error",
        help="malformed line: stop naming file and line, or skip and count it",
    )
    convert.add_argument(
        "--block-size",
        type=int,
        default=4 << 20,
        metavar="BYTES",
        help="CSV reader block size, bounds memory (default 4 MiB)",
    )
    convert.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes converting at once, over files and line ranges of a file; same output for any N (default 1)",
    )
    convert.add_argument(
        "--part",
        type=_part,
        metavar="K/N",
        help="several hosts: convert only inputs K, K+N, ... (mod mode) into DIR/.parts/K",
    )
    convert.add_argument(
        "--merge-parts",
        type=int,
        default=0,
        metavar="N",
        help="several hosts, the last step: wait for parts 0..N-1, then move their shards "
        "into place, count ids and write the manifest",
    )
    convert.add_argument(
        "--wait",
        type=float,
        default=24 * 3600.0,
        metavar="SECONDS",
        help="--merge-parts: how long to wait for the parts (default 1 day)",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="discard previous output in DIR instead of resuming or refusing"
    )
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(func=_guarded(_convert))

    synth = commands.add_parser(
        "synth",
        help="write Criteo-shaped synthetic data with a known best AUC",
        description="Synthetic Criteo-shaped data from a hidden click model (same Parquet format as "
        "convert; manifest records best_auc). Seeded and reproducible bit for bit.",
    )
    synth.add_argument("--rows", type=int, required=True, metavar="N")
    synth.add_argument(
        "--out", required=True, metavar="DIR", help="data folder; with --format tsv a file (.gz compresses)"
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--max-cardinality",
        type=int,
        default=100_000,
        metavar="C",
        help="cap on each feature's cardinality (Criteo Kaggle's, capped; default 100000)",
    )
    synth.add_argument("--zipf-exponent", type=float, default=1.1, help="id popularity exponent (default 1.1)")
    synth.add_argument("--base-ctr", type=float, default=0.25, help="mean click rate (default 0.25)")
    synth.add_argument("--rows-per-shard", type=int, default=1_000_000, metavar="N")
    synth.add_argument(
        "--format",
        choices=["parquet", "tsv"],
        default="parquet",
        help="tsv: the same rows as raw Criteo TSV, to test or benchmark convert",
    )
    synth.add_argument("--overwrite", action="store_true", help="replace other data in DIR")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_guarded(_synth))

    movielens = commands.add_parser(
        "movielens",
        help="convert MovieLens-1M (GroupLens .dat or RecBole atomic files) to Parquet shards",
        description="MovieLens-1M ratings into the same Parquet layout: label = rating >= 4; user, movie, "
        "gender, age, occupation, zip one id each, genres a multi-hot bag; rows shuffled "
        "(--seed), then the Kaggle split (6/7 train, 1/14 val, 1/14 test).",
    )
    movielens.add_argument(
        "src", metavar="SRC", help="folder with ratings.dat, users.dat, movies.dat or *.inter, *.user, *.item"
    )
    movielens.add_argument("--out", required=True, metavar="DIR")
    movielens.add_argument("--seed", type=int, default=0, help="row shuffle seed (default 0)")
    movielens.add_argument(
        "--on-bad-line",
        choices=["error", "skip"],
        default="error",
        help="malformed line: stop naming file and line, or skip and count it",
    )
    movielens.add_argument("--rows-per-shard", type=int, default=1_000_000, metavar="N")
    movielens.add_argument("--overwrite", action="store_true", help="replace other data in DIR")
    movielens.set_defaults(func=_guarded(_movielens))

    info = commands.add_parser("info", help="summarize a data folder's manifest, or a folder of TorchRec npy files")
    info.add_argument("dir", metavar="DIR")
    info.add_argument("--json", action="store_true", help="print the whole manifest")
    info.set_defaults(func=_guarded(_info))
