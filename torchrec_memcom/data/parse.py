"""Vectorized parsing and validation of Criteo TSV record batches read by pyarrow's CSV reader.

Every column is read as raw bytes (empty field -> null) and checked with numpy on Arrow's buffers,
so no Python code runs per value. A field is valid when it is empty (missing) or:
label exactly `0` or `1` (never empty); integer `-?[0-9]+`, at most 18 characters; categorical
1 to 16 hex digits (Criteo writes 8). Malformed rows are reported, not fixed: the caller decides
between stopping and skipping.
"""

from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .schema import CAT_NAMES, COLUMN_NAMES, INT_NAMES

# Reasons a line is skipped, as counted in the manifest.
FIELD_COUNT = "field_count"
BAD_LABEL = "bad_label"
NON_INTEGER = "non_integer"
NON_HEX = "non_hex"
TOO_LONG = "too_long"  # longer than the reader's block size
REASONS = (FIELD_COUNT, BAD_LABEL, NON_INTEGER, NON_HEX, TOO_LONG)

_MAX_INT_CHARS = 18  # always fits int64
_MAX_HEX_DIGITS = 16  # always fits uint64

_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i


def csv_reader_options(
    block_size: int, invalid_row_handler: Callable[[pacsv.InvalidRow], str]
) -> Tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    """pyarrow CSV options for headerless Criteo TSV: 40 byte columns, no quoting.

    Empty lines are kept (they come back as rows whose label is missing, hence malformed) so that
    every physical line is either a row or an `invalid_row_handler` call, which keeps line numbers
    exact. The serial reader is used because only it tells the handler the line number (and on
    this data it is as fast as the threaded one).
    """
    read = pacsv.ReadOptions(column_names=COLUMN_NAMES, block_size=block_size, use_threads=False)
    parse = pacsv.ParseOptions(
        delimiter="\t",
        quote_char=False,
        double_quote=False,
        escape_char=False,
        newlines_in_values=False,
        ignore_empty_lines=False,
        invalid_row_handler=invalid_row_handler,
    )
    convert = pacsv.ConvertOptions(
        column_types={name: pa.binary() for name in COLUMN_NAMES},
        null_values=[""],
        strings_can_be_null=True,
        check_utf8=False,
    )
    return read, parse, convert


@dataclass
class ParsedBatch:
    """One record batch, parsed (``parse_batch``'s result). Values of malformed rows are meaningless:
    ``bad_column`` says which rows those are, so that the caller stops or skips them.

    Args:
        label: int8 ``[n]``.
        ints: int64 ``[13, n]``; missing -> 0.
        cats: uint64 ``[26, n]``; the raw hex value, missing -> 0 (as TorchRec: ``int("" or "0", 16)``).
        bad_column: int16 ``[n]``: the index in ``COLUMN_NAMES`` of the row's first malformed field,
            -1 if the row is valid.

    Example::

        parsed = parse_batch(record_batch)  # a batch of pyarrow's reader with csv_reader_options
        rows = parsed.bad_column == -1
        parsed.label[rows], parsed.cats[:, rows]
    """

    label: np.ndarray  # int8 [n]
    ints: np.ndarray  # int64 [13, n]; missing -> 0
    cats: np.ndarray  # uint64 [26, n]; raw hex value, missing -> 0 (as TorchRec: int("" or "0", 16))
    bad_column: np.ndarray  # int16 [n]: index in COLUMN_NAMES of the first malformed field, -1 if valid


def reason_of_column(column: int) -> str:
    """The skip reason for a malformed field in column `column` of COLUMN_NAMES."""
    if column == 0:
        return BAD_LABEL
    return NON_INTEGER if column <= len(INT_NAMES) else NON_HEX


def quote(raw: bytes, limit: int = 40) -> str:
    """`raw` quoted for a message, cut to `limit` bytes (a bad field may be megabytes long)."""
    if len(raw) <= limit:
        return repr(raw.decode("utf-8", errors="replace"))
    return f"{raw[:limit].decode('utf-8', errors='replace')!r}... ({len(raw):,} bytes)"


def describe_bad_field(batch: pa.RecordBatch, row: int, column: int) -> str:
    """Human-readable reason for a malformed field, quoting its value (cut short)."""
    raw = batch.column(column)[row].as_py()
    value = quote(b"" if raw is None else raw)
    name = COLUMN_NAMES[column]
    if column == 0:
        return f"label {value} is not 0 or 1"
    if column <= len(INT_NAMES):
        return f"{name} {value} is not an integer (at most {_MAX_INT_CHARS} characters)"
    return f"{name} {value} is not a hex id (1 to {_MAX_HEX_DIGITS} hex digits)"


