"""`memcom train` and `memcom demo`."""

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import List

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train DLRM on Criteo data with compressed tables")
    train.add_argument("--config", required=True, help="YAML run config (see configs/)")
    train.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this machine")
    train.set_defaults(func=_train)
    demo = subparsers.add_parser(
        "demo", help="train DLRM uncompressed and with MEmCom on the synthetic default, side by side"
    )
    demo.add_argument("--nproc", type=int, default=2)
    demo.add_argument("--configs", nargs="+", default=[
        str(REPO_CONFIGS / "synthetic_uncompressed.yaml"), str(REPO_CONFIGS / "synthetic_memcom.yaml"),
    ])
    demo.set_defaults(func=_demo)


def launch(config: str, nproc: int) -> int:
    """Run the per-rank entry point on ``nproc`` local processes with torchrun."""
    from torchrec_memcom.train.config import load_config

    load_config(config)  # fail here, once, with a clear message rather than in every rank
    cmd: List[str] = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc_per_node={nproc}", "-m", "torchrec_memcom.train.main", "--config", config]
    return subprocess.call(cmd)


def _train(args: argparse.Namespace) -> int:
    return launch(args.config, args.nproc)


def _demo(args: argparse.Namespace) -> int:
    from torchrec_memcom.train.config import load_config

    rows = []
    for config in args.configs:
        print(f"== memcom train --config {config} --nproc {args.nproc}", flush=True)
        code = launch(config, args.nproc)
        if code:
            return code
        run_dir = Path(load_config(config).train.run_dir)
        rows.append((Path(config).stem, json.loads((run_dir / "results.json").read_text())))
    header = f"{'run':<28}{'AUC':>8}{'logloss':>9}{'emb. MB':>10}{'ratio':>8}{'examples/s':>12}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in rows:
        print(f"{name:<28}{r['auc']:>8.4f}{r['logloss']:>9.4f}{r['embedding_bytes'] / 2**20:>10.2f}"
              f"{r['compression_ratio']:>7.1f}x{r['examples_per_s']:>12.0f}")
    return 0
