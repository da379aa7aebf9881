"""MovieLens-1M conversion (both source layouts), datasets of other shapes in the loader, the
frequencies and the manifest's feature names."""

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from torchrec_memcom.cli import main as memcom_main
from torchrec_memcom.data import (
    CriteoParquetLoader,
    MovieLensFormatError,
    convert_movielens,
    features_of,
    kaggle_split,
    load_frequencies,
    load_manifest,
    synthesize,
)
from torchrec_memcom.data.movielens import write_movielens

GENRES = ["Action", "Children's", "Comedy", "Drama", "Film-Noir", "Sci-Fi"]


def movielens_rows(users: int, movies: int, ratings: int, seed: int = 0) -> Dict[str, List[Any]]:
    """Random MovieLens-1M-shaped records: (user, movie, rating), users, movies with 1-3 genres."""
    rng = np.random.default_rng(seed)
    u = [
        (
            i + 1,
            "MF"[i % 2],
            int(rng.choice([1, 18, 25, 35, 45, 50, 56])),
            int(rng.integers(0, 21)),
            f"{rng.integers(0, 99999):05d}",
        )
        for i in range(users)
    ]
    m = [
        (j + 1, f"Movie Ã© {j} ({1950 + j % 50})", sorted(rng.choice(GENRES, rng.integers(1, 4), replace=False)))
        for j in range(movies)
    ]
    pairs = {(int(rng.integers(1, users + 1)), int(rng.integers(1, movies + 1))) for _ in range(ratings)}
    r = [(a, b, float(rng.integers(1, 6))) for a, b in sorted(pairs)]
    return {"ratings": r, "users": u, "movies": m}


def _read(data: Path, split: str) -> Dict[str, List[Any]]:
    shards = load_manifest(data)["splits"][split]["shards"]
    tables = [pq.read_table(data / s["path"]).to_pydict() for s in shards]
    return {k: sum((t[k] for t in tables), []) for k in tables[0]}


def _decoded(data: Path) -> List[Tuple[Any, ...]]:
    """Every row with raw values (from vocab/), in file order over the splits."""
    vocab = {f: json.loads((data / "vocab" / f"{f}.json").read_text()) for f in load_manifest(data)["features"]}
    out = []
    for split in ("train", "val", "test"):
        t = _read(data, split)
        for i in range(len(t["label"])):
            out.append(
                (
                    t["label"][i],
                    *(vocab[f][t[f][i] - 1] for f in ("gender", "age", "occupation", "zip")),
                    tuple(vocab["genres"][g - 1] for g in t["genres"][i]),
                )
            )
    return out


@pytest.fixture(scope="module")
def records() -> Dict[str, List[Any]]:
    return movielens_rows(users=40, movies=30, ratings=700)


@pytest.mark.parametrize("layout", ["grouplens", "recbole"])
def test_conversion_labels_features_split_and_seed(tmp_path: Path, records: Dict[str, List[Any]], layout: str) -> None:
    src = write_movielens(tmp_path / "src", layout, **records)
    manifest = convert_movielens(src, tmp_path / "out", seed=3)
    n = len(records["ratings"])
    assert manifest["rows_written"] == n and manifest["layout"] == layout
    assert {s: manifest["splits"][s]["rows"] for s in ("train", "val", "test")} == {
        s: b - a for s, (a, b) in kaggle_split(n).items()
    }
    features = features_of(manifest)
    assert features.dense == [] and features.multi_hot == ["genres"]
    assert features.sparse == ["user", "movie", "gender", "age", "occupation", "zip", "genres"]
    # every rating is there once, with its label and its user's and movie's features
    users = {u[0]: u for u in records["users"]}
    movies = {m[0]: m for m in records["movies"]}
    expected = sorted(
        (int(r >= 4), users[u][1], str(users[u][2]), str(users[u][3]), users[u][4], tuple(movies[m][2]))
        for u, m, r in records["ratings"]
    )
    rows = _decoded(tmp_path / "out")
    assert sorted(rows) == expected
    # the order is shuffled, by the seed: the same seed gives the same files, another seed another order
    again = convert_movielens(src, tmp_path / "again", seed=3)
    assert _decoded(tmp_path / "again") == rows and again["features"] == manifest["features"]
    convert_movielens(src, tmp_path / "other", seed=4)
    assert _decoded(tmp_path / "other") != rows
    assert sorted(_decoded(tmp_path / "other")) == expected


def test_both_layouts_give_the_same_data(tmp_path: Path, records: Dict[str, List[Any]]) -> None:
    a = convert_movielens(write_movielens(tmp_path / "g", "grouplens", **records), tmp_path / "a")
    b = convert_movielens(write_movielens(tmp_path / "r", "recbole", **records), tmp_path / "b")
    assert a["features"] == b["features"]
    assert _decoded(tmp_path / "a") == _decoded(tmp_path / "b")


