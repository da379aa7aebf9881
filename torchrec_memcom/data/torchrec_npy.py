"""TorchRec's preprocessed Criteo format: `day_N_dense.npy`, `day_N_sparse.npy`, `day_N_labels.npy`.

These are the files `torchrec.datasets.criteo.BinaryCriteoUtils.tsv_to_npys` (and TorchRec's
`npy_preproc_criteo.py` script) write and the DLRM example reads with
`--in_memory_binary_criteo_path`: dense float32 `[n, 13]` (already `log(x - min + 2)`), sparse
int64 `[n, 26]` raw hex values, labels int32 `[n, 1]`. Reading them is TorchRec's own
`InMemoryBinaryCriteoIterDataPipe`, memory-mapped, ids hashed modulo `num_embeddings` per batch,
as the DLRM example does; the days split as for Terabyte: train on every day but the last, val and
test the two halves of the last day (TorchRec's rule, the first half the larger).
"""

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Sequence

import numpy as np

from .schema import CAT_NAMES, INT_NAMES
from .sources import PathLike

if TYPE_CHECKING:
    from torchrec.datasets.utils import Batch

KINDS = ("dense", "sparse", "labels")
_FILE_RE = re.compile(r"^day_(\d+)_(dense|sparse|labels)\.npy$")
# Shapes and dtypes as BinaryCriteoUtils.tsv_to_npys writes them (sparse: any integer type).
_COLUMNS = {"dense": len(INT_NAMES), "sparse": len(CAT_NAMES), "labels": 1}


def npy_days(folder: PathLike) -> List[int]:
    """The day numbers of a folder of TorchRec npy files, each day's three files checked (shapes,
    dtypes, equal rows) from their headers only; errors name the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such folder (data.format torchrec_npy wants a folder of "
            "day_N_dense.npy, day_N_sparse.npy, day_N_labels.npy)"
        )
    found: Dict[int, set] = {}
    for p in folder.iterdir():
        m = _FILE_RE.match(p.name)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    if not found:
        raise FileNotFoundError(f"{folder}: no day_N_dense.npy / day_N_sparse.npy / day_N_labels.npy files")
    for day, kinds in sorted(found.items()):
        missing = [k for k in KINDS if k not in kinds]
        if missing:
            raise FileNotFoundError(
                f"{folder / f'day_{day}_{missing[0]}.npy'}: missing (day {day} has {', '.join(sorted(kinds))})"
            )
        rows = {k: _shape(folder, day, k)[0] for k in KINDS}
        if len(set(rows.values())) != 1:
            raise ValueError(f"{folder}: day {day}'s files have different row counts {rows}")
    return sorted(found)


def npy_paths(folder: PathLike, days: Sequence[int], kind: str) -> List[str]:
    return [str(Path(folder) / f"day_{d}_{kind}.npy") for d in days]


def _shape(folder: Path, day: int, kind: str) -> tuple:
    path = folder / f"day_{day}_{kind}.npy"
    try:
        array = np.load(path, mmap_mode="r")  # reads the header only
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None
    if array.ndim != 2 or array.shape[1] != _COLUMNS[kind]:
        raise ValueError(f"{path}: shape {array.shape}, expected [rows, {_COLUMNS[kind]}]")
    if kind == "dense" and array.dtype != np.float32:
        raise ValueError(f"{path}: dtype {array.dtype}, expected float32")
    if kind != "dense" and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: dtype {array.dtype}, expected integers")
    return array.shape


def split_days(days: List[int]) -> Dict[str, Any]:
    """Terabyte's split: train = every day but the last; val, test = halves of the last day."""
    if len(days) < 2:
        raise ValueError(
            f"the torchrec_npy split needs at least 2 days (train days, then the val/test day), found days {days}"
        )
    return {"train": days[:-1], "val": days[-1:], "test": days[-1:]}


