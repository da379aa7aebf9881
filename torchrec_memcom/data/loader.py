"""Training batches from a data folder: `torchrec.datasets.utils.Batch` with a KJT of its features.

The features are the manifest's (Criteo's 13 dense and 26 one-id categorical ones by default);
a multi-hot feature holds a list of ids per row and comes out as a bag of that length.

Shuffling is two-level, the way large click logs are usually shuffled without holding them in
memory: every epoch the row groups of all shards (65,536 rows each) are permuted with a generator
seeded by (seed, epoch); in that order the rows are cut into `world_size` equal contiguous parts,
one per rank, so ranks read disjoint rows; each rank then reads its part a window of
`shuffle_window` rows at a time and permutes the rows within the window. All ranks get the same
number of batches, as DDP / DMP lock-step requires: with `drop_last` every batch is full and up to
world_size * batch_size - 1 rows sit out the epoch (different ones each epoch); without it every
row is read, ranks' parts are padded to equal size by wrapping around to the first rows (at most
world_size - 1 repeated rows, as torch's DistributedSampler does) and the last batch of every rank
has the same, smaller size.

With `prefetch > 0` batches are built that many ahead in a background thread (pyarrow decoding
and numpy copies release the GIL), so building the next batches overlaps a GPU step on the
current one; on CPU the thread competes with the step, so the default is 0. With `pin_memory`
(and an accelerator present) each batch is copied into page-locked memory, in that thread when
prefetching, so that the train pipeline's non-blocking host-to-device copy overlaps the step.
"""

import math
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import features_of, load_manifest
from .schema import LABEL_NAME
from .sources import PathLike

if TYPE_CHECKING:
    import torch
    from torchrec.datasets.utils import Batch


