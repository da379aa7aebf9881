"""Criteo TSV (plain or compressed, one file or day files) -> Parquet shards, streaming.

Reading is pyarrow's streaming CSV reader with a bounded block size, writing is pyarrow's Parquet
writer, one row group at a time, so memory stays bounded whatever the input size. Shards are
fixed ranges of input lines (`rows_per_shard` lines, never spanning two files or two splits), so a
conversion is deterministic and a killed one resumes: the shards `.convert_state.json` records are
kept, the one in progress (or one renamed into place, always complete, but not yet recorded) is
redone, and `manifest.json` is written last.

With `workers > 1` the inputs' lines are counted first, so every shard is planned before any is
written (the same lines and names as one process), and a pool of spawned processes converts them;
with `part=(K, N)` one host converts its share of the inputs and `merge_parts=N` assembles the
parts. One process at a time writes a folder (`manifest.locked`).
"""

import contextlib
import functools
import heapq
import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from bisect import bisect_right
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import manifest as mf
from .parse import (
    FIELD_COUNT,
    REASONS,
    TOO_LONG,
    ParsedBatch,
    csv_reader_options,
    dense_transform,
    describe_bad_field,
    parse_batch,
    reason_of_column,
)
from .schema import CAT_NAMES, COLUMN_NAMES, INT_NAMES, PARQUET_SCHEMA, SPLITS, kaggle_split
from .shards import ShardFile, shard_name, temporary_files
from .sources import (
    CriteoReadError,
    PathLike,
    Source,
    count_lines,
    discover,
    is_compressed,
    line_index,
    open_at_line,
    open_stream,
)

DEFAULT_NUM_EMBEDDINGS = 100_000  # TorchRec's DLRM example default
DEFAULT_MIN_COUNT = 3  # TorchRec's FREQUENCY_THRESHOLD
_MAX_EXAMPLES = 20
MIN_BLOCK_SIZE = 4096


