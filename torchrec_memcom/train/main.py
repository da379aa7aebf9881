"""Per-rank entry point: ``python -m torchrec_memcom.train.main --config FILE`` (torchrun runs it)."""

import argparse
import os
import sys
import traceback
from typing import List, Optional

from torch.distributed.checkpoint.api import CheckpointException

# Where a rank reports its one-line error for `memcom train` to print once (set by the launcher);
# without it (torchrun or torchx started the rank) the rank prints it to stderr.
ERROR_FILE = "MEMCOM_ERROR_FILE"
# Failures a user can act on, reported as one line: bad config, data, checkpoint or resume,
# divergence (ValueError and RuntimeError subclasses), files, and DCP's CheckpointException,
# which derives from BaseException.
EXPECTED = (ValueError, RuntimeError, OSError, CheckpointException)


def run_rank(config: str, allow_changes: bool = False, debug: bool = False) -> None:
    """Train this rank, then end the process without finalizing the interpreter.

    Gloo's worker threads free each finished collective (and the tensors it holds, which takes
    the GIL) on their own time; one still doing so when the interpreter finalizes is killed
    inside a C++ destructor and aborts the rank after a good run (pytorch/pytorch#179291: seen
    as "terminate called without an active exception", SIGABRT, under load). Everything the run
    writes is closed by then, so the rank flushes its streams and exits at once: 0, 1 after an
    expected failure (one line, the traceback with ``debug``), 128 + N after signal N.
    """
    from torchrec_memcom.train.config import load_config
    from torchrec_memcom.train.trainer import Stopped, train

    code = 0
    try:
        train(load_config(config), allow_changes=allow_changes)
    except Stopped as e:
        code = e.code
        _report(str(e))
    except EXPECTED as e:
        code = 1
        if debug:
            traceback.print_exc()
        _report(f"{type(e).__name__}: {e}" if isinstance(e, CheckpointException) else str(e))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report(message: str) -> None:
    line = " ".join(message.split()) + "\n"
    path = os.environ.get(ERROR_FILE)
    if path:
        with open(path, "a") as f:  # one short append per rank: whole lines
            f.write(line)
    else:
        sys.stderr.write(f"memcom train: rank {os.environ.get('RANK', 0)}: {line}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--allow-changes", action="store_true", help="resume a checkpoint trained with another config or data"
    )
    parser.add_argument("--debug", action="store_true", help="print tracebacks of expected failures")
    args = parser.parse_args(argv)
    run_rank(args.config, args.allow_changes, args.debug)


if __name__ == "__main__":
    main()
