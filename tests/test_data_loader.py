"""Loader tests: Batch/KJT format, rank partitioning, equal batch counts, per-epoch shuffling, prefetch."""

import threading
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_memcom.data import CriteoParquetLoader, convert, load_frequencies, load_manifest, shards, synthesize
from torchrec_memcom.data.schema import CAT_NAMES, INT_NAMES

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "criteo_kaggle_sample_8k.tsv"
TRAIN_ROWS = 17_146  # kaggle_split(20_003)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data in 5 shards of 4 row groups each, so shuffling has blocks to permute."""
    out = tmp_path_factory.mktemp("synth")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shards, "ROW_GROUP_ROWS", 1000)
        synthesize(20_003, out, seed=3, rows_per_shard=4000, max_cardinality=5000, progress=False)
    return out


def row_keys(dense: np.ndarray, ids: np.ndarray) -> List[bytes]:
    """One bytes key per row ([n, 13] dense, [n, 26] ids): identifies rows across batches."""
    return [d.tobytes() + i.tobytes() for d, i in zip(dense, ids)]


def batch_keys(batch: Batch) -> List[bytes]:
    ids = batch.sparse_features.values().reshape(len(CAT_NAMES), -1).T.numpy()
    return row_keys(batch.dense_features.numpy(), ids)


def all_keys(loader: Iterable[Batch]) -> List[bytes]:
    return [k for batch in loader for k in batch_keys(batch)]


def split_rows(data_dir: Path, split: str) -> Dict[str, np.ndarray]:
    paths = [data_dir / s["path"] for s in load_manifest(data_dir)["splits"][split]["shards"]]
    table = ds.dataset(paths).to_table()
    return {name: table.column(name).to_numpy() for name in table.column_names}


@pytest.fixture(scope="module")
def train_keys(data: Path) -> Counter:
    rows = split_rows(data, "train")
    dense = np.stack([rows[n] for n in INT_NAMES], axis=1)
    ids = np.stack([rows[n] for n in CAT_NAMES], axis=1)
    return Counter(row_keys(dense, ids))


def test_batch_format(data: Path) -> None:
    loader = CriteoParquetLoader(data, "train", batch_size=512)
    manifest = load_manifest(data)
    assert loader.num_embeddings == {n: manifest["features"][n]["num_embeddings"] for n in CAT_NAMES}
    assert len(loader) == loader.num_batches == TRAIN_ROWS // 512
    batches = list(loader)
    assert len(batches) == len(loader)
    batch = batches[0]
    assert isinstance(batch, Batch) and isinstance(batch.sparse_features, KeyedJaggedTensor)
    assert batch.dense_features.shape == (512, 13) and batch.dense_features.dtype == torch.float32
    assert batch.labels.shape == (512,) and batch.labels.dtype == torch.float32
    assert set(batch.labels.unique().tolist()) <= {0.0, 1.0}
    kjt = batch.sparse_features
    assert kjt.keys() == CAT_NAMES and kjt.stride() == 512
    assert torch.equal(kjt.lengths(), torch.ones(26 * 512, dtype=kjt.lengths().dtype))
    for name, jt in kjt.to_dict().items():
        assert jt.values().dtype == torch.int64
        assert 0 <= int(jt.values().min()) and int(jt.values().max()) < loader.num_embeddings[name]