@pytest.mark.parametrize("layout", ["grouplens", "recbole"])
def test_bad_lines_error_naming_file_and_line_or_are_skipped(
    tmp_path: Path, records: Dict[str, List[Any]], layout: str
) -> None:
    bad = {"grouplens": ["1::2::five::978300760", "7::8"], "recbole": ["1m_1\tMovie\tfive\t978300760", "1m_7"]}[layout]
    src = write_movielens(tmp_path / "src", layout, **records, extra_lines={"ratings": bad})
    first_bad = len(records["ratings"]) + 1 + (layout == "recbole")  # RecBole's header is line 1
    with pytest.raises(MovieLensFormatError, match=rf"ratings.dat:{first_bad}: |ml-1m.inter:{first_bad}: ") as e:
        convert_movielens(src, tmp_path / "out")
    assert e.value.line == first_bad and not (tmp_path / "out" / "manifest.json").exists()
    manifest = convert_movielens(src, tmp_path / "out", on_bad_line="skip")
    assert manifest["rows_written"] == len(records["ratings"]) and manifest["rows_skipped"] == 2
    assert sum(manifest["skipped_by_reason"].values()) == 2 and len(manifest["skipped_examples"]) == 2


def test_unknown_movie_is_a_bad_line(tmp_path: Path, records: Dict[str, List[Any]]) -> None:
    src = write_movielens(tmp_path / "src", "grouplens", **records, extra_lines={"ratings": ["1::999::4::978300760"]})
    with pytest.raises(MovieLensFormatError, match="movie '999' is not in its file"):
        convert_movielens(src, tmp_path / "out")


