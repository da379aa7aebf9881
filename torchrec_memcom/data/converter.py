"""Criteo TSV (plain or compressed, one file or day files) -> Parquet shards, streaming.

Reading is pyarrow's streaming CSV reader with a bounded block size, writing is pyarrow's Parquet
writer, one row group at a time, so memory stays bounded whatever the input size. Shards are
fixed ranges of input lines (`rows_per_shard` lines, never spanning two files or two splits), so a
conversion is deterministic and a killed one resumes: the shards `.convert_state.json` records are
kept, the one in progress (or one renamed into place, always complete, but not yet recorded) is
redone, and `manifest.json` is written last.
"""

import heapq
import io
import json
import os
import sys
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from . import manifest as mf
from .parse import (
    FIELD_COUNT,
    REASONS,
    ParsedBatch,
    csv_reader_options,
    dense_transform,
    describe_bad_field,
    parse_batch,
    reason_of_column,
)
from .schema import CAT_NAMES, COLUMN_NAMES, INT_NAMES, PARQUET_SCHEMA, SPLITS, kaggle_split
from .shards import ShardFile, temporary_files
from .sources import CriteoReadError, PathLike, Source, count_lines, discover, open_at_line, open_stream

DEFAULT_NUM_EMBEDDINGS = 100_000  # TorchRec's DLRM example default
DEFAULT_MIN_COUNT = 3  # TorchRec's FREQUENCY_THRESHOLD
_MAX_EXAMPLES = 20