def describe(folder: PathLike) -> Dict[str, Any]:
    """What `memcom data info` prints for such a folder: days, rows, splits."""
    folder = Path(folder)
    days = npy_days(folder)
    rows = {d: int(_shape(folder, d, "labels")[0]) for d in days}
    last = rows[days[-1]] if len(days) > 1 else 0
    val = (last + 1) // 2
    info: Dict[str, Any] = {
        "format": "torchrec_npy",
        "days": {str(d): rows[d] for d in days},
        "sparse_dtype": str(np.load(folder / f"day_{days[0]}_sparse.npy", mmap_mode="r").dtype),
        "ids": "raw hex values; hashed modulo num_embeddings at load time (embeddings.num_embeddings)",
    }
    if len(days) > 1:
        info["splits"] = {
            "train": {"days": days[:-1], "rows": sum(rows[d] for d in days[:-1])},
            "val": {"days": days[-1:], "rows": val},
            "test": {"days": days[-1:], "rows": last - val},
        }
    return info


class TorchRecNpyLoader:
    """Batches of one split of a TorchRec npy folder, through TorchRec's `InMemoryBinaryCriteoIterDataPipe`.

    Same interface as `CriteoParquetLoader` (`len`, `set_epoch`, iteration over `Batch` with float
    labels): every rank gets the same number of batches. The files are memory-mapped, so memory
    does not grow with the days; `shuffle` permutes the rows within each batch (TorchRec's
    `shuffle_batches`, numpy's global generator, seeded by `set_epoch` with (seed, epoch)).

    Args:
        folder: a folder of ``day_N_dense.npy``, ``day_N_sparse.npy``, ``day_N_labels.npy``.
        split: "train" (every day but the last), "val" or "test" (the halves of the last day).
        batch_size: rows per batch.
        rank: this rank's index, in ``[0, world_size)``.
        world_size: the ranks that read the split.
        num_embeddings: the 26 features' table sizes: raw ids are hashed modulo them.
        seed: the seed of the shuffle (with the epoch).
        shuffle: whether to shuffle the rows within each batch.
        drop_last: whether to drop the last, incomplete batch.

    Example::

        loader = TorchRecNpyLoader("/data/criteo_1tb_npy", "train", 8192, rank, world_size,
                                   num_embeddings=[40_000_000] * 26)
        for batch in loader:
            ...
    """

    def __init__(
        self,
        folder: PathLike,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_embeddings: Sequence[int] = (),
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe

        if split not in ("train", "val", "test"):
            raise ValueError(f"{folder}: torchrec_npy has splits train, val and test, not {split!r}")
        if len(num_embeddings) != len(CAT_NAMES) or min(num_embeddings) < 1:
            raise ValueError(
                f"{folder}: torchrec_npy needs {len(CAT_NAMES)} positive num_embeddings "
                "(embeddings.num_embeddings): ids are hashed modulo them"
            )
        days = split_days(npy_days(folder))[split]
        self.seed, self.num_embeddings = seed, dict(zip(CAT_NAMES, (int(n) for n in num_embeddings)))
        self._pipe = InMemoryBinaryCriteoIterDataPipe(
            split,
            npy_paths(folder, days, "dense"),
            npy_paths(folder, days, "sparse"),
            npy_paths(folder, days, "labels"),
            batch_size,
            rank,
            world_size,
            drop_last=drop_last,
            shuffle_batches=shuffle,
            mmap_mode=True,
            hashes=list(num_embeddings),
        )
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self._pipe)

    def set_epoch(self, epoch: int) -> None:
        np.random.seed([self.seed, epoch])  # TorchRec's batch shuffle draws from the global generator

    def __iter__(self) -> Iterator["Batch"]:
        from torchrec.datasets.utils import Batch

        for batch in self._pipe:  # TorchRec's labels are int32 [n]; the loss wants floats
            yield Batch(batch.dense_features, batch.sparse_features, batch.labels.float())
