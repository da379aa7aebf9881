"""Per-rank entry point: ``python -m torchrec_memcom.train.main --config FILE`` (torchrun runs it)."""

import argparse
import os
import sys
from typing import List, Optional

from torchrec_memcom.train.config import load_config
from torchrec_memcom.train.trainer import train


def run_rank(config: str) -> None:
    """Train this rank, then end the process without finalizing the interpreter.

    Gloo's worker threads free each finished collective (and the tensors it holds, which takes
    the GIL) on their own time; one still doing so when the interpreter finalizes is killed
    inside a C++ destructor and aborts the rank after a good run (pytorch/pytorch#179291: seen
    as "terminate called without an active exception", SIGABRT, under load). Everything the run
    writes is closed by then, so the rank flushes its streams and exits 0 at once.
    """
    train(load_config(config))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    run_rank(parser.parse_args(argv).config)


if __name__ == "__main__":
    main()
