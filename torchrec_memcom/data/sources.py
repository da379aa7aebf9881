r"""Input files of a conversion: discovery of day files, line counting and positioned reading.

Inputs are plain text or compressed (`.gz`; `.bz2`, `.zst`, `.lz4` work too, through pyarrow's
decompressing streams). Positions are 1-based line numbers, the numbers that error messages, the
split rules and resumed conversions use. One rule says where a line ends, pyarrow's CSV reader's
(and Python's `bytes.splitlines`): at `\n`, at `\r\n`, or at a lone `\r`. The line counter and the
resume offset follow it too, so every line the reader sees is counted and none is lost on resume.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa

PathLike = Union[str, "os.PathLike[str]"]

_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
# day_N, day_N.gz, day_N.tsv.gz ...: the data files of a day folder (not day_N.md5 and the like).
_DAY_RE = re.compile(r"^day_(\d+)((\.tsv|\.txt)?(\.gz|\.bz2|\.zst|\.lz4)?)$")
_CHUNK = 16 << 20


class CriteoReadError(ValueError):
    """An input file that cannot be read (truncated or corrupt compressed data, an I/O error).

    Names the file and the last line read intact (0: none), as bad-line errors do.
    """

    def __init__(self, path: str, line: int, error: Exception) -> None:
        where = f" past line {line:,}" if line else ""
        super().__init__(f"{path}: cannot be read{where}: {error}")
        self.path, self.line, self.error = path, line, error

    def __reduce__(self) -> Tuple[Any, Tuple[str, int, Exception]]:  # crosses from a worker process
        return type(self), (self.path, self.line, ValueError(str(self.error)))


@dataclass(frozen=True)
class Source:
    """One input file and its day number (from a `day_N` name, else its position in the list), the
    number the days split (`--train-days` ...) selects by.

    Args:
        path: the file's absolute path.
        day: its day number.

    Example::

        discover(["/data/criteo_1tb"])  # [Source(path="/data/criteo_1tb/day_0.gz", day=0), ...]
    """

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
    seen: dict = {}
    for p in paths:
        resolved = str(p.resolve())
        if resolved in seen:
            raise ValueError(f"{p}: the same input file is given twice (also as {seen[resolved]})")
        seen[resolved] = p
    matches = [_DAY_RE.match(p.name) for p in paths]
    if all(matches):
        numbered = sorted((int(m.group(1)), str(p.resolve())) for m, p in zip(matches, paths))  # type: ignore[union-attr]
        for (day, a), (next_day, b) in zip(numbered, numbered[1:]):
            if day == next_day:
                raise ValueError(f"day {day} is given twice: {a} and {b}")
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
        if hi < lo:
            raise ValueError(f"bad day spec {spec!r}: range {part} runs backwards; write {hi}-{lo}")
        days.extend(range(lo, hi + 1))
    return days


def is_compressed(path: str) -> bool:
    return path.endswith(_COMPRESSED_SUFFIXES)


def open_stream(path: str) -> pa.NativeFile:
    """The file's (decompressed) bytes as an Arrow input stream."""
    return pa.input_stream(path, compression="detect")


def _line_ends(stream: pa.NativeFile) -> Iterator[np.ndarray]:
    r"""Per chunk read, the stream offsets of the bytes that end a line (`\n`, or a `\r` not followed
    by `\n`); last, the offset of the last byte if the stream ends inside a line (else nothing)."""
    base, held_cr, last = 0, False, b"\n"
    while chunk := stream.read(_CHUNK):
        buf = np.frombuffer(chunk, dtype=np.uint8)
        ends = buf == ord("\n")
        cr = buf == ord("\r")
        cr[:-1] &= ~ends[1:]
        cr[-1] = False  # decided by the next chunk's first byte
        found = np.flatnonzero(ends | cr) + base
        if held_cr and buf[0] != ord("\n"):
            found = np.r_[base - 1, found]
        yield found
        held_cr, last = buf[-1] == ord("\r"), chunk[-1:]
        base += len(chunk)
    if held_cr:
        yield np.array([base - 1])
    yield np.array([base - 1] if last not in (b"\n", b"\r") else [], dtype=np.int64)


def line_index(path: str, every: int = 0) -> Tuple[int, List[int]]:
    """(number of lines, a last one without line end counting; with `every`, the stream offsets
    where lines 1, every + 1, 2 * every + 1, ... start), without parsing the lines."""
    lines, offsets = 0, [0] if every else []
    try:
        with open_stream(path) as stream:
            for ends in _line_ends(stream):
                if every:  # ends[i] ends line lines + i + 1; keep the ends of lines k * every
                    offsets += (ends[(-lines - 1) % every :: every] + 1).tolist()
                lines += len(ends)
    except OSError as e:
        raise CriteoReadError(path, lines, e) from e
    return lines, offsets


def count_lines(path: str) -> int:
    """Number of lines (a last line without line end counts) without parsing them."""
    return line_index(path)[0]


def _offset_of_line(path: str, line: int, from_line: int = 1, from_offset: int = 0) -> int:
    """Byte offset (in the decompressed stream) where line `line` (1-based) starts, scanning a
    plain file from `from_offset`, the known start of line `from_line`."""
    to_skip = line - from_line
    if not to_skip:
        return from_offset
    with open_stream(path) if not from_offset else pa.OSFile(path) as stream:
        if from_offset:
            stream.seek(from_offset)
        for ends in _line_ends(stream):
            if len(ends) >= to_skip:
                return int(ends[to_skip - 1]) + 1 + from_offset
            to_skip -= len(ends)
    raise EOFError(f"{path}: has fewer than {line} lines")


def open_at_line(path: str, line: int, index: Optional[Tuple[int, List[int]]] = None) -> pa.NativeFile:
    """A stream of the file positioned at the start of line `line` (1-based).

    Plain files seek (from the nearest line `index`, `(every, offsets)` of `line_index`, if
    given); compressed ones are decompressed up to that point (no parsing), which is what a
    resumed conversion or a worker starting inside the file pays.
    """
    from_line, from_offset = 1, 0
    if index is not None and not is_compressed(path):
        every, offsets = index
        k = min((line - 1) // every, len(offsets) - 1)
        from_line, from_offset = k * every + 1, offsets[k]
    offset = _offset_of_line(path, line, from_line, from_offset)
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