class CriteoFormatError(ValueError):
    """A malformed input line under `on_bad_line="error"`; names the file and 1-based line."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason} (use --on-bad-line skip to skip such lines)")
        self.path, self.line, self.reason = path, line, reason


@dataclass(frozen=True)
class Segment:
    """Lines [first, last] (1-based; last None = to the end of the file) of one source go to `split`."""

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


def _read_lines(path: str, start_line: int, block_size: int) -> Iterator[_Lines]:
    """Stream a file from `start_line`, numbering every row with its physical line.

    A read error (truncated or corrupt compressed data, I/O error) raises CriteoReadError naming
    the file and the last line read intact.
    """
    pending: List[Tuple[int, int, str]] = []  # the handler runs ahead of the batches

    def on_invalid(row: pacsv.InvalidRow) -> str:
        heapq.heappush(pending, (row.number + start_line - 1, row.actual_columns, row.text[:120]))
        return "skip"

    next_line = start_line
    try:
        with open_stream(path) if start_line == 1 else open_at_line(path, start_line) as stream:
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
    except (OSError, pa.ArrowException) as e:
        raise CriteoReadError(path, next_line - 1, e) from e
    dropped = sorted(pending)
    yield _Lines(np.zeros(0, np.int64), None, None, dropped, dropped[-1][0] if dropped else next_line - 1)


def _field_count_reason(found: int, text: str) -> str:
    return f"expected {len(COLUMN_NAMES)} tab-separated fields, found {found}: {text[:60]!r}"


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
            "split": self.split, "index": self.index, "path": path, "source": self.source,
            "first": self.first, "last": last, "rows_read": rows_read,
            "rows_written": self.file.rows, "skipped": dict(self.skipped), "examples": self.examples,
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


class _Conversion:
    """One conversion into `out_dir`; its progress lives in `.convert_state.json`."""

    def __init__(self, out_dir: Path, sources: List[Source], config: Dict[str, Any], on_bad_line: str,
                 block_size: int, progress: bool) -> None:
        self.out_dir, self.sources, self.config = out_dir, sources, config
        self.on_bad_line, self.block_size, self.progress = on_bad_line, block_size, progress
        state_path = out_dir / mf.STATE
        self.state: Dict[str, Any] = {"config": config, "line_counts": {}, "vocab": False,
                                      "shards": [], "sources_done": []}
        if state_path.is_file():
            previous = json.loads(state_path.read_text())
            if previous.get("config") != config:
                raise ValueError(
                    f"{out_dir} holds an unfinished conversion with other inputs or options; "
                    "use another folder or --overwrite"
                )
            self.state = previous
        for split in SPLITS:  # a shard in progress when the last run died is redone
            for tmp in temporary_files(out_dir, split):
                tmp.unlink()

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

    def _first_bad(self, chunk: _Lines, in_scope: np.ndarray) -> Optional[Tuple[int, str]]:
        """Under on_bad_line=error, (line, reason) of the first malformed line of `chunk` in scope."""
        if self.on_bad_line != "error":
            return None
        first: Optional[Tuple[int, str]] = None
        if chunk.parsed is not None:
            bad = np.flatnonzero((chunk.parsed.bad_column >= 0) & in_scope)
            if bad.size:
                row = int(bad[0])
                first = (int(chunk.lines[row]),
                         describe_bad_field(chunk.batch, row, int(chunk.parsed.bad_column[row])))
        if chunk.dropped and (first is None or chunk.dropped[0][0] < first[0]):
            line, found, text = chunk.dropped[0]
            first = (line, _field_count_reason(found, text))
        return first

    # -- frequency mode: count raw ids on the train split -------------------------------------
    def build_vocab(self, segments: List[Segment], min_count: int) -> List[_Vocab]:
        if self.state["vocab"]:
            return [_Vocab(np.load(self.out_dir / mf.VOCAB / f"{n}.npy")) for n in CAT_NAMES]
        counters = [_IdCounter() for _ in CAT_NAMES]
        train = [s for s in segments if s.split == "train"]
        bar = _progress(None, 0, "count ids", self.progress)
        for source in sorted({s.source for s in train}):
            spans = [(s.first, s.last if s.last is not None else np.iinfo(np.int64).max)
                     for s in train if s.source == source]
            path = self.sources[source].path
            for chunk in _read_lines(path, 1, self.block_size):
                in_train = np.zeros(len(chunk.lines), bool)
                for lo, hi in spans:
                    in_train |= (chunk.lines >= lo) & (chunk.lines <= hi)
                chunk.dropped = [d for d in chunk.dropped if any(lo <= d[0] <= hi for lo, hi in spans)]
                bad = self._first_bad(chunk, in_train)
                if bad is not None:
                    raise CriteoFormatError(path, *bad)
                if chunk.parsed is not None:
                    keep = in_train & (chunk.parsed.bad_column < 0)
                    for counter, raw in zip(counters, chunk.parsed.cats):
                        counter.add(raw[keep])
                bar.update(int(in_train.sum()))
                if chunk.end >= max(hi for _, hi in spans):
                    break
        bar.close()
        (self.out_dir / mf.VOCAB).mkdir(parents=True, exist_ok=True)
        vocabs = []
        for name, counter in zip(CAT_NAMES, counters):
            counter.merge()
            vocab = _Vocab.from_counts(counter.keys, counter.counts, min_count)
            mf.write_atomic(self.out_dir / mf.VOCAB / f"{name}.npy", _npy_bytes(vocab.by_id))
            vocabs.append(vocab)
        self.state["vocab"] = True
        self.save()
        return vocabs

    # -- the conversion pass -----------------------------------------------------------------
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

    def _convert_source(self, source: int, segs: List[Segment], start: int, next_index: Counter,
                        map_ids: Any, bar: Any) -> None:
        path = self.sources[source].path
        firsts = [s.first for s in segs]
        shard: Optional[_ShardWriter] = None

        def open_shard(line: int) -> _ShardWriter:
            seg = segs[bisect_right(firsts, line) - 1]
            rows = self.config["rows_per_shard"]
            lo = seg.first + (line - seg.first) // rows * rows
            hi = lo + rows - 1 if seg.last is None else min(lo + rows - 1, seg.last)
            index = next_index[seg.split]
            next_index[seg.split] += 1
            return _ShardWriter(self.out_dir, seg.split, index, source, lo, hi)

        def close_shard(last: int) -> None:
            nonlocal shard
            assert shard is not None
            self.state["shards"].append(shard.finish(last))
            shard = None

        pos = start
        for chunk in _read_lines(path, start, self.block_size):
            bad = self._first_bad(chunk, np.ones(len(chunk.lines), bool))
            limit = chunk.end if bad is None else bad[0] - 1  # finish what precedes a bad line
            table = self._table(chunk, map_ids) if chunk.parsed is not None else None
            dropped = iter(chunk.dropped)
            next_dropped = next(dropped, None)
            while pos <= limit:
                if shard is None:
                    shard = open_shard(pos)
                stop = min(shard.last, limit)
                a, b = np.searchsorted(chunk.lines, [pos, stop + 1])
                if b > a:
                    self._route_rows(shard, path, chunk, table, int(a), int(b))
                while next_dropped is not None and next_dropped[0] <= stop:
                    line, found, text = next_dropped
                    shard.skip(FIELD_COUNT, f"{path}:{line}", _field_count_reason(found, text))
                    next_dropped = next(dropped, None)
                if stop == shard.last:
                    close_shard(stop)
                    self.save()
                bar.update(stop - pos + 1)
                pos = stop + 1
            if bad is not None:
                raise CriteoFormatError(path, *bad)
        if shard is not None:  # the file ended inside this shard
            close_shard(pos - 1)
        counted = self.state["line_counts"].get(path)
        if counted is not None and counted != pos - 1:
            raise ValueError(f"{path}: read {pos - 1} lines but counted {counted}; did the file change?")
        self.state["sources_done"].append(source)
        self.save()

    def _table(self, chunk: _Lines, map_ids: Any) -> pa.Table:
        parsed = chunk.parsed
        assert parsed is not None
        dense = dense_transform(parsed.ints)
        columns = [pa.array(parsed.label)]
        columns += [pa.array(dense[j]) for j in range(len(INT_NAMES))]
        columns += [pa.array(map_ids(j, parsed.cats[j])) for j in range(len(CAT_NAMES))]
        return pa.Table.from_arrays(columns, schema=PARQUET_SCHEMA)

    def _route_rows(self, shard: _ShardWriter, path: str, chunk: _Lines, table: pa.Table, a: int, b: int) -> None:
        assert chunk.parsed is not None
        bad_column = chunk.parsed.bad_column[a:b]
        ok = bad_column < 0
        piece = table.slice(a, b - a)
        if not ok.all():
            piece = piece.filter(pa.array(ok))
            for row in np.flatnonzero(~ok) + a:
                column = int(chunk.parsed.bad_column[row])
                shard.skip(reason_of_column(column), f"{path}:{chunk.lines[row]}",
                           describe_bad_field(chunk.batch, int(row), column))
        if piece.num_rows:
            shard.file.write(piece)


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
    Re-running on an unfinished `out_dir` resumes it; on a finished one with the same inputs and
    options it returns the manifest without work. Returns the manifest.
    """
    if mode not in ("mod", "frequency"):
        raise ValueError(f"mode must be mod or frequency, not {mode!r}")
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be error or skip, not {on_bad_line!r}")
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be positive")
    if mode == "frequency" and num_embeddings is not None:
        raise ValueError("num_embeddings is for mod mode; frequency mode derives it from the counts")
    sizes: List[int] = []
    if mode == "mod":
        given = num_embeddings if num_embeddings is not None else DEFAULT_NUM_EMBEDDINGS
        sizes = [int(given)] * len(CAT_NAMES) if isinstance(given, int) else [int(x) for x in given]
        if len(sizes) != len(CAT_NAMES) or min(sizes) < 1:
            raise ValueError(f"num_embeddings needs {len(CAT_NAMES)} positive sizes or one int")
    elif min_count < 1:
        raise ValueError("min_count must be at least 1")
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    sources = discover(inputs)
    out = Path(out_dir)
    config = _plain({
        "version": 1, "sources": _fingerprint(sources), "mode": mode, "rows_per_shard": rows_per_shard,
        "split": split, "train_days": train_days and list(train_days), "val_days": val_days and list(val_days),
        "test_days": test_days and list(test_days),
        **({"num_embeddings": sizes} if mode == "mod" else {"min_count": min_count}),
    })
    if overwrite:
        mf.clear(out)
    if (out / mf.MANIFEST).is_file():
        existing = mf.load_manifest(out)
        if existing.get("config") == config:
            return existing
        raise ValueError(f"{out} already holds converted data from other inputs or options; use --overwrite")
    out.mkdir(parents=True, exist_ok=True)

    job = _Conversion(out, sources, config, on_bad_line, block_size, progress)
    segments, rule = _segments(sources, split, train_days, val_days, test_days, job.lines_of)
    if mode == "mod":
        moduli = [np.uint64(n) for n in sizes]
        sizes_by_name = dict(zip(CAT_NAMES, sizes))

        def map_ids(feature: int, raw: np.ndarray) -> np.ndarray:
            return (raw % moduli[feature]).astype(np.int64)
    else:
        vocabs = job.build_vocab(segments, min_count)
        sizes_by_name = {n: v.num_embeddings for n, v in zip(CAT_NAMES, vocabs)}

        def map_ids(feature: int, raw: np.ndarray) -> np.ndarray:
            return vocabs[feature].lookup(raw)

    job.run(segments, map_ids)

    records = job.state["shards"]
    skipped: Counter = Counter()
    for r in records:
        skipped.update(r["skipped"])
    shards = {s: [{"path": r["path"], "rows": r["rows_written"]} for r in records if r["split"] == s and r["path"]]
              for s in SPLITS if any(seg.split == s for seg in segments)}
    manifest = mf.finish(out, shards, sizes_by_name, {
        "kind": "convert",
        "config": config,
        "mode": mode,
        **({"min_count": min_count, "vocab": f"{mf.VOCAB}/<feature>.npy: raw id of id i+1 at index i; id 0 = rare"}
           if mode == "frequency" else {}),
        "missing_categorical": "read as raw value 0, as TorchRec does: id 0 in mod mode; "
                               "in frequency mode the id of raw 0 (0 if rare)",
        "sources": [{"path": s.path, "day": s.day} for s in sources],
        "split_rule": rule,
        "rows_read": sum(r["rows_read"] for r in records),
        "rows_written": sum(r["rows_written"] for r in records),
        "rows_skipped": sum(skipped.values()),
        "skipped_by_reason": {reason: skipped.get(reason, 0) for reason in REASONS},
        "skipped_examples": [e for r in records for e in r["examples"]][:_MAX_EXAMPLES],
        "on_bad_line": on_bad_line,
    })
    (out / mf.STATE).unlink()
    return manifest
