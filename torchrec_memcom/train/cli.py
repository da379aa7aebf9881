"""`memcom train` and `memcom demo`."""

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

# The repository's configs/, beside the package of an editable install (install.sh's).
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train DLRM on Criteo data with compressed tables")
    train.add_argument("--config", required=True, help="YAML run config (see configs/)")
    train.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this machine")
    train.add_argument(
        "--allow-changes",
        action="store_true",
        help="resume a checkpoint trained with another config or data (refused by default)",
    )
    train.set_defaults(func=_train)
    demo = subparsers.add_parser(
        "demo", help="train DLRM uncompressed and with MEmCom on the synthetic default, side by side"
    )
    demo.add_argument("--nproc", type=int, default=2)
    demo.add_argument(
        "--configs",
        nargs="+",
        default=[
            str(REPO_CONFIGS / "synthetic_uncompressed.yaml"),
            str(REPO_CONFIGS / "synthetic_memcom.yaml"),
        ],
    )
    demo.add_argument("--steps", type=int, help="train this many steps (default: the configs' epochs)")
    demo.add_argument(
        "--rows", type=int, help="synthesize this many rows (default: the configs'), into a data folder of their own"
    )
    demo.add_argument("--out", help="folder for the runs and the --rows data (default: the configs' folders)")
    demo.set_defaults(func=_demo)


class JobFailed(Exception):
    """A rank failed or the job was stopped; ``code`` is the exit status to end with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def launch(config: str, nproc: int, allow_changes: bool = False, debug: bool = False) -> int:
    """Run the per-rank entry point on ``nproc`` local processes with torchrun's launcher, in this
    process: it forwards SIGTERM / SIGINT to every rank (which saves a checkpoint and stops).
    Returns 0, or raises ``JobFailed`` with the ranks' errors, each once, as its message."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from torchrec_memcom.train.config import load_config
    from torchrec_memcom.train.main import ERROR_FILE

    if nproc < 1:
        raise ValueError(f"--nproc: must be >= 1, got {nproc}")
    load_config(config)  # fail here, once, with a clear message rather than in every rank
    flags = [*(["--allow-changes"] if allow_changes else []), *(["--debug"] if debug else [])]
    args = parse_args(
        ["--standalone", f"--nproc_per_node={nproc}", "-m", "torchrec_memcom.train.main", "--config", config, *flags]
    )
    if not debug:  # torchrun's own records of a failure repeat what the ranks said
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as tmp:
        errors = Path(tmp) / "errors"
        os.environ[ERROR_FILE] = str(errors)
        try:
            run(args)
            return 0
        except ChildFailedError as e:
            codes = [f.exitcode for f in e.failures.values()]
            code = next((c for c in codes if c > 128), max(codes) if max(codes) > 0 else 1)
            raise JobFailed(_messages(errors) or f"a rank failed with exit code {codes}", code) from None
        except SignalException as e:
            raise JobFailed(_messages(errors) or f"stopped by {e.sigval.name}", 128 + e.sigval) from None
        finally:
            os.environ.pop(ERROR_FILE, None)


def _messages(errors: Path) -> str:
    """The ranks' one-line errors, each once, in the order they were written."""
    lines = errors.read_text().splitlines() if errors.exists() else []
    return "\n".join(dict.fromkeys(line for line in lines if line))


def _train(args: argparse.Namespace) -> int:
    return launch(args.config, args.nproc, args.allow_changes, getattr(args, "debug", False))


def _demo_config(path: str, args: argparse.Namespace) -> str:
    """``path``; or, with the demo's --steps/--rows/--out, a copy so changed in its run folder."""
    import yaml

    from torchrec_memcom.train.config import as_dict, load_config

    if args.steps is None and args.rows is None and args.out is None:
        return path
    config, name = load_config(path), Path(path).stem
    train, data = config.train, config.data
    if args.out is not None:
        train.run_dir = str(Path(args.out) / name)
        if train.checkpoint_dir:
            train.checkpoint_dir = str(Path(args.out) / name / "checkpoints")
    if args.steps is not None:
        train.steps = args.steps
    if args.rows is not None:
        if data.synthetic is None:
            raise ValueError(f"{path}: --rows needs synthetic data (a data.synthetic block)")
        folder = Path(args.out) / "data" if args.out is not None else Path(data.path).parent
        new_path = str(folder / f"{Path(data.path).name}_{args.rows}rows")
        params = config.embeddings.compression.params
        if params.get("frequencies") == data.path:  # budgeted tables rank ids on the same data
            params["frequencies"] = new_path
        data.path, data.synthetic.rows = new_path, args.rows
    out = Path(train.run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(as_dict(config), sort_keys=False))
    return str(out)  # launch() checks it (e.g. --steps 0 fails there, naming train.steps)


def _demo(args: argparse.Namespace) -> int:
    from torchrec_memcom.train.config import load_config

    rows = []
    for path in args.configs:
        config = _demo_config(path, args)
        print(f"== memcom train --config {config} --nproc {args.nproc}", flush=True)
        code = launch(config, args.nproc)
        if code:
            return code
        run_dir = Path(load_config(config).train.run_dir)
        rows.append((Path(path).stem, json.loads((run_dir / "results.json").read_text())))
    header = f"{'run':<28}{'AUC':>8}{'logloss':>9}{'emb. MiB':>10}{'ratio':>8}{'examples/s':>12}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in rows:
        print(
            f"{name:<28}{r['auc']:>8.4f}{r['logloss']:>9.4f}{r['embedding_bytes'] / 2**20:>10.2f}"
            f"{r['compression_ratio']:>7.1f}x{r['examples_per_s']:>12.0f}"
        )
    return 0