def _buffers(arr: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """(offsets [n+1] int64, data bytes uint8) of a binary array, without copying the data."""
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets.astype(np.int64), data


def _parse_label(arr: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    offsets, data = _buffers(arr)
    lengths = np.diff(offsets)
    one_char = lengths == 1
    first = np.zeros(len(arr), dtype=np.uint8)
    first[one_char] = data[offsets[:-1][one_char]]
    label = first - np.uint8(ord("0"))  # wraps for non-digits
    bad = ~one_char | (label > 1)
    return label.astype(np.int8), bad


def _parse_int(arr: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    offsets, data = _buffers(arr)
    lengths = np.diff(offsets)
    chars = data[offsets[0] : offsets[-1]]
    is_digit = (chars - np.uint8(ord("0"))) < 10
    bad = lengths > _MAX_INT_CHARS
    if not is_digit.all():
        positions = np.flatnonzero(~is_digit) + offsets[0]
        rows = np.searchsorted(offsets, positions, side="right") - 1
        # A non-digit is allowed only as a leading '-' followed by at least one digit.
        allowed = (data[positions] == ord("-")) & (positions == offsets[rows]) & (lengths[rows] > 1)
        bad[rows[~allowed]] = True
    strings = arr.view(pa.string())
    if bad.any():
        strings = pc.if_else(pa.array(bad), pa.scalar(None, pa.string()), strings)
    values = pc.cast(strings, pa.int64()).fill_null(0).to_numpy()
    return values, bad


def _parse_hex(arr: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    offsets, data = _buffers(arr)
    lengths = np.diff(offsets)
    present = lengths > 0
    values = np.zeros(len(arr), dtype=np.uint64)
    bad = np.zeros(len(arr), dtype=bool)
    present_lengths = lengths[present]
    if present_lengths.size and (present_lengths == 8).all():
        # Criteo's case: every present id has 8 digits, so the bytes of the column form a
        # [k, 8] matrix (missing fields take no bytes). Two nibbles make a byte; 4 bytes a
        # big-endian uint32.
        nibbles = _HEX_LUT[data[offsets[0] : offsets[-1]].reshape(-1, 8)]
        pairs = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
        values[present] = np.ascontiguousarray(pairs).view(">u4").ravel()
        if nibbles.max() > 15:
            bad[present] = (nibbles > 15).any(axis=1)
    elif present_lengths.size:
        starts = offsets[:-1][present]
        acc = np.zeros(present_lengths.size, dtype=np.uint64)
        bad_present = present_lengths > _MAX_HEX_DIGITS
        for position in range(min(int(present_lengths.max()), _MAX_HEX_DIGITS)):
            has = present_lengths > position
            nibble = _HEX_LUT[data[starts[has] + position]]
            bad_present[has] |= nibble > 15
            acc[has] = (acc[has] << np.uint64(4)) | (nibble & 15).astype(np.uint64)
        values[present] = acc
        bad[present] = bad_present
    return values, bad


def parse_batch(batch: pa.RecordBatch) -> ParsedBatch:
    """Parse and validate the 40 byte columns of a batch from `csv_reader_options`."""
    n = batch.num_rows
    bad_column = np.full(n, -1, dtype=np.int16)

    def mark(column: int, bad: np.ndarray) -> None:
        np.copyto(bad_column, column, where=bad & (bad_column < 0))

    label, bad = _parse_label(batch.column(0))
    mark(0, bad)
    ints = np.empty((len(INT_NAMES), n), dtype=np.int64)
    for j in range(len(INT_NAMES)):
        ints[j], bad = _parse_int(batch.column(1 + j))
        mark(1 + j, bad)
    cats = np.empty((len(CAT_NAMES), n), dtype=np.uint64)
    for j in range(len(CAT_NAMES)):
        cats[j], bad = _parse_hex(batch.column(1 + len(INT_NAMES) + j))
        mark(1 + len(INT_NAMES) + j, bad)
    return ParsedBatch(label=label, ints=ints, cats=cats, bad_column=bad_column)


def dense_transform(ints: np.ndarray) -> np.ndarray:
    """log(max(x, 0) + 1) as float32: negatives clamped to 0 as TorchRec does, missing already 0."""
    return np.log1p(np.maximum(ints, 0).astype(np.float64)).astype(np.float32)
