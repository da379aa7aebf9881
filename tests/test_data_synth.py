"""Synthesizer tests: reproducibility, Criteo shape, known best AUC, TSV form round trip."""

import itertools
import math
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from torchrec_memcom.data import convert, load_frequencies, load_manifest, roc_auc, synthesize, write_synthetic_tsv
from torchrec_memcom.data.schema import CAT_NAMES, COLUMN_NAMES, KAGGLE_CARDINALITIES, SPLITS


def columns(data_dir: Path, splits=SPLITS) -> dict:
    manifest = load_manifest(data_dir)
    paths = [data_dir / s["path"] for split in splits for s in manifest["splits"][split]["shards"]]
    table = ds.dataset(paths).to_table()
    return {name: table.column(name).to_numpy() for name in table.column_names}


def test_reproducible_bit_for_bit(tmp_path: Path) -> None:
    a = synthesize(30_000, tmp_path / "a", seed=7, max_cardinality=3000, rows_per_shard=9000, progress=False)
    b = synthesize(30_000, tmp_path / "b", seed=7, max_cardinality=3000, rows_per_shard=9000, progress=False)
    assert a == b
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 26 + 3
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    # Same rows whatever the shard size; another seed gives other rows.
    c = synthesize(30_000, tmp_path / "c", seed=7, max_cardinality=3000, rows_per_shard=4000, progress=False)
    assert c["best_auc"] == a["best_auc"]
    for name, values in columns(tmp_path / "a").items():
        np.testing.assert_array_equal(values, columns(tmp_path / "c")[name])
    synthesize(30_000, tmp_path / "d", seed=8, max_cardinality=3000, progress=False)
    assert not np.array_equal(columns(tmp_path / "d")["cat_3"], columns(tmp_path / "a")["cat_3"])


def test_criteo_shape_and_best_auc(tmp_path: Path) -> None:
    manifest = synthesize(100_000, tmp_path, seed=0, progress=False)
    rows = {s: v["rows"] for s, v in manifest["splits"].items()}
    assert rows == {"train": 85_715, "val": 7143, "test": 7142}
    for split in SPLITS:
        assert 0.7 < manifest["best_auc"][split] < 1
        base = 0.25
        assert manifest["best_logloss"][split] < -(base * math.log(base) + (1 - base) * math.log(1 - base))
    data = columns(tmp_path)
    assert list(data) == COLUMN_NAMES
    assert abs(data["label"].mean() - 0.25) < 0.01
    frequencies = load_frequencies(tmp_path)
    for name, kaggle in zip(CAT_NAMES, KAGGLE_CARDINALITIES):
        feature = manifest["features"][name]
        assert feature["num_embeddings"] == max(2, min(kaggle, 100_000))
        assert data[name].min() >= 0 and data[name].max() < feature["num_embeddings"]
        counts = np.sort(frequencies[name].numpy())[::-1]
        assert counts.sum() == rows["train"]
        if feature["num_embeddings"] >= 10_000:  # Zipf: the top 1% of ids get most occurrences
            assert counts[: feature["num_embeddings"] // 100].sum() > 0.5 * counts.sum()
            assert 0.1 * feature["num_embeddings"] < feature["cardinality"] < feature["num_embeddings"]


def test_tsv_form_converts_to_the_same_rows(tmp_path: Path) -> None:
    """Converting write_synthetic_tsv's output gives synthesize's labels, dense values and ids (renamed)."""
    rows = 20_000
    write_synthetic_tsv(tmp_path / "train.txt.gz", rows, seed=4, max_cardinality=2000, progress=False)
    synthesize(rows, tmp_path / "direct", seed=4, max_cardinality=2000, progress=False)
    manifest = convert(
        tmp_path / "train.txt.gz", tmp_path / "converted", mode="frequency", min_count=1, split="none", progress=False
    )
    assert manifest["rows_written"] == rows
    direct, converted = columns(tmp_path / "direct"), columns(tmp_path / "converted", splits=["train"])
    np.testing.assert_array_equal(direct["label"], converted["label"])
    for name in COLUMN_NAMES[1:14]:
        np.testing.assert_array_equal(direct[name], converted[name])
    for name in CAT_NAMES:
        pairs = set(zip(direct[name].tolist(), converted[name].tolist()))
        assert len(pairs) == len(set(direct[name].tolist())) == len(set(converted[name].tolist()))


def test_roc_auc_matches_pair_counting() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    labels = rng.integers(0, 2, size=60)
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(scores[labels == 1], scores[labels == 0]))
    assert roc_auc(scores, labels) == pytest.approx(wins / ((labels == 1).sum() * (labels == 0).sum()))


def test_other_data_is_not_overwritten(tmp_path: Path) -> None:
    small = {"max_cardinality": 1000, "progress": False}
    synthesize(2000, tmp_path, seed=1, **small)
    assert synthesize(2000, tmp_path, seed=1, **small) == load_manifest(tmp_path)
    with pytest.raises(ValueError, match="--overwrite"):
        synthesize(2000, tmp_path, seed=2, **small)
    assert synthesize(2000, tmp_path, seed=2, overwrite=True, **small)["config"]["seed"] == 2


def test_unfinished_conversion_is_not_overwritten(tmp_path: Path) -> None:
    """synth into a folder holding an unfinished conversion refuses, and deletes nothing, unless overwrite."""
    tsv = tmp_path / "in.tsv"
    write_synthetic_tsv(tsv, 3000, seed=1, max_cardinality=500, progress=False)
    tsv.write_text(tsv.read_text() + "not a criteo line\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="in.tsv:3001"):
        convert(tsv, out, split="none", rows_per_shard=1000, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert len(list(out.glob("train/part-*.parquet"))) == 3 and (out / ".convert_state.json").is_file()
    with pytest.raises(ValueError, match="unfinished conversion.*--overwrite"):
        synthesize(2000, out, seed=1, max_cardinality=500, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    manifest = synthesize(2000, out, seed=1, max_cardinality=500, overwrite=True, progress=False)
    assert manifest["kind"] == "synth" and not (out / ".convert_state.json").exists()
    assert len(list(out.glob("train/part-*.parquet"))) == 1
