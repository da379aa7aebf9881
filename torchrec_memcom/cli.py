"""The `memcom` console script: one entry point, one subcommand per module."""

import argparse
import importlib
from typing import List, Optional

# subcommand -> module with `add_parser(subparsers)`; imported lazily so `memcom data` never
# pays for importing the training stack.
SUBCOMMANDS = {
    "data": "torchrec_memcom.data.cli",
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="memcom", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(module).add_parser(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
