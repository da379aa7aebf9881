"""The `memcom` console script: one entry point, one subcommand per module."""

import argparse
import importlib
import sys
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
DEBUG_HELP = "print the traceback of an expected failure too (default: one line)"


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on every (sub)command, so that it goes anywhere on the command line."""
    for action in parser._actions:  # private: argparse lists a parser's subcommands nowhere else
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
                _add_debug(sub)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="memcom", description=__doc__)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(SUBCOMMANDS.values()):
        importlib.import_module(module).add_parser(subparsers)
    _add_debug(parser)
    args = parser.parse_args(argv)
    from torch.distributed.checkpoint.api import CheckpointException

    from torchrec_memcom.train.cli import JobFailed

    try:
        return int(args.func(args) or 0)
    except JobFailed as e:  # the ranks' own one-line errors, each once
        for line in str(e).splitlines():
            print(f"memcom {args.command}: {'' if e.code > 128 else 'error: '}{line}", file=sys.stderr)
        return e.code
    except (ValueError, OSError, CheckpointException) as e:  # DCP's derives from BaseException
        if args.debug:
            raise
        print(f"memcom {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