class CriteoParquetLoader:
    """Iterable of `Batch`: dense float32 [B, dense features], a KJT of the categorical features
    (one id each, multi-hot ones a bag each), labels float32 [B]; Criteo: [B, 13], cat_0..cat_25.

    Call `set_epoch(e)` before each epoch, as with torch's DistributedSampler: the order depends
    only on (seed, epoch, rank, world_size), never on how often the loader was iterated.

    Args:
        data_dir: a data folder of `memcom data convert|synth` (its ``manifest.json`` and shards).
        split: one of the folder's splits ("train", "val", "test").
        batch_size: rows per batch.
        rank: this rank's index, in ``[0, world_size)``.
        world_size: the ranks that read the split, each its own rows.
        seed: the seed of the shuffle.
        shuffle: whether to shuffle (row groups, then rows within a window).
        drop_last: every batch full (some rows sit out the epoch) or every row read (the last
            batch smaller, ranks padded by wrapping around).
        shuffle_window: rows permuted together.
        prefetch: batches built ahead in a background thread (0: none).
        pin_memory: copy each batch into page-locked memory (with an accelerator present).

    Example::

        loader = CriteoParquetLoader("runs/data/synthetic", "train", batch_size=512, rank=rank, world_size=world_size)
        for epoch in range(2):
            loader.set_epoch(epoch)
            for batch in loader:
                batch.dense_features.shape, batch.sparse_features.keys()  # [512, 13], cat_0..cat_25
    """

    def __init__(
        self,
        data_dir: PathLike,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        shuffle_window: int = 1 << 19,
        prefetch: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or shuffle_window < 1:
            raise ValueError("batch_size and shuffle_window must be positive")
        if prefetch < 0:
            raise ValueError("prefetch must be 0 (no background thread) or more batches")
        manifest = load_manifest(data_dir)
        if split not in manifest["splits"]:
            raise ValueError(f"{data_dir} has no split {split!r}; it has {sorted(manifest['splits'])}")
        self.data_dir, self.split, self.batch_size = Path(data_dir), split, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last, self.shuffle_window = shuffle, drop_last, shuffle_window
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.epoch = 0
        self.features = features_of(manifest)
        self.keys: List[str] = list(self.features.sparse)
        self._one_hot = [k for k in self.keys if k not in self.features.multi_hot]
        self._lengths_offsets: Dict[int, Tuple["torch.Tensor", "torch.Tensor"]] = {}
        self.num_embeddings: Dict[str, int] = {name: manifest["features"][name]["num_embeddings"] for name in self.keys}
        # Row groups of all shards, in file order: (path, row group, rows).
        self._blocks: List[Tuple[Path, int, int]] = []
        for shard in manifest["splits"][split]["shards"]:
            path = self.data_dir / shard["path"]
            metadata = pq.ParquetFile(path).metadata
            self._blocks += [(path, g, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups)]
        self.num_rows = sum(rows for _, _, rows in self._blocks)
        if drop_last:
            self.rows_per_rank = self.num_rows // world_size
            self.num_batches = self.rows_per_rank // batch_size
        else:
            self.rows_per_rank = math.ceil(self.num_rows / world_size)
            self.num_batches = math.ceil(self.rows_per_rank / batch_size)
        if self.num_batches == 0:
            raise ValueError(
                f"split {split!r} has {self.num_rows} rows: too few for one batch of {batch_size} "
                f"on each of {world_size} ranks (drop_last={drop_last})"
            )

    def __len__(self) -> int:
        """Batches per epoch on every rank."""
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pieces(self) -> List[Tuple[int, int, int]]:
        """This rank's rows this epoch as (block, first row, end row) slices, in reading order."""
        order = np.arange(len(self._blocks))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self._blocks))
        sizes = np.array([self._blocks[b][2] for b in order], dtype=np.int64)
        ends = np.cumsum(sizes)
        pieces = []
        position = self.rank * self.rows_per_rank
        end = position + self.rows_per_rank
        while position < end:  # wraps around to the first rows when parts are padded
            lo = position % self.num_rows
            hi = min(self.num_rows, lo + end - position)
            pieces += self._slice(order, ends, lo, hi)
            position += hi - lo
        return pieces

    @staticmethod
    def _slice(order: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> List[Tuple[int, int, int]]:
        """Rows [lo, hi) of the blocks concatenated in `order`, as (block, first, end) slices."""
        pieces = []
        k = int(np.searchsorted(ends, lo, side="right"))
        while lo < hi:
            block_start = int(ends[k - 1]) if k else 0
            stop = min(hi, int(ends[k]))
            pieces.append((int(order[k]), lo - block_start, stop - block_start))
            lo, k = stop, k + 1
        return pieces

    def _windows(self, pieces: List[Tuple[int, int, int]]) -> Iterator["_Rows"]:
        """The rows of each window of pieces."""
        window: List[pa.Table] = []
        rows = 0
        for k, (block, lo, hi) in enumerate(pieces):
            path, group, _ = self._blocks[block]
            window.append(pq.ParquetFile(path).read_row_group(group).slice(lo, hi - lo))
            rows += hi - lo
            if rows >= self.shuffle_window or k == len(pieces) - 1:
                table = pa.concat_tables(window)
                labels = table.column(LABEL_NAME).to_numpy().astype(np.float32)
                dense = np.empty((table.num_rows, len(self.features.dense)), dtype=np.float32)
                for j, name in enumerate(self.features.dense):
                    dense[:, j] = table.column(name).to_numpy()
                ids = np.empty((len(self._one_hot), table.num_rows), dtype=np.int64)
                for j, name in enumerate(self._one_hot):
                    ids[j] = table.column(name).to_numpy()
                bags = {}
                for name in self.features.multi_hot:
                    column = table.column(name).combine_chunks()
                    offsets = column.offsets.to_numpy().astype(np.int64)  # into the unsliced values
                    bags[name] = (offsets - offsets[0], column.flatten().to_numpy())
                yield _Rows(labels, dense, ids, bags)
                window, rows = [], 0

    def __iter__(self) -> Iterator["Batch"]:
        batches = self._batches()
        if self.pin_memory:
            import torch

            if torch.accelerator.is_available():  # pinning needs an accelerator; on CPU it is moot
                batches = (batch.pin_memory() for batch in batches)
        return _prefetched(batches, self.prefetch) if self.prefetch else batches

    def _batches(self) -> Iterator["Batch"]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, self.world_size])
        carry: Optional[_Rows] = None  # rows of the previous window that did not fill a batch
        emitted = 0
        for window in self._windows(self._pieces()):
            if carry is not None:
                window = carry.concat(window)
            n = len(window.labels)
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            full = n // self.batch_size * self.batch_size
            for s in range(0, full, self.batch_size):
                if emitted == self.num_batches:
                    return
                yield self._batch(window, order[s : s + self.batch_size])
                emitted += 1
            carry = window.take(order[full:])
        if emitted < self.num_batches and carry is not None and len(carry.labels):
            yield self._batch(carry, np.arange(len(carry.labels)))

    def _batch(self, window: "_Rows", rows: np.ndarray) -> "Batch":
        import torch
        from torchrec.datasets.utils import Batch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        n = len(rows)
        dense = torch.from_numpy(window.dense[rows])
        labels = torch.from_numpy(window.labels[rows])
        features = len(self.keys)
        if not window.bags:
            if n not in self._lengths_offsets:  # one id per feature and example: shared, read-only
                self._lengths_offsets[n] = (
                    torch.from_numpy(np.ones(features * n, dtype=np.int32)),
                    torch.from_numpy(np.arange(features * n + 1, dtype=np.int32)),
                )
            lengths, offsets = self._lengths_offsets[n]
            kjt = KeyedJaggedTensor(
                keys=self.keys,
                values=torch.from_numpy(window.ids[:, rows].reshape(-1)),
                lengths=lengths,
                offsets=offsets,
                stride=n,
                length_per_key=[n] * features,
                offset_per_key=[n * f for f in range(features + 1)],
            )
            return Batch(dense_features=dense, sparse_features=kjt, labels=labels)
        picked = window.take(rows)
        one_hot = dict(zip(self._one_hot, picked.ids))
        values: List[np.ndarray] = []
        bag_lengths: List[np.ndarray] = []
        for key in self.keys:
            if key in picked.bags:
                bag_offsets, ids = picked.bags[key]
                values.append(ids)
                bag_lengths.append(np.diff(bag_offsets))
            else:
                values.append(one_hot[key])
                bag_lengths.append(np.ones(n, dtype=np.int64))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys,
            values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
            lengths=torch.from_numpy(np.concatenate(bag_lengths).astype(np.int32)),
            stride=n,
        )
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels)