def test_epoch_reads_every_row_once(data: Path, train_keys: Counter) -> None:
    loader = CriteoParquetLoader(data, "train", batch_size=512, drop_last=False)
    batches = list(loader)
    assert [len(b.labels) for b in batches] == [512] * (TRAIN_ROWS // 512) + [TRAIN_ROWS % 512]
    assert Counter(k for b in batches for k in batch_keys(b)) == train_keys


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_read_disjoint_parts(data: Path, train_keys: Counter, drop_last: bool) -> None:
    loaders = [
        CriteoParquetLoader(data, "train", 500, rank=r, world_size=2, seed=1, drop_last=drop_last) for r in range(2)
    ]
    for loader in loaders:
        loader.set_epoch(4)
    keys = [Counter(all_keys(loader)) for loader in loaders]
    assert len(loaders[0]) == len(loaders[1]) == (17 if drop_last else 18)
    assert sum(keys[0].values()) == sum(keys[1].values()) == (17 * 500 if drop_last else TRAIN_ROWS // 2)
    assert not set(keys[0]) & set(keys[1])
    union = keys[0] + keys[1]
    assert union == train_keys if not drop_last else not union - train_keys


def test_uneven_ranks_stay_in_lock_step(data: Path, train_keys: Counter) -> None:
    """3 ranks, 17,146 rows: parts padded by 2 wrapped-around rows; same batch sizes on every rank."""
    loaders = [CriteoParquetLoader(data, "train", 1000, rank=r, world_size=3, drop_last=False) for r in range(3)]
    sizes = [[len(b.labels) for b in loader] for loader in loaders]
    assert sizes[0] == sizes[1] == sizes[2] == [1000] * 5 + [716]
    union = sum((Counter(all_keys(loader)) for loader in loaders), Counter())
    assert set(union) == set(train_keys) and sum(union.values()) == TRAIN_ROWS + 2


def test_shuffle_depends_on_seed_and_epoch_only(data: Path) -> None:
    def order(seed: int, epoch: int) -> List[bytes]:
        loader = CriteoParquetLoader(data, "train", 256, seed=seed)
        loader.set_epoch(epoch)
        return all_keys(loader)

    first = order(0, 1)
    assert order(0, 1) == first  # a fresh loader, same (seed, epoch)
    assert order(0, 2) != first and order(1, 1) != first
    assert Counter(order(0, 2)) != Counter(first)  # drop_last leaves out different rows
    loader = CriteoParquetLoader(data, "train", 256)
    loader.set_epoch(1)
    assert all_keys(loader) == all_keys(loader) == first  # iterating again repeats the epoch


def test_shuffle_mixes_shards(data: Path) -> None:
    """A batch holds rows from many row groups, not one contiguous stretch of a file."""
    rows = split_rows(data, "train")
    dense = np.stack([rows[n] for n in INT_NAMES], axis=1)
    ids = np.stack([rows[n] for n in CAT_NAMES], axis=1)
    position = {k: i for i, k in enumerate(row_keys(dense, ids))}
    batch = next(iter(CriteoParquetLoader(data, "train", 512, shuffle_window=4000)))
    groups = {position[k] // 1000 for k in batch_keys(batch)}
    assert len(groups) >= 4


def test_no_shuffle_is_file_order(data: Path) -> None:
    loader = CriteoParquetLoader(data, "val", 100, shuffle=False, drop_last=False)
    labels = torch.cat([b.labels for b in loader]).numpy()
    np.testing.assert_array_equal(labels, split_rows(data, "val")["label"])


def test_prefetch_gives_the_same_batches(data: Path) -> None:
    """The background thread changes when batches are built, never which: same rows, same order."""
    inline = CriteoParquetLoader(data, "train", 1000, seed=5, drop_last=False, prefetch=0)
    ahead = CriteoParquetLoader(data, "train", 1000, seed=5, drop_last=False, prefetch=3)
    for loader in (inline, ahead):
        loader.set_epoch(2)
    pairs = list(zip(inline, ahead, strict=True))
    assert len(pairs) == len(inline)
    for a, b in pairs:
        torch.testing.assert_close(a.dense_features, b.dense_features)
        torch.testing.assert_close(a.labels, b.labels)
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())


def test_pinned_batches_are_the_same_batches(data: Path) -> None:
    """pin_memory changes where a batch lives (page-locked, with an accelerator), never what it holds."""
    plain = CriteoParquetLoader(data, "train", 1000, seed=5, prefetch=0)
    pinned = CriteoParquetLoader(data, "train", 1000, seed=5, prefetch=2, pin_memory=True)
    for a, b in zip(plain, pinned, strict=True):
        assert torch.equal(a.dense_features, b.dense_features) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert b.dense_features.is_pinned() == b.labels.is_pinned() == torch.accelerator.is_available()


def prefetch_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "CriteoParquetLoader-prefetch"]


def test_prefetch_thread_stops_and_passes_errors(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loader = CriteoParquetLoader(data, "train", 100, prefetch=2)
    batches = iter(loader)
    next(batches)
    assert len(prefetch_threads()) == 1
    batches.close()  # what `break` out of a for loop does once the iterator is dropped
    assert not prefetch_threads()

    def fail(self: CriteoParquetLoader, *args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(CriteoParquetLoader, "_batch", fail)
    with pytest.raises(OSError, match="disk gone"):
        next(iter(loader))
    assert not prefetch_threads()


def test_bad_arguments(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too few"):
        CriteoParquetLoader(data, "val", 1000, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        CriteoParquetLoader(data, "train", 10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="prefetch"):
        CriteoParquetLoader(data, "train", 10, prefetch=-1)
    with pytest.raises(ValueError, match="no split"):
        CriteoParquetLoader(data, "holdout", 10)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        CriteoParquetLoader(tmp_path, "train", 10)


def test_frequencies(data: Path) -> None:
    frequencies = load_frequencies(data)
    manifest = load_manifest(data)
    assert list(frequencies) == CAT_NAMES
    rows = split_rows(data, "train")
    for name, counts in frequencies.items():
        assert counts.dtype == torch.int64
        assert len(counts) == manifest["features"][name]["num_embeddings"]
        assert int(counts.sum()) == manifest["splits"]["train"]["rows"] == TRAIN_ROWS
        np.testing.assert_array_equal(counts.numpy(), np.bincount(rows[name], minlength=len(counts)))


def test_feeds_an_embedding_bag_collection(data: Path) -> None:
    loader = CriteoParquetLoader(data, "train", 64)
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t_{n}", embedding_dim=4, num_embeddings=loader.num_embeddings[n], feature_names=[n]
            )
            for n in CAT_NAMES
        ]
    )
    pooled = ebc(next(iter(loader)).sparse_features)
    assert pooled.values().shape == (64, 26 * 4)


def test_real_sample(tmp_path: Path) -> None:
    if not SAMPLE.is_file():
        pytest.skip(f"real Criteo sample not found at {SAMPLE} (see ../shared/data/README.md)")
    convert(SAMPLE, tmp_path, num_embeddings=5000, progress=False)
    for rank in range(2):
        loader = CriteoParquetLoader(tmp_path, "train", 256, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader) == 6858 // 2 // 256
        values = torch.cat([b.sparse_features.values() for b in batches])
        assert 0 <= int(values.min()) and int(values.max()) < 5000