class CriteoFormatError(ValueError):
    """A malformed input line under `on_bad_line="error"`; names the file and 1-based line."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason} (use --on-bad-line skip to skip such lines)")
        self.path, self.line, self.reason = path, line, reason

    def __reduce__(self) -> Tuple[Any, Tuple[str, int, str]]:  # crosses from a worker process
        return type(self), (self.path, self.line, self.reason)


@dataclass(frozen=True)
class Segment:
    """Lines [first, last] (1-based; last None = to the end of the file) of one source go to `split`:
    how a split rule (kaggle, days, none) is applied to the input files.

    Args:
        source: the index of the input file in the conversion's ``Source`` list.
        split: "train", "val" or "test".
        first: the first line (1-based).
        last: the last line, inclusive (None: to the end of the file).

    Example::

        Segment(0, "val", 1, 500)  # lines 1 to 500 of the first input file are val rows
    """

    source: int
    split: str
    first: int
    last: Optional[int]


@dataclass
class _Lines:
    """What the reader consumed: rows with their line numbers, and dropped lines, up to `end`."""

    lines: np.ndarray  # int64 line number of each row of `batch`
    batch: Optional[pa.RecordBatch]
    parsed: Optional[ParsedBatch]
    dropped: List[Tuple[int, int, str]]  # (line, fields found, text) of lines with a wrong field count
    end: int  # every line <= end has been accounted for


def _open_csv(stream: pa.NativeFile, options: Tuple[Any, Any, Any]) -> Optional[pacsv.CSVStreamingReader]:
    """pyarrow's streaming reader, or None for an empty stream (an empty file has 0 rows).

    pyarrow refuses an empty stream with ArrowInvalid("Empty CSV file") and has no way to peek, so
    that one message is recognized; any other error propagates.
    """
    try:
        return pacsv.open_csv(stream, *options)
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            return None
        raise


def _read_lines(path: str, start_line: int, block_size: int, index: Any = None) -> Iterator[_Lines]:
    """Stream a file from `start_line`, numbering every row with its line (sources.py's rule).

    A line longer than pyarrow's block comes back as a dropped line with `found == -1`, and
    reading goes on at the next line. A read error (truncated or corrupt compressed data, I/O
    error) raises CriteoReadError naming the file and the last line read intact.
    """
    pending: List[Tuple[int, int, str]] = []  # the handler runs ahead of the batches
    first = start_line  # where the current stream starts

    def on_invalid(row: pacsv.InvalidRow) -> str:
        heapq.heappush(pending, (row.number + first - 1, row.actual_columns, row.text[:120]))
        return "skip"

    next_line = start_line
    while True:
        try:
            with open_stream(path) if first == 1 else open_at_line(path, first, index) as stream:
                reader = _open_csv(stream, csv_reader_options(block_size, on_invalid))
                for batch in reader if reader is not None else ():
                    if not batch.num_rows:
                        continue
                    end = next_line + batch.num_rows - 1
                    dropped = []
                    while pending and pending[0][0] <= end:
                        dropped.append(heapq.heappop(pending))
                        end += 1
                    lines = np.arange(next_line, end + 1, dtype=np.int64)
                    if dropped:
                        lines = lines[~np.isin(lines, [d[0] for d in dropped])]
                    yield _Lines(lines, batch, parse_batch(batch), dropped, end)
                    next_line = end + 1
            break
        except pa.ArrowInvalid as e:
            if "straddling object" not in str(e):
                raise CriteoReadError(path, next_line - 1, e) from e
            # pyarrow stops at a line longer than its block: the first line it has not accounted for.
            dropped = []
            while pending and pending[0][0] == next_line:
                dropped.append(heapq.heappop(pending))
                next_line += 1
            pending.clear()  # pyarrow parsed no further
            with open_at_line(path, next_line, index) as stream:
                head = stream.read(120).decode("utf-8", errors="replace")
            dropped.append((next_line, -1, head))
            yield _Lines(np.zeros(0, np.int64), None, None, dropped, next_line)
            next_line += 1
            first = next_line
        except (OSError, pa.ArrowException) as e:
            raise CriteoReadError(path, next_line - 1, e) from e
    dropped = sorted(pending)
    yield _Lines(np.zeros(0, np.int64), None, None, dropped, dropped[-1][0] if dropped else next_line - 1)


def _dropped_reason(found: int, text: str, block_size: int) -> Tuple[str, str]:
    """(skip reason, message) of a line the reader dropped (`found == -1`: longer than its block)."""
    if found < 0:
        return TOO_LONG, (
            f"line is longer than the reader's block of {block_size:,} bytes "
            f"(starts {text[:40]!r}); raise --block-size to read it"
        )
    return FIELD_COUNT, f"expected {len(COLUMN_NAMES)} tab-separated fields, found {found}: {text[:60]!r}"


class _IdCounter:
    """Exact occurrence counts of the raw ids of one feature; memory grows with distinct ids."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.uint64)
        self.counts = np.zeros(0, np.int64)
        self._pending: List[Tuple[np.ndarray, np.ndarray]] = [(self.keys, self.counts)]
        self._pending_size = 0

    def add(self, values: np.ndarray) -> None:
        keys, counts = np.unique(values, return_counts=True)
        self._pending.append((keys, counts))
        self._pending_size += len(keys)
        if self._pending_size > max(len(self.keys), 1 << 22):
            self.merge()

    def add_counts(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add counts already made (distinct `keys`, e.g. another worker's)."""
        self._pending.append((keys, counts))
        self._pending_size += len(keys)
        if self._pending_size > max(len(self.keys), 1 << 22):
            self.merge()

    def merge(self) -> None:
        keys = np.concatenate([k for k, _ in self._pending])
        counts = np.concatenate([c for _, c in self._pending])
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        if len(keys):
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
            keys, counts = keys[starts], np.add.reduceat(counts, starts)
        self.keys, self.counts = keys, counts
        self._pending, self._pending_size = [(self.keys, self.counts)], 0


class _Vocab:
    """Frequency-mode id map of one feature: raw ids kept, in id order (id i+1 <-> ids[i]); 0 = rare."""

    def __init__(self, by_id: np.ndarray) -> None:
        self.by_id = by_id
        order = np.argsort(by_id, kind="stable")
        self._sorted = by_id[order]
        self._ids = (order + 1).astype(np.int64)

    @classmethod
    def from_counts(cls, keys: np.ndarray, counts: np.ndarray, min_count: int) -> "_Vocab":
        keep = counts >= min_count
        keys, counts = keys[keep], counts[keep]
        return cls(keys[np.lexsort((keys, -counts))])  # most frequent first, ties by raw id

    @property
    def num_embeddings(self) -> int:
        return len(self.by_id) + 1

    def lookup(self, raw: np.ndarray) -> np.ndarray:
        if not len(self._sorted):
            return np.zeros(len(raw), np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, raw), len(self._sorted) - 1)
        return np.where(self._sorted[pos] == raw, self._ids[pos], 0)


class _ShardWriter:
    """The shard covering input lines [first, last] of one source, with its skip counts."""

    def __init__(self, out_dir: Path, split: str, index: int, source: int, first: int, last: int):
        self.file = ShardFile(out_dir, split, index)
        self.split, self.index, self.source, self.first, self.last = split, index, source, first, last
        self.skipped: Counter = Counter()
        self.examples: List[str] = []

    def skip(self, reason: str, where: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {detail}")

    def finish(self, last: int) -> Dict[str, Any]:
        """Close the file (renamed into place); the record that the state and manifest keep."""
        path = self.file.close()
        rows_read, rows_skipped = last - self.first + 1, sum(self.skipped.values())
        if rows_read != self.file.rows + rows_skipped:
            raise AssertionError(f"{path}: {rows_read} lines != {self.file.rows} + {rows_skipped}")
        return {
            "split": self.split,
            "index": self.index,
            "path": path,
            "source": self.source,
            "first": self.first,
            "last": last,
            "rows_read": rows_read,
            "rows_written": self.file.rows,
            "skipped": dict(self.skipped),
            "examples": self.examples,
        }


def _segments(
    sources: List[Source],
    split: str,
    train_days: Optional[Sequence[int]],
    val_days: Optional[Sequence[int]],
    test_days: Optional[Sequence[int]],
    lines_of: Any,
) -> Tuple[List[Segment], Dict[str, Any]]:
    """Which lines of which file go to which split, and the rule as recorded in the manifest."""
    if split == "auto":
        split = "kaggle" if len(sources) == 1 else "days"
    if split != "days" and (train_days is not None or val_days is not None or test_days is not None):
        raise ValueError("--train-days/--val-days/--test-days need the days split (--split days)")
    if split == "kaggle":
        if len(sources) != 1:
            raise ValueError(f"the kaggle split needs exactly one input file, got {len(sources)}")
        n = lines_of(0)
        ranges = kaggle_split(n)
        segs = [Segment(0, s, a + 1, b) for s, (a, b) in ranges.items() if b > a]
        rule: Dict[str, Any] = {"rule": "kaggle", "lines": n, **{s: list(r) for s, r in ranges.items()}}
    elif split == "none":
        segs = [Segment(i, "train", 1, None) for i in range(len(sources))]
        rule = {"rule": "none"}
    elif split == "days":
        days = [s.day for s in sources]
        val = list(val_days) if val_days is not None else days[-1:]
        test = list(test_days) if test_days is not None else days[-1:]
        train = list(train_days) if train_days is not None else [d for d in days if d not in val + test]
        unknown = sorted(set(train + val + test) - set(days))
        if unknown:
            raise ValueError(f"days {unknown} are not among the inputs (days {days})")
        clash = sorted(set(train) & set(val + test))
        if clash:
            raise ValueError(f"days {clash} are in train and in val/test")
        segs = []
        for i, src in enumerate(sources):
            if src.day in val and src.day in test:  # halves, as TorchRec does with the last day
                n = lines_of(i)
                segs += [Segment(i, "val", 1, (n + 1) // 2), Segment(i, "test", (n + 1) // 2 + 1, n)]
            else:
                name = "train" if src.day in train else "val" if src.day in val else "test" if src.day in test else None
                if name:
                    segs.append(Segment(i, name, 1, None))
        rule = {"rule": "days", "train_days": sorted(train), "val_days": sorted(val), "test_days": sorted(test)}
    else:
        raise ValueError(f"unknown split {split!r}: use auto, kaggle, days or none")
    segs = [s for s in segs if s.last is None or s.last >= s.first]
    # The last segment of a file runs to its end; a counted file is checked against its count.
    ends = {s.source: k for k, s in enumerate(segs)}
    segs = [Segment(s.source, s.split, s.first, None) if ends[s.source] == k else s for k, s in enumerate(segs)]
    return segs, rule


def _progress(total: Optional[int], initial: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=" rows", unit_scale=True, disable=not enabled)


def _first_bad(chunk: _Lines, in_scope: np.ndarray, block_size: int) -> Optional[Tuple[int, str]]:
    """(line, reason) of the first malformed line of `chunk` in scope (dropped lines all are)."""
    first: Optional[Tuple[int, str]] = None
    if chunk.parsed is not None:
        bad = np.flatnonzero((chunk.parsed.bad_column >= 0) & in_scope)
        if bad.size:
            row = int(bad[0])
            first = (int(chunk.lines[row]), describe_bad_field(chunk.batch, row, int(chunk.parsed.bad_column[row])))
    if chunk.dropped and (first is None or chunk.dropped[0][0] < first[0]):
        line, found, text = chunk.dropped[0]
        first = (line, _dropped_reason(found, text, block_size)[1])
    return first


def _count_raw_ids(
    path: str,
    spans: List[Tuple[int, int]],
    on_bad_line: str,
    block_size: int,
    counters: List["_IdCounter"],
    update: Any,
    index: Any = None,
) -> None:
    """Add the raw ids of lines in `spans` ([lo, hi] pairs, ascending) of `path` to `counters`."""
    start, stop = spans[0][0], spans[-1][1]
    for chunk in _read_lines(path, start, block_size, index):
        in_spans = np.zeros(len(chunk.lines), bool)
        for lo, hi in spans:
            in_spans |= (chunk.lines >= lo) & (chunk.lines <= hi)
        chunk.dropped = [d for d in chunk.dropped if any(lo <= d[0] <= hi for lo, hi in spans)]
        bad = _first_bad(chunk, in_spans, block_size) if on_bad_line == "error" else None
        if bad is not None:
            raise CriteoFormatError(path, *bad)
        if chunk.parsed is not None:
            keep = in_spans & (chunk.parsed.bad_column < 0)
            for counter, raw in zip(counters, chunk.parsed.cats):
                counter.add(raw[keep])
        update(int(in_spans.sum()))
        if chunk.end >= stop:
            break


def _table(parsed: ParsedBatch, map_ids: Any) -> pa.Table:
    dense = dense_transform(parsed.ints)
    columns = [pa.array(parsed.label)]
    columns += [pa.array(dense[j]) for j in range(len(INT_NAMES))]
    columns += [pa.array(map_ids(j, parsed.cats[j])) for j in range(len(CAT_NAMES))]
    return pa.Table.from_arrays(columns, schema=PARQUET_SCHEMA)


def _route_rows(shard: _ShardWriter, path: str, chunk: _Lines, table: pa.Table, a: int, b: int) -> None:
    assert chunk.parsed is not None
    ok = chunk.parsed.bad_column[a:b] < 0
    piece = table.slice(a, b - a)
    if not ok.all():
        piece = piece.filter(pa.array(ok))
        for row in np.flatnonzero(~ok) + a:
            column = int(chunk.parsed.bad_column[row])
            shard.skip(
                reason_of_column(column),
                f"{path}:{chunk.lines[row]}",
                describe_bad_field(chunk.batch, int(row), column),
            )
    if piece.num_rows:
        shard.file.write(piece)


def _convert_lines(
    path: str,
    start: int,
    stop: Optional[int],
    shard_at: Any,
    finished: Any,
    map_ids: Any,
    on_bad_line: str,
    block_size: int,
    update: Any,
    index: Any = None,
) -> int:
    """Convert lines `start`..`stop` (None: to the end) of `path` into the shards `shard_at(line)`
    opens (the one starting at `line`); `finished(record)` gets each closed one. The last line read.

    Under on_bad_line=error the shards before a bad line are finished, then CriteoFormatError.
    """
    end_line = stop if stop is not None else np.iinfo(np.int64).max
    shard: Optional[_ShardWriter] = None
    pos = start
    try:
        for chunk in _read_lines(path, start, block_size, index):
            chunk.dropped = [d for d in chunk.dropped if d[0] <= end_line]
            bad = _first_bad(chunk, chunk.lines <= end_line, block_size) if on_bad_line == "error" else None
            limit = min(chunk.end, end_line) if bad is None else bad[0] - 1  # finish what precedes it
            table = _table(chunk.parsed, map_ids) if chunk.parsed is not None else None
            dropped = iter(chunk.dropped)
            next_dropped = next(dropped, None)
            while pos <= limit:
                if shard is None:
                    shard = shard_at(pos)
                last = min(shard.last, limit)
                a, b = np.searchsorted(chunk.lines, [pos, last + 1])
                if b > a:
                    _route_rows(shard, path, chunk, table, int(a), int(b))
                while next_dropped is not None and next_dropped[0] <= last:
                    line, found, text = next_dropped
                    reason, message = _dropped_reason(found, text, block_size)
                    shard.skip(reason, f"{path}:{line}", message)
                    next_dropped = next(dropped, None)
                if last == shard.last:
                    finished(shard.finish(last))
                    shard = None
                update(last - pos + 1)
                pos = last + 1
            if bad is not None:
                raise CriteoFormatError(path, *bad)
            if pos > end_line:
                break
        if shard is not None:  # the file ended inside this shard
            finished(shard.finish(pos - 1))
            shard = None
    except BaseException:
        if shard is not None:
            shard.file.abort()
        raise
    return pos - 1


def _mod_map(sizes: List[int]) -> Any:
    moduli = [np.uint64(n) for n in sizes]

    def map_ids(feature: int, raw: np.ndarray) -> np.ndarray:
        return (raw % moduli[feature]).astype(np.int64)

    return map_ids


def _vocab_map(vocabs: List["_Vocab"]) -> Any:
    def map_ids(feature: int, raw: np.ndarray) -> np.ndarray:
        return vocabs[feature].lookup(raw)

    return map_ids


def _check_listed(out_dir: Path, record: Dict[str, Any]) -> Optional[str]:
    """Why the shard a state lists as finished is not there intact, or None."""
    if not record["path"]:
        return None
    try:
        rows = pq.ParquetFile(out_dir / record["path"]).metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        return str(e)
    return None if rows == record["rows_written"] else f"{rows} rows, not {record['rows_written']}"


class _Conversion:
    """One conversion into `out_dir`; its progress lives in `.convert_state.json`."""

    def __init__(
        self,
        out_dir: Path,
        sources: List[Source],
        config: Dict[str, Any],
        on_bad_line: str,
        block_size: int,
        progress: bool,
    ) -> None:
        self.out_dir, self.sources, self.config = out_dir, sources, config
        self.on_bad_line, self.block_size, self.progress = on_bad_line, block_size, progress
        state_path = out_dir / mf.STATE
        self.state: Dict[str, Any] = {
            "config": config,
            "line_counts": {},
            "line_index": {},
            "vocab": False,
            "shards": [],
            "sources_done": [],
            "counted": [],
            "planned": False,
        }
        if state_path.is_file():
            previous = json.loads(state_path.read_text())
            if previous.get("config") != config:
                raise ValueError(
                    f"{out_dir} holds an unfinished conversion with other inputs or options; "
                    "use another folder or --overwrite"
                )
            self.state.update(previous)
        for split in SPLITS:  # a shard in progress when the last run died is redone
            for tmp in temporary_files(out_dir, split):
                tmp.unlink()
        # A shard listed as finished but damaged (or gone) since is redone, with what follows it.
        for k, record in enumerate(self.state["shards"]):
            problem = _check_listed(out_dir, record)
            if problem is not None:
                print(
                    f"{out_dir / record['path']}: listed as finished but unreadable ({problem}); converting it again",
                    file=sys.stderr,
                )
                del self.state["shards"][k:]
                self.state["sources_done"] = [s for s in self.state["sources_done"] if s < record["source"]]
                break

    def save(self) -> None:
        mf.write_json_atomic(self.out_dir / mf.STATE, self.state)

    def lines_of(self, source: int) -> int:
        path = self.sources[source].path
        counts = self.state["line_counts"]
        if path not in counts:
            if self.progress:
                print(f"counting lines of {path} (needed for its split)", file=sys.stderr)
            counts[path] = count_lines(path)
            self.save()
        return counts[path]

    def save_vocabs(self, counters: Iterable["_IdCounter"], min_count: int) -> List["_Vocab"]:
        """Each feature's vocabulary from its counter (taken one at a time, in feature order),
        written beside the shards; the state records that they are."""
        (self.out_dir / mf.VOCAB).mkdir(parents=True, exist_ok=True)
        vocabs = []
        for name, counter in zip(CAT_NAMES, counters):
            counter.merge()
            vocab = _Vocab.from_counts(counter.keys, counter.counts, min_count)
            mf.write_atomic(self.out_dir / mf.VOCAB / f"{name}.npy", _npy_bytes(vocab.by_id))
            vocabs.append(vocab)
            del counter  # before a lazy `counters` makes the next one
        self.state["vocab"] = True
        self.save()
        return vocabs

    def load_vocabs(self) -> List["_Vocab"]:
        return [_Vocab(np.load(self.out_dir / mf.VOCAB / f"{n}.npy")) for n in CAT_NAMES]

    # -- one process -------------------------------------------------------------------------
    def build_vocab(self, segments: List[Segment], min_count: int) -> List[_Vocab]:
        """Frequency mode: count raw ids on the train split."""
        if self.state["vocab"]:
            return self.load_vocabs()
        counters = [_IdCounter() for _ in CAT_NAMES]
        train = [s for s in segments if s.split == "train"]
        bar = _progress(None, 0, "count ids", self.progress)
        for source in sorted({s.source for s in train}):
            spans = [
                (s.first, s.last if s.last is not None else np.iinfo(np.int64).max) for s in train if s.source == source
            ]
            _count_raw_ids(self.sources[source].path, spans, self.on_bad_line, self.block_size, counters, bar.update)
        bar.close()
        return self.save_vocabs(counters, min_count)

    def run(self, segments: List[Segment], map_ids: Any) -> None:
        done = self.state["shards"]
        next_index = Counter(r["split"] for r in done)
        counted = [self.state["line_counts"].get(self.sources[i].path) for i in {s.source for s in segments}]
        total = sum(counted) if None not in counted else None
        bar = _progress(total, sum(r["rows_read"] for r in done), "convert", self.progress)
        for source in sorted({s.source for s in segments}):
            if source in self.state["sources_done"]:
                continue
            segs = [s for s in segments if s.source == source]
            finished = max((r["last"] for r in done if r["source"] == source), default=0)
            self._convert_source(source, segs, finished + 1, next_index, map_ids, bar)
        bar.close()

    def _convert_source(
        self, source: int, segs: List[Segment], start: int, next_index: Counter, map_ids: Any, bar: Any
    ) -> None:
        path = self.sources[source].path
        firsts = [s.first for s in segs]

        def open_shard(line: int) -> _ShardWriter:
            seg = segs[bisect_right(firsts, line) - 1]
            rows = self.config["rows_per_shard"]
            lo = seg.first + (line - seg.first) // rows * rows
            hi = lo + rows - 1 if seg.last is None else min(lo + rows - 1, seg.last)
            index = next_index[seg.split]
            next_index[seg.split] += 1
            return _ShardWriter(self.out_dir, seg.split, index, source, lo, hi)

        def finished(record: Dict[str, Any]) -> None:
            self.state["shards"].append(record)
            self.save()

        last = _convert_lines(
            path, start, None, open_shard, finished, map_ids, self.on_bad_line, self.block_size, bar.update
        )
        counted = self.state["line_counts"].get(path)
        if counted is not None and counted != last:
            raise ValueError(f"{path}: read {last} lines but counted {counted}; did the file change?")
        self.state["sources_done"].append(source)
        self.save()

    # -- several processes: the shards planned from line counts, converted by a process pool ----
    def index_lines(self, pool: Any, sources: Any) -> None:
        """Count the lines of inputs `sources` (indices) and index where every `rows_per_shard`-th
        line starts."""
        every = self.config["rows_per_shard"]
        todo = [self.sources[i].path for i in sorted(sources) if self.sources[i].path not in self.state["line_index"]]
        if todo and self.progress:
            print(f"counting lines of {len(todo)} input file(s)", file=sys.stderr)
        for path, (lines, offsets) in zip(todo, pool.map(line_index, todo, [every] * len(todo))):
            self.state["line_counts"][path] = lines
            self.state["line_index"][path] = [every, offsets]
        self.save()

    def _task(self, source: int, id_map: Tuple[str, List[int]]) -> "_Task":
        path = self.sources[source].path
        every, offsets = self.state["line_index"][path]
        return _Task(str(self.out_dir), path, (every, offsets), self.on_bad_line, self.block_size, id_map)

    def _runs(self, plan: List["_Planned"], workers: int) -> List[List["_Planned"]]:
        """The plan cut into runs of contiguous shards of one file, each one worker's task: one shard
        for plain files (they seek), for compressed ones a share of the workers per file (each
        run decompresses the file up to its start)."""
        by_source: Dict[int, List[_Planned]] = {}
        for shard in plan:
            by_source.setdefault(shard.source, []).append(shard)
        compressed = [s for s in by_source if is_compressed(self.sources[s].path)]
        share = max(1, workers // max(1, len(compressed)))
        runs = []
        for source, shards in by_source.items():
            k = min(len(shards), share) if source in compressed else len(shards)
            cuts = [len(shards) * i // k for i in range(k + 1)]
            runs += [shards[a:b] for a, b in zip(cuts, cuts[1:])]
        return runs

    def count_parallel(self, pool: Any, plan: List["_Planned"], workers: int, min_count: int) -> List[_Vocab]:
        """Frequency mode: workers count raw ids of their runs of the train split; counts merged."""
        if self.state["vocab"]:
            return self.load_vocabs()
        folder = self.out_dir / mf.COUNTS
        folder.mkdir(exist_ok=True)
        runs = self._runs([s for s in plan if s.split == "train"], workers)
        names = [f"{run[0].source}-{run[0].first}.npz" for run in runs]
        todo = [(run, name) for run, name in zip(runs, names) if name not in self.state["counted"]]
        futures = [
            pool.submit(
                _count_run, self._task(run[0].source, ("raw", [])), [(run[0].first, run[-1].last)], str(folder / name)
            )
            for run, name in todo
        ]
        errors = []
        for (_run, name), future in zip(todo, futures):
            error = future.result()
            if error is None:
                self.state["counted"].append(name)
                self.save()
            else:
                errors.append(error)
        if errors:
            raise min(errors, key=self._position)

        def merged(j: int) -> _IdCounter:  # one feature's counts in memory at a time
            counter = _IdCounter()
            for part in names:
                with np.load(folder / part) as counts:
                    counter.add_counts(counts[f"keys_{j}"], counts[f"counts_{j}"])
            return counter

        vocabs = self.save_vocabs((merged(j) for j in range(len(CAT_NAMES))), min_count)
        shutil.rmtree(folder)
        return vocabs

    def _position(self, error: Exception) -> Tuple[float, float]:
        """Where an error was met (input order, line), so that the first one is reported."""
        order: Dict[Optional[str], int] = {s.path: i for i, s in enumerate(self.sources)}
        return (order.get(getattr(error, "path", None), math.inf), getattr(error, "line", math.inf))

    def convert_parallel(
        self, pool: Any, queue: Any, plan: List["_Planned"], workers: int, id_map: Tuple[str, List[int]]
    ) -> None:
        done = {(r["split"], r["index"]): r for r in self.state["shards"]}
        bar = _progress(
            sum(s.last - s.first + 1 for s in plan),
            sum(r["rows_read"] for r in done.values()),
            "convert",
            self.progress,
        )
        todo = []
        for run in self._runs(plan, workers):
            first = next((k for k, s in enumerate(run) if (s.split, s.index) not in done), None)
            if first is not None:
                todo.append(run[first:])
        pending = {pool.submit(_convert_run, self._task(run[0].source, id_map), run) for run in todo}
        errors = []

        def take(record: Dict[str, Any]) -> None:
            key = (record["split"], record["index"])
            if key not in done:
                bar.update(record["rows_read"])
            done[key] = record

        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            got = bool(finished)
            while True:  # shards finished inside runs still going: kept if this process is killed
                try:
                    take(queue.get_nowait())
                    got = True
                except Empty:
                    break
            for future in finished:
                records, error = future.result()
                for record in records:
                    take(record)
                if error is not None:
                    errors.append(error)
            if got:
                self.state["shards"] = sorted(done.values(), key=lambda r: (r["source"], r["first"]))
                self.save()
        bar.close()
        if errors:
            raise min(errors, key=self._position)


@dataclass(frozen=True)
class _Planned:
    """A shard known before reading: lines [first, last] of source `source`, `split/part-<index>`."""

    split: str
    index: int
    source: int
    first: int
    last: int


def _plan(segments: List[Segment], counts: List[int], rows_per_shard: int) -> List[_Planned]:
    """Every shard of the conversion, as one process would write them (same lines, same names)."""
    index: Counter = Counter()
    plan = []
    for seg in segments:
        last = seg.last if seg.last is not None else counts[seg.source]
        for lo in range(seg.first, last + 1, rows_per_shard):
            plan.append(_Planned(seg.split, index[seg.split], seg.source, lo, min(lo + rows_per_shard - 1, last)))
            index[seg.split] += 1
    return plan


@dataclass(frozen=True)
class _Task:
    """What a worker needs to read one input: its path and line index, the options, the id map
    (`("mod", sizes)`, `("frequency", [])`: the vocab in `out_dir`, or `("raw", [])`)."""

    out_dir: str
    path: str
    index: Tuple[int, List[int]]
    on_bad_line: str
    block_size: int
    id_map: Tuple[str, List[int]]


_QUEUE: Any = None  # in a worker: where finished shards are announced


def _init_worker(queue: Any) -> None:
    global _QUEUE
    _QUEUE = queue
    if sys.platform == "linux":  # a worker outliving a killed parent would race the resumed run's files
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no API in os
        if os.getppid() == 1:  # the parent died before the line above
            os._exit(1)


@functools.lru_cache(maxsize=1)
def _worker_vocabs(out_dir: str) -> List[_Vocab]:
    return [_Vocab(np.load(Path(out_dir) / mf.VOCAB / f"{n}.npy")) for n in CAT_NAMES]


def _convert_run(task: _Task, shards: List[_Planned]) -> Tuple[List[Dict[str, Any]], Optional[Exception]]:
    """In a worker: convert a run of planned shards; their records, and the error that stopped it."""
    records: List[Dict[str, Any]] = []
    starting = {s.first: s for s in shards}
    kind, sizes = task.id_map
    map_ids = _mod_map(sizes) if kind == "mod" else _vocab_map(_worker_vocabs(task.out_dir))

    def shard_at(line: int) -> _ShardWriter:
        s = starting[line]
        return _ShardWriter(Path(task.out_dir), s.split, s.index, s.source, s.first, s.last)

    def finished(record: Dict[str, Any]) -> None:
        records.append(record)
        if _QUEUE is not None:
            _QUEUE.put(record)

    try:
        last = _convert_lines(
            task.path,
            shards[0].first,
            shards[-1].last,
            shard_at,
            finished,
            map_ids,
            task.on_bad_line,
            task.block_size,
            lambda n: None,
            task.index,
        )
        if last != shards[-1].last:
            raise ValueError(f"{task.path}: read {last} lines but counted more; did the file change?")
    except (ValueError, OSError, EOFError) as error:
        return records, error
    return records, None


def _count_run(task: _Task, spans: List[Tuple[int, int]], out_file: str) -> Optional[Exception]:
    """In a worker: count the raw ids of lines `spans` of one input into `out_file` (.npz)."""
    counters = [_IdCounter() for _ in CAT_NAMES]
    try:
        _count_raw_ids(task.path, spans, task.on_bad_line, task.block_size, counters, lambda n: None, task.index)
    except (ValueError, OSError, EOFError) as error:
        return error
    arrays: Dict[str, Any] = {}  # Any: numpy's stubs type savez's **kwds as its bool option's type too
    for j, counter in enumerate(counters):
        counter.merge()
        arrays[f"keys_{j}"], arrays[f"counts_{j}"] = counter.keys, counter.counts
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    mf.write_atomic(Path(out_file), buf.getvalue())
    return None


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[Tuple[Any, Any]]:
    """`workers` spawned processes (no fork of a process holding pyarrow's threads) and the queue
    they announce finished shards on."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(queue,)) as pool:
        yield pool, queue


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _plain(obj: Any) -> Any:
    """`obj` as it reads back from JSON, so configs compare equal to stored ones."""
    return json.loads(json.dumps(obj))


def _fingerprint(sources: List[Source]) -> List[Dict[str, Any]]:
    out = []
    for src in sources:
        st = os.stat(src.path)
        out.append({"path": src.path, "day": src.day, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def convert(
    inputs: Union[PathLike, Sequence[PathLike]],
    out_dir: PathLike,
    *,
    mode: str = "mod",
    num_embeddings: Union[None, int, Sequence[int]] = None,
    min_count: int = DEFAULT_MIN_COUNT,
    split: str = "auto",
    train_days: Optional[Sequence[int]] = None,
    val_days: Optional[Sequence[int]] = None,
    test_days: Optional[Sequence[int]] = None,
    rows_per_shard: int = 1_000_000,
    on_bad_line: str = "error",
    block_size: int = 4 << 20,
    progress: bool = True,
    overwrite: bool = False,
    workers: int = 1,
    part: Optional[Tuple[int, int]] = None,
    merge_parts: int = 0,
    wait_s: float = 24 * 3600.0,
) -> Dict[str, Any]:
    """Convert Criteo TSV files into `out_dir/<split>/part-XXXXX.parquet` plus manifest and frequencies.

    inputs: a file (Kaggle `train.txt`, default split `kaggle`), several files or a folder of
        `day_N[.gz]` files (default split `days`: train on all days but the last, val and test
        the two halves of the last day). `split="none"` puts every row in train.
    mode: `mod` maps hex value v to `v % num_embeddings` (an int for all features or one per
        feature; default 100,000); `frequency` first counts the train split, then gives the ids
        seen at least `min_count` times ids 1..K by decreasing count and every other id 0.
    on_bad_line: `error` stops at the first malformed line, naming file and line; `skip` skips
        it and counts it in the manifest.
    workers: processes converting at once, over input files and line ranges of each file, each
        with the memory of one (`block_size`, one shard's row group, in frequency mode its id
        counts); the output is the same for any number. Needs a line-counting pass first.
    part: `(K, N)`: convert only inputs K, K + N, K + 2N, ... (one host's share of the days, mod
        mode) into `out_dir/.parts/K/`; then `merge_parts=N` (the last step, on one host) waits up
        to `wait_s` seconds for all N parts, moves their shards into place under the names one
        process gives them, counts ids and writes the manifest: the same folder as one process.
    Re-running on an unfinished `out_dir` resumes it (with any `workers`); on a finished one with the same inputs and
    options it returns the manifest without work. Returns the manifest.
    """
    if mode not in ("mod", "frequency"):
        raise ValueError(f"mode must be mod or frequency, not {mode!r}")
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be error or skip, not {on_bad_line!r}")
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be positive")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if block_size < MIN_BLOCK_SIZE:
        raise ValueError(
            f"block_size {block_size} is below {MIN_BLOCK_SIZE} bytes (a Criteo line is "
            "about 250); the default is 4 MiB"
        )
    if mode == "frequency" and num_embeddings is not None:
        raise ValueError("num_embeddings is for mod mode; frequency mode derives it from the counts")
    sizes: List[int] = []
    if mode == "mod":
        given = num_embeddings if num_embeddings is not None else DEFAULT_NUM_EMBEDDINGS
        sizes = [int(given)] * len(CAT_NAMES) if isinstance(given, int) else [int(x) for x in given]
        if len(sizes) != len(CAT_NAMES) or min(sizes) < 1:
            raise ValueError(f"num_embeddings needs {len(CAT_NAMES)} positive sizes or one int")
        _check_id_spaces(sizes)
    elif min_count < 1:
        raise ValueError("min_count must be at least 1")
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    sources = discover(inputs)
    out = Path(out_dir)
    config = _plain(
        {
            "version": 1,
            "sources": _fingerprint(sources),
            "mode": mode,
            "rows_per_shard": rows_per_shard,
            "split": split,
            "train_days": train_days and list(train_days),
            "val_days": val_days and list(val_days),
            "test_days": test_days and list(test_days),
            **({"num_embeddings": sizes} if mode == "mod" else {"min_count": min_count}),
        }
    )
    if part is not None or merge_parts:
        if mode == "frequency":
            raise ValueError(
                "--part/--merge-parts convert in mod mode only: frequency mode needs one id map "
                "over all days first (use --workers on one host)"
            )
        if part is not None and not 0 <= part[0] < part[1]:
            raise ValueError(f"--part {part[0]}/{part[1]}: expected K/N with 0 <= K < N")
    if merge_parts:
        return _merge_parts(
            out,
            sources,
            config,
            merge_parts,
            split,
            (train_days, val_days, test_days),
            on_bad_line,
            block_size,
            progress,
            workers,
            wait_s,
        )
    work = out if part is None else out / mf.PARTS / str(part[0])
    owned = set(range(len(sources))) if part is None else {i for i in range(len(sources)) if i % part[1] == part[0]}
    with mf.locked(work):
        if overwrite:
            mf.clear(work)
        done_file = work / (mf.MANIFEST if part is None else mf.PART)
        if done_file.is_file():
            existing = json.loads(done_file.read_text()) if part is not None else mf.load_manifest(out)
            if existing.get("config") == config:
                return existing
            raise ValueError(f"{work} already holds converted data from other inputs or options; use --overwrite")
        job = _Conversion(work, sources, config, on_bad_line, block_size, progress)

        def lines_of(source: int) -> int:  # another part's files are that part's to count
            return job.lines_of(source) if source in owned else 0

        def finish(segments: List[Segment], rule: Dict[str, Any], sizes: Dict[str, int], map_fn: Any) -> Dict[str, Any]:
            if part is None:
                return _write_manifest(job, segments, rule, sizes, min_count, map_fn)
            record = {
                "config": config,
                "part": list(part),
                "rule": rule,
                "shards": job.state["shards"],
                "line_counts": job.state["line_counts"],
            }
            mf.write_json_atomic(done_file, record)
            (work / mf.STATE).unlink()
            return record

        days = (train_days, val_days, test_days)
        if workers == 1 and not job.state["planned"]:
            segments, rule = _segments(sources, split, *days, lines_of)
            mine = [s for s in segments if s.source in owned]
            if mode == "mod":
                map_ids, sizes_by_name = _mod_map(sizes), dict(zip(CAT_NAMES, sizes))
            else:
                vocabs = job.build_vocab(mine, min_count)
                map_ids = _vocab_map(vocabs)
                sizes_by_name = {n: v.num_embeddings for n, v in zip(CAT_NAMES, vocabs)}
            job.run(mine, map_ids)
            return finish(segments, rule, sizes_by_name, map)
        job.state["planned"] = True  # resumed with any number of workers from now on
        with _pool(workers) as (pool, queue):
            job.index_lines(pool, owned)
            segments, rule = _segments(sources, split, *days, lines_of)
            mine = [s for s in segments if s.source in owned]
            plan = _plan(mine, [lines_of(i) for i in range(len(sources))], rows_per_shard)
            if mode == "mod":
                id_map: Tuple[str, List[int]] = ("mod", sizes)
                sizes_by_name = dict(zip(CAT_NAMES, sizes))
            else:
                vocabs = job.count_parallel(pool, plan, workers, min_count)
                id_map = ("frequency", [])
                sizes_by_name = {n: v.num_embeddings for n, v in zip(CAT_NAMES, vocabs)}
            job.convert_parallel(pool, queue, plan, workers, id_map)
            return finish(segments, rule, sizes_by_name, pool.map)


def _merge_parts(
    out: Path,
    sources: List[Source],
    config: Dict[str, Any],
    parts: int,
    split: str,
    days: Tuple[Any, Any, Any],
    on_bad_line: str,
    block_size: int,
    progress: bool,
    workers: int,
    wait_s: float,
) -> Dict[str, Any]:
    """The last step of a conversion in parts (one per host): wait for every part, move their
    shards into place under the names one process would give them, count ids, write the manifest."""
    with mf.locked(out):
        if (out / mf.MANIFEST).is_file():
            existing = mf.load_manifest(out)
            if existing.get("config") == config:
                return existing
            raise ValueError(f"{out} already holds converted data from other inputs or options; use --overwrite")
        deadline = time.monotonic() + wait_s
        records, counts = [], {}
        for k in range(parts):
            done = out / mf.PARTS / str(k) / mf.PART
            while not done.is_file():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{done}: part {k} of {parts} not finished after {wait_s:.0f} s")
                time.sleep(1.0)
            record = json.loads(done.read_text())
            if record["config"] != config or record["part"] != [k, parts]:
                raise ValueError(f"{done}: part {record['part']} of another conversion (other inputs or options)")
            records += [{**r, "part": k} for r in record["shards"]]
            counts.update(record["line_counts"])
        segments, rule = _segments(sources, split, *days, lambda i: counts[sources[i].path])
        index: Counter = Counter()
        merged = []
        for original in sorted(records, key=lambda r: (r["source"], r["first"])):  # one process's order
            r = {key: value for key, value in original.items() if key != "part"}
            r["index"] = index[r["split"]]
            index[r["split"]] += 1
            if r["path"]:
                r["path"] = shard_name(r["split"], r["index"])
                src, dest = out / mf.PARTS / str(original["part"]) / original["path"], out / r["path"]
                if src.is_file():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dest)
                elif not dest.is_file():  # else moved by a merge killed part-way
                    raise FileNotFoundError(f"{src}: listed by part {original['part']} but missing")
            merged.append(r)
        job = _Conversion(out, sources, config, on_bad_line, block_size, progress)
        job.state["shards"] = merged
        job.save()
        sizes = dict(zip(CAT_NAMES, config["num_embeddings"]))
        with _pool(workers) as (pool, _):
            manifest = _write_manifest(job, segments, rule, sizes, DEFAULT_MIN_COUNT, pool.map if workers > 1 else map)
        shutil.rmtree(out / mf.PARTS)
        return manifest


def _check_id_spaces(sizes: List[int]) -> None:
    """Refuse, before any work, id spaces whose frequency counts (8 bytes per id and split, one
    feature at a time) cannot fit in this machine's memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name, size in zip(CAT_NAMES, sizes):
        need = 8 * len(SPLITS) * size
        if size >= 1 << 63 or need > memory:
            raise ValueError(
                f"num_embeddings {size:,} ({name}) is too large: counting its ids needs "
                f"{need / 2**30:,.0f} GiB, this machine has {memory / 2**30:,.0f} GiB"
            )


def _write_manifest(
    job: _Conversion,
    segments: List[Segment],
    rule: Dict[str, Any],
    sizes_by_name: Dict[str, int],
    min_count: int,
    map_fn: Any,
) -> Dict[str, Any]:
    """Count ids (`map_fn` over features), write frequencies and the manifest, drop the state."""
    records = job.state["shards"]
    mode = job.config["mode"]
    skipped: Counter = Counter()
    for r in records:
        skipped.update(r["skipped"])
    shards = {
        s: [{"path": r["path"], "rows": r["rows_written"]} for r in records if r["split"] == s and r["path"]]
        for s in SPLITS
        if any(seg.split == s for seg in segments)
    }
    manifest = mf.finish(
        job.out_dir,
        shards,
        sizes_by_name,
        {
            "kind": "convert",
            "config": job.config,
            "mode": mode,
            **(
                {"min_count": min_count, "vocab": f"{mf.VOCAB}/<feature>.npy: raw id of id i+1 at index i; id 0 = rare"}
                if mode == "frequency"
                else {}
            ),
            "missing_categorical": "read as raw value 0, as TorchRec does: id 0 in mod mode; "
            "in frequency mode the id of raw 0 (0 if rare)",
            "sources": [{"path": s.path, "day": s.day} for s in job.sources],
            "split_rule": rule,
            "rows_read": sum(r["rows_read"] for r in records),
            "rows_written": sum(r["rows_written"] for r in records),
            "rows_skipped": sum(skipped.values()),
            "skipped_by_reason": {reason: skipped.get(reason, 0) for reason in REASONS},
            "skipped_examples": [e for r in records for e in r["examples"]][:_MAX_EXAMPLES],
            "on_bad_line": job.on_bad_line,
        },
        map_fn,
    )
    (job.out_dir / mf.STATE).unlink()
    return manifest