class _Rows:
    """Rows of a window: labels [n], dense [n, D], one-id features [F, n] and, per multi-hot
    feature, (offsets [n + 1], ids) of its bags."""

    def __init__(
        self, labels: np.ndarray, dense: np.ndarray, ids: np.ndarray, bags: Dict[str, Tuple[np.ndarray, np.ndarray]]
    ) -> None:
        self.labels, self.dense, self.ids, self.bags = labels, dense, ids, bags

    def take(self, rows: np.ndarray) -> "_Rows":
        bags = {}
        for name, (offsets, ids) in self.bags.items():
            starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
            new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(lengths, out=new_offsets[1:])
            # positions of the kept rows' ids: each bag's start, then consecutive
            positions = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
            bags[name] = (new_offsets, ids[positions])
        return _Rows(self.labels[rows], self.dense[rows], self.ids[:, rows], bags)

    def concat(self, other: "_Rows") -> "_Rows":
        bags = {}
        for name, (offsets, ids) in self.bags.items():
            other_offsets, other_ids = other.bags[name]
            bags[name] = (np.concatenate([offsets, other_offsets[1:] + offsets[-1]]), np.concatenate([ids, other_ids]))
        return _Rows(
            np.concatenate([self.labels, other.labels]),
            np.concatenate([self.dense, other.dense]),
            np.concatenate([self.ids, other.ids], axis=1),
            bags,
        )


def _prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """`items`, produced by a background thread at most `depth` ahead of the consumer.

    The producer's exceptions are re-raised in the consumer; when the consumer stops early (break,
    garbage collection) the producer is stopped and joined.
    """
    slots: "queue.Queue[Tuple[str, Any]]" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: Tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as error:  # handed to the consumer
            put(("error", error))

    thread = threading.Thread(target=produce, name="CriteoParquetLoader-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