def test_cli_converts_and_reports_errors_in_one_line(
    tmp_path: Path, records: Dict[str, List[Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_movielens(tmp_path / "src", "recbole", **records)
    assert memcom_main(["data", "movielens", str(src), "--out", str(tmp_path / "out")]) == 0
    assert f"{len(records['ratings'])} rows written" in capsys.readouterr().out.replace(",", "")
    assert memcom_main(["data", "movielens", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("memcom data movielens: error:") and "nowhere" in err and "\n" not in err


def test_loader_gives_multi_hot_bags_and_no_dense(tmp_path: Path, records: Dict[str, List[Any]]) -> None:
    data = tmp_path / "out"
    convert_movielens(write_movielens(tmp_path / "src", "grouplens", **records), data)
    table = _read(data, "train")
    loader = CriteoParquetLoader(data, "train", batch_size=64, shuffle=False, drop_last=False)
    seen = 0
    for batch in loader:
        kjt = batch.sparse_features.to_dict()
        b = batch.labels.numel()
        assert batch.dense_features.shape == (b, 0)
        rows = range(seen, seen + b)
        assert batch.labels.tolist() == [float(table["label"][i]) for i in rows]
        assert kjt["user"].values().tolist() == [table["user"][i] for i in rows]
        assert kjt["genres"].lengths().tolist() == [len(table["genres"][i]) for i in rows]
        assert kjt["genres"].values().tolist() == [g for i in rows for g in table["genres"][i]]
        seen += b
    assert seen == len(table["label"])
    # shuffled in windows smaller than the split (rows carried across windows): every row once
    shuffled = CriteoParquetLoader(data, "train", batch_size=50, seed=1, shuffle_window=70, drop_last=False)
    got = []
    for batch in shuffled:
        kjt = batch.sparse_features.to_dict()
        genres = torch.split(kjt["genres"].values(), kjt["genres"].lengths().tolist())
        got += zip(kjt["user"].values().tolist(), kjt["movie"].values().tolist(), [tuple(g.tolist()) for g in genres])
    assert sorted(got) == sorted(zip(table["user"], table["movie"], [tuple(g) for g in table["genres"]]))
    # two ranks: rank 1's part starts inside a row group (a sliced list column)
    halves = []
    for rank in (0, 1):
        for batch in CriteoParquetLoader(data, "train", batch_size=40, rank=rank, world_size=2, shuffle=False):
            kjt = batch.sparse_features.to_dict()
            genres = torch.split(kjt["genres"].values(), kjt["genres"].lengths().tolist())
            halves += zip(kjt["user"].values().tolist(), [tuple(g.tolist()) for g in genres])
    rows = list(zip(table["user"], [tuple(g) for g in table["genres"]]))
    half = len(rows) // 2
    used = half // 40 * 40
    assert halves == rows[:used] + rows[half : half + used]


def test_frequencies_count_every_id_of_a_bag(tmp_path: Path, records: Dict[str, List[Any]]) -> None:
    data = tmp_path / "out"
    convert_movielens(write_movielens(tmp_path / "src", "grouplens", **records), data)
    table = _read(data, "train")
    freq = load_frequencies(data)
    assert set(freq) == set(load_manifest(data)["features"])
    assert (
        freq["genres"].tolist()
        == np.bincount([g for bag in table["genres"] for g in bag], minlength=len(freq["genres"])).tolist()
    )
    assert int(freq["user"].sum()) == len(table["label"])


def test_manifests_written_before_feature_names_are_criteo(tmp_path: Path) -> None:
    data = tmp_path / "synth"
    synthesize(3000, data, seed=0, max_cardinality=50, progress=False)
    before = [b.sparse_features.values().tolist() for b in CriteoParquetLoader(data, "train", 100, seed=2)]
    path = data / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.pop("dense_features")  # as written before
    path.write_text(json.dumps(manifest))
    features = features_of(load_manifest(data))
    assert features.dense == [f"int_{i}" for i in range(13)] and features.sparse == [f"cat_{i}" for i in range(26)]
    loader = CriteoParquetLoader(data, "train", 100, seed=2)
    assert [b.sparse_features.values().tolist() for b in loader] == before
    assert next(iter(loader)).dense_features.shape == (100, 13)


def _without_genres(data: Path, out: Path) -> Path:
    """A copy of a MovieLens folder without its multi-hot feature: six one-id features, no dense."""
    import shutil

    shutil.copytree(data, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            pq.write_table(pq.read_table(out / shard["path"]).drop_columns(["genres"]), out / shard["path"])
    del manifest["features"]["genres"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _train_checkpoint(data: Path, work: Path) -> Path:
    from torchrec_memcom.train.cli import launch

    config = {
        "data": {"path": str(data)},
        "model": {"dense_arch_layer_sizes": [16], "over_arch_layer_sizes": [16, 1]},
        "embeddings": {"dim": 8, "compression": {"method": "memcom", "params": {"ratio": 4}, "min_rows": 100}},
        "optimizer": {"sparse": {"type": "rowwise_adagrad", "lr": 0.1}, "dense": {"lr": 0.1}},
        "train": {"batch_size": 64, "steps": 5, "run_dir": str(work / "run"), "checkpoint_dir": str(work / "ckpt")},
    }
    work.mkdir()
    (work / "config.yaml").write_text(json.dumps(config))
    assert launch(str(work / "config.yaml"), 1) == 0
    return work / "ckpt"


def test_export_reads_the_features_from_the_manifest(tmp_path: Path) -> None:
    """A model of six one-id features and no dense ones exports and matches the trained model
    (export's own check); a multi-hot one is refused, naming the feature."""
    from torchrec_memcom.export.export import export_checkpoint
    from torchrec_memcom.export.inference import load_model
    from torchrec_memcom.inference.tables import ExportError

    data = tmp_path / "ml"
    convert_movielens(write_movielens(tmp_path / "src", "grouplens", **movielens_rows(200, 40, 3000)), data)
    one_hot = _without_genres(data, tmp_path / "one_hot")
    report = export_checkpoint(
        _train_checkpoint(one_hot, tmp_path / "a"), tmp_path / "m.pt", "fp32", raw_ids=False, check_rows=None
    )
    assert (
        report["check"]["max_abs_diff"] <= 1e-5
        and report["check"]["rows"] == load_manifest(one_hot)["splits"]["val"]["rows"]
    )
    model = load_model(tmp_path / "m.pt")
    meta = json.loads(model.metadata)
    assert meta["dense_features"] == [] and meta["sparse_features"] == [
        "user",
        "movie",
        "gender",
        "age",
        "occupation",
        "zip",
    ]
    p = model(torch.zeros(3, 0), torch.ones(3, 6, dtype=torch.int64))
    assert p.shape == (3,) and bool(((p > 0) & (p < 1)).all())
    with pytest.raises(ExportError, match="feature 'genres' is multi-hot"):
        export_checkpoint(_train_checkpoint(data, tmp_path / "b"), tmp_path / "g.pt", "fp32", raw_ids=False)


def test_config_checks_tables_against_the_datas_features(tmp_path: Path, records: Dict[str, List[Any]]) -> None:
    from torchrec_memcom.train.config import load_config

    data = tmp_path / "ml"
    convert_movielens(write_movielens(tmp_path / "src", "grouplens", **records), data)
    path = tmp_path / "c.yaml"
    path.write_text(
        json.dumps(
            {
                "data": {"path": str(data)},
                "embeddings": {"compression": {"tables": {"t_zip": {"method": "hash", "params": {"ratio": 2}}}}},
            }
        )
    )
    assert load_config(path).embeddings.compression.tables["t_zip"].method == "hash"
    path.write_text(
        json.dumps({"data": {"path": str(data)}, "embeddings": {"compression": {"tables": {"t_cat_3": {}}}}})
    )
    with pytest.raises(ValueError, match=r"tables.t_cat_3: no such table \(.*'s t_user .. t_genres\)"):
        load_config(path)
    path.write_text(json.dumps({"data": {"path": str(data)}, "embeddings": {"num_embeddings": [10] * 26}}))
    with pytest.raises(ValueError, match="expected 7 sizes"):
        load_config(path)
