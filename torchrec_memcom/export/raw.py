"""Raw Criteo TSV lines -> the int64 tensors an exported model's ``score_raw`` takes.

The field rules are the data path's (docs/data.md): label ``0``/``1``, integers ``-?[0-9]+`` of
at most 18 characters, categorical values of 1 to 16 hex digits, any feature empty (missing, read
as 0). Lines may carry the label (40 fields, as train.txt) or not (39, as requests and test.txt).
Plain Python and torch: `examples/score_raw_criteo.py` repeats it for boxes without this package.
"""

import gzip
import io
import re
import sys
import zlib
from dataclasses import dataclass
from typing import IO, Iterable, Iterator, List, Optional, Tuple

import torch

NUM_INTS, NUM_CATS = 13, 26
_INT = re.compile(r"-?[0-9]+")
_HEX = re.compile(r"[0-9a-fA-F]{1,16}")
_MAX_INT_CHARS = 18
_QUOTE = 40  # characters of a bad value quoted in an error (a bad field may be megabytes long)


def _quote(text: str) -> str:
    return repr(text) if len(text) <= _QUOTE else f"{text[:_QUOTE]!r}... ({len(text):,} characters)"


class RawLineError(ValueError):
    """A malformed line; the message names the source and the 1-based line."""


@dataclass
class RawBatch:
    """Parsed lines: ``labels`` int64 ``[B]`` (None for unlabelled lines), ``ints`` int64
    ``[B, 13]``, ``cats`` int64 ``[B, 26]`` (hex values above 2**63 as their int64 bits): what
    ``score_raw`` takes.

    Args:
        labels: int64 ``[B]``, or None for unlabelled lines.
        ints: int64 ``[B, 13]``, the raw integer features (missing as 0).
        cats: int64 ``[B, 26]``, the raw categorical values (missing as 0).

    Example::

        for batch in read_batches("lines.tsv", batch_size=1024):
            model.score_raw(batch.ints, batch.cats)  # an exported model
    """

    labels: Optional[torch.Tensor]
    ints: torch.Tensor
    cats: torch.Tensor


def parse_line(line: str) -> Tuple[Optional[int], List[int], List[int]]:
    """(label or None, 13 integers, 26 categorical values) of one line; ValueError says what is wrong."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) == 1 + NUM_INTS + NUM_CATS:
        label_text, fields = fields[0], fields[1:]
        if label_text not in ("0", "1"):
            raise ValueError(f"label {_quote(label_text)} is not 0 or 1")
        label: Optional[int] = int(label_text)
    elif len(fields) == NUM_INTS + NUM_CATS:
        label = None
    else:
        raise ValueError(
            f"expected {1 + NUM_INTS + NUM_CATS} tab-separated fields (or {NUM_INTS + NUM_CATS} "
            f"without the label), found {len(fields)}: {line[:60]!r}"
        )
    ints = []
    for i, text in enumerate(fields[:NUM_INTS]):
        if text and (len(text) > _MAX_INT_CHARS or not _INT.fullmatch(text)):
            raise ValueError(f"int_{i} {_quote(text)} is not an integer (at most {_MAX_INT_CHARS} characters)")
        ints.append(int(text) if text else 0)
    cats = []
    for i, text in enumerate(fields[NUM_INTS:]):
        if text and not _HEX.fullmatch(text):
            raise ValueError(f"cat_{i} {_quote(text)} is not a hex id (1 to 16 hex digits)")
        value = int(text, 16) if text else 0
        cats.append(value - (1 << 64) if value >= 1 << 63 else value)
    return label, ints, cats


def parse_lines(
    lines: Iterable[str], source: str = "<input>", first_line: int = 1, labelled: Optional[bool] = None
) -> RawBatch:
    """Parse lines, all labelled or all not (``labelled``: which, if known from earlier lines);
    errors are ``RawLineError`` naming ``source:line``."""
    labels: List[Optional[int]] = []
    ints: List[List[int]] = []
    cats: List[List[int]] = []
    for number, line in enumerate(lines, first_line):
        try:
            line.encode("utf-8")  # read with surrogateescape: a non-UTF-8 byte is a lone surrogate
        except UnicodeEncodeError as e:
            byte = ord(line[e.start]) - 0xDC00
            raise RawLineError(
                f"{source}:{number}: not UTF-8 text (byte 0x{byte:02x} at character {e.start + 1})"
            ) from None
        try:
            label, i, c = parse_line(line)
        except ValueError as e:
            raise RawLineError(f"{source}:{number}: {e}") from None
        if labelled is None:
            labelled = label is not None
        if labelled != (label is not None):
            raise RawLineError(f"{source}:{number}: lines with and without a label column are mixed")
        labels.append(label)
        ints.append(i)
        cats.append(c)
    return RawBatch(
        torch.tensor(labels, dtype=torch.int64) if labelled else None,
        torch.tensor(ints, dtype=torch.int64).view(-1, NUM_INTS),
        torch.tensor(cats, dtype=torch.int64).view(-1, NUM_CATS),
    )


def _open(path: str) -> IO[str]:
    """UTF-8 text, line ends as the data path's (`\n`, `\r\n`, lone `\r`), bad bytes kept as
    surrogates so that the parser names their line."""
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape", newline="")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


def _lines(f: IO[str], source: str) -> Iterator[str]:
    """The lines of `f`, without a leading UTF-8 BOM (convert ignores it too); a file that cannot
    be read (a corrupt or truncated .gz) is a RawLineError naming it."""
    number = 0
    try:
        for number, line in enumerate(f, 1):
            yield line[1:] if number == 1 and line.startswith("\ufeff") else line
    except (OSError, EOFError, zlib.error) as e:
        raise RawLineError(f"{source}: cannot be read past line {number:,}: {e}") from None


def read_batches(path: str, batch_size: int) -> Iterator[RawBatch]:
    """Batches of ``batch_size`` lines of a TSV file (``.gz`` works; ``-`` is stdin)."""
    source = "<stdin>" if path == "-" else path
    f = _open(path)
    labelled: Optional[bool] = None
    try:
        chunk: List[str] = []
        first = 1
        for line in _lines(f, source):
            chunk.append(line)
            if len(chunk) == batch_size:
                batch = parse_lines(chunk, source, first, labelled)
                labelled = batch.labels is not None
                yield batch
                first += len(chunk)
                chunk = []
        if chunk:
            yield parse_lines(chunk, source, first, labelled)
    finally:
        if path != "-":
            f.close()
