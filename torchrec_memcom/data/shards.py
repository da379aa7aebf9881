"""Atomic Parquet shard files: `<split>/part-XXXXX.parquet`, written under a hidden temporary name.

The temporary name starts with a dot, which pyarrow datasets and the glob `part-*.parquet`
ignore, and it is renamed into place only once the file is closed: a killed writer never leaves a
readable half shard.
"""

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from .schema import PARQUET_SCHEMA

ROW_GROUP_ROWS = 65_536  # the loader's shuffling unit


def shard_name(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.parquet"


def temporary_files(out_dir: Path, split: str) -> List[Path]:
    return list((out_dir / split).glob(".part-*.parquet.tmp"))


class ShardFile:
    """Buffers tables into row groups of ROW_GROUP_ROWS rows; `close` renames the file into place,
    so that a killed writer leaves no readable half shard.

    Args:
        out_dir: the data folder.
        split: the split the shard belongs to (its subfolder).
        index: the shard's number (``part-XXXXX.parquet``).

    Example::

        shard = ShardFile(Path("runs/data/mine"), "train", 0)
        shard.write(table)  # a pyarrow Table of PARQUET_SCHEMA, any number of times
        shard.close()  # "train/part-00000.parquet" (None if it got no rows); abort() drops it
    """

    def __init__(self, out_dir: Path, split: str, index: int) -> None:
        self.rel = shard_name(split, index)
        self.path = out_dir / self.rel
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.rows = 0
        self._writer: Optional[pq.ParquetWriter] = None
        self._buffer: List[pa.Table] = []
        self._buffered = 0
        # Encoding and compressing a row group (GIL released) overlaps with parsing the next rows.
        self._encoder = ThreadPoolExecutor(max_workers=1)
        self._pending: Optional[Future] = None

    def write(self, table: pa.Table) -> None:
        self._buffer.append(table)
        self._buffered += table.num_rows
        self.rows += table.num_rows
        if self._buffered >= ROW_GROUP_ROWS:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self._buffer)
        full = table.num_rows if final else table.num_rows // ROW_GROUP_ROWS * ROW_GROUP_ROWS
        if full:
            if self._writer is None:
                self.tmp.parent.mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(self.tmp, PARQUET_SCHEMA, compression="zstd")
            self._wait()
            self._pending = self._encoder.submit(self._writer.write_table, table.slice(0, full), ROW_GROUP_ROWS)
        self._buffer = [table.slice(full)]
        self._buffered = table.num_rows - full

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def abort(self) -> None:
        """Drop the unfinished file (the run failed): no writer thread or open file outlives it."""
        try:
            self._wait()
        finally:
            self._encoder.shutdown()
            if self._writer is not None:
                self._writer.close()
            self.tmp.unlink(missing_ok=True)

    def close(self) -> Optional[str]:
        """Finish the file; its path relative to the data folder, or None if it got no rows."""
        if self._buffered:
            self._flush(final=True)
        self._wait()
        self._encoder.shutdown()
        if self._writer is None:
            return None
        self._writer.close()
        os.replace(self.tmp, self.path)
        return self.rel
