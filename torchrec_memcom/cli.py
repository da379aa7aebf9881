"""The `memcom` console script: one entry point, one subcommand per module."""

import argparse
import importlib
from typing import List, Optional

# subcommand -> module whose `add_parser(subparsers)` adds it (a module may add several); those
# modules keep heavy imports inside their handlers so `memcom --help` stays quick.
SUBCOMMANDS = {
    "data": "torchrec_memcom.data.cli",
    "budget": "torchrec_memcom.budget.cli",
    "train": "torchrec_memcom.train.cli",
    "demo": "torchrec_memcom.train.cli",
    "export": "torchrec_memcom.export.cli",
    "score": "torchrec_memcom.export.cli",
    "bench": "torchrec_memcom.bench",
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="memcom", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(SUBCOMMANDS.values()):
        importlib.import_module(module).add_parser(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
