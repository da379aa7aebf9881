"""Input files of a conversion: discovery of day files, line counting and positioned reading.

Inputs are plain text or compressed (`.gz`; `.bz2`, `.zst`, `.lz4` work too, through pyarrow's
decompressing streams). Positions are physical 1-based line numbers, the numbers that error
messages and the split rules use.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Union

import numpy as np
import pyarrow as pa

PathLike = Union[str, "os.PathLike[str]"]

_DAY_RE = re.compile(r"^day_(\d+)(\..+)?$")
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
_CHUNK = 16 << 20


class CriteoReadError(ValueError):
    """An input file that cannot be read (truncated or corrupt compressed data, an I/O error).

    Names the file and the last line read intact (0: none), as bad-line errors do.
    """

    def __init__(self, path: str, line: int, error: Exception) -> None:
        where = f" past line {line:,}" if line else ""
        super().__init__(f"{path}: cannot be read{where}: {error}")
        self.path, self.line = path, line


@dataclass(frozen=True)
class Source:
    """One input file and its day number (from a `day_N` name, else its position in the list)."""

    path: str
    day: int


def discover(inputs: Sequence[PathLike]) -> List[Source]:
    """Expand folders into their `day_N[.ext]` files and number the days.

    When every file is named `day_N...`, files are ordered and numbered by N (Terabyte click
    logs); otherwise they keep the given order and are numbered 0, 1, ... by position.
    """
    paths: List[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            days = [p for p in item.iterdir() if p.is_file() and _DAY_RE.match(p.name)]
            if not days:
                raise FileNotFoundError(f"{item}: folder has no day_N files (day_0, day_1.gz, ...)")
            paths.extend(days)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    matches = [_DAY_RE.match(p.name) for p in paths]
    if all(matches):
        numbered = sorted((int(m.group(1)), str(p.resolve())) for m, p in zip(matches, paths))  # type: ignore[union-attr]
        days_seen = [d for d, _ in numbered]
        if len(set(days_seen)) != len(days_seen):
            raise ValueError(f"the same day number is given twice: {days_seen}")
        return [Source(path=p, day=d) for d, p in numbered]
    return [Source(path=str(p.resolve()), day=i) for i, p in enumerate(paths)]


def parse_days(spec: str) -> List[int]:
    """Day numbers from a spec like `0-22`, `23` or `0,2,5-7`; an empty spec means no days."""
    days: List[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, _, last = part.partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"bad day spec {spec!r}: use e.g. 0-22, 23 or 0,2,5-7") from None
        days.extend(range(lo, hi + 1))
    return days


def is_compressed(path: str) -> bool:
    return path.endswith(_COMPRESSED_SUFFIXES)


def open_stream(path: str) -> pa.NativeFile:
    """The file's (decompressed) bytes as an Arrow input stream."""
    return pa.input_stream(path, compression="detect")


def count_lines(path: str) -> int:
    """Number of physical lines (a last line without newline counts) without parsing them."""
    lines, last = 0, b"\n"
    try:
        with open_stream(path) as stream:
            while chunk := stream.read(_CHUNK):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
    except OSError as e:
        raise CriteoReadError(path, lines, e) from e
    return lines + (last != b"\n")


def _offset_of_line(path: str, line: int) -> int:
    """Byte offset (in the decompressed stream) where physical line `line` (1-based) starts."""
    to_skip, offset = line - 1, 0
    with open_stream(path) as stream:
        while to_skip:
            chunk = stream.read(_CHUNK)
            if not chunk:
                raise EOFError(f"{path}: has fewer than {line} lines")
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n"))
            if len(newlines) >= to_skip:
                return offset + int(newlines[to_skip - 1]) + 1
            to_skip -= len(newlines)
            offset += len(chunk)
    return offset


def open_at_line(path: str, line: int) -> pa.NativeFile:
    """A stream of the file positioned at the start of physical line `line` (1-based).

    Plain files seek; compressed ones are decompressed up to that point (no parsing), which is
    what a resumed conversion pays to skip its finished shards.
    """
    offset = _offset_of_line(path, line)
    if not is_compressed(path):
        stream = pa.OSFile(path)
        stream.seek(offset)
        return stream
    stream = open_stream(path)
    while offset:
        skipped = len(stream.read(min(offset, _CHUNK)))
        if not skipped:
            raise EOFError(f"{path}: shorter than when its lines were counted")
        offset -= skipped
    return stream
