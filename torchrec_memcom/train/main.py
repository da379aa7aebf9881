"""Per-rank entry point: ``python -m torchrec_memcom.train.main --config FILE`` (torchrun runs it)."""

import argparse

from torchrec_memcom.train.config import load_config
from torchrec_memcom.train.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    train(load_config(args.config))


if __name__ == "__main__":
    main()
