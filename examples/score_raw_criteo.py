"""Score raw Criteo lines with a model written by `memcom export`: plain torch, nothing else.

    python examples/score_raw_criteo.py model.pt lines.tsv      # or: ... model.pt < lines.tsv

Each line is Criteo TSV: an optional label, 13 integer features, 26 categorical values of 1 to 16
hex digits; an empty field is missing. Prints P(click) of every line, one per line. The model
itself applies what training depends on (log transform, the data folder's id mapping) in
`score_raw`, so this script needs neither torchrec nor this package: copy it into your app.
"""

import re
import sys
import warnings
from typing import List, Tuple

import torch

INT = re.compile(r"-?[0-9]+")
HEX = re.compile(r"[0-9a-fA-F]{1,16}")


def parse(line: str, where: str) -> Tuple[List[int], List[int]]:
    """13 integers and 26 categorical values (missing: 0) of one line; ValueError naming `where`."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) not in (39, 40):
        raise ValueError(f"{where}: expected 40 tab-separated fields (39 without the label), found {len(fields)}")
    if len(fields) == 40:
        if fields[0] not in ("0", "1"):
            raise ValueError(f"{where}: label {fields[0]!r} is not 0 or 1")
        fields = fields[1:]
    ints, cats = [], []
    for i, text in enumerate(fields[:13]):
        if text and (len(text) > 18 or not INT.fullmatch(text)):
            raise ValueError(f"{where}: int_{i} {text!r} is not an integer (at most 18 characters)")
        ints.append(int(text or 0))
    for i, text in enumerate(fields[13:]):
        if text and not HEX.fullmatch(text):
            raise ValueError(f"{where}: cat_{i} {text!r} is not a hex id (1 to 16 hex digits)")
        value = int(text or "0", 16)
        cats.append(value - (1 << 64) if value >= 1 << 63 else value)  # int64 bits of a uint64
    return ints, cats


def score(model: torch.jit.ScriptModule, lines: List[str], source: str, first: int) -> List[float]:
    """P(click) of each line; `first` is the line number of lines[0] (for errors)."""
    parsed = [parse(line, f"{source}:{first + i}") for i, line in enumerate(lines)]
    ints = torch.tensor([p[0] for p in parsed], dtype=torch.int64).view(-1, 13)
    cats = torch.tensor([p[1] for p in parsed], dtype=torch.int64).view(-1, 26)
    with torch.no_grad():
        return model.score_raw(ints, cats).tolist()


def main(argv: List[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    with warnings.catch_warnings():  # torch 2.13 marks TorchScript deprecated; it still loads
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(argv[1], map_location="cpu")
    source = argv[2] if len(argv) == 3 else "<stdin>"
    f = open(source) if len(argv) == 3 else sys.stdin
    batch: List[str] = []
    first = 1
    try:
        for line in f:
            batch.append(line)
            if len(batch) == 512:
                print("\n".join(f"{p:.6f}" for p in score(model, batch, source, first)))
                first, batch = first + len(batch), []
        if batch:
            print("\n".join(f"{p:.6f}" for p in score(model, batch, source, first)))
    except (ValueError, RuntimeError) as e:  # a bad line, or a model that refuses (e.g. no id map)
        print(f"error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
