"""Converter tests: the real Criteo sample, gzip, day folders, both id modes, bad lines, unreadable
and empty files, resume."""

import gzip
import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from torchrec_memcom.data import (
    CriteoFormatError,
    CriteoReadError,
    convert,
    kaggle_split,
    load_frequencies,
    load_manifest,
    shards as shards_module,
)
from torchrec_memcom.data.schema import CAT_NAMES, INT_NAMES

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "criteo_kaggle_sample_8k.tsv"


@pytest.fixture(scope="module")
def sample() -> Path:
    if not SAMPLE.is_file():
        pytest.skip(f"real Criteo sample not found at {SAMPLE} (see ../shared/data/README.md)")
    return SAMPLE


@pytest.fixture(scope="module")
def sample_rows(sample: Path) -> List[List[str]]:
    """The sample parsed with plain Python: the reference for every check."""
    return [line.rstrip("\n").split("\t") for line in sample.read_text().splitlines(keepends=True)]


def read_split(out: Path, split: str) -> Dict[str, np.ndarray]:
    """All columns of a split, shards in manifest order (which is input line order)."""
    paths = [out / s["path"] for s in load_manifest(out)["splits"][split]["shards"]]
    table = pq.read_table(paths[0]) if len(paths) == 1 else ds.dataset(paths).to_table()
    return {name: table.column(name).to_numpy() for name in table.column_names}


def raw_id(value: str) -> int:
    return int(value or "0", 16)


def write_lines(path: Path, rows: List[List[str]]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        f.writelines("\t".join(r) + "\n" for r in rows)
    return path


# --- the real sample -------------------------------------------------------------------------


def test_real_sample_mod(sample: Path, sample_rows: List[List[str]], tmp_path: Path) -> None:
    n = 1000
    manifest = convert(sample, tmp_path, num_embeddings=n, rows_per_shard=3000, progress=False)
    assert manifest["rows_read"] == 8000 == manifest["rows_written"] + manifest["rows_skipped"]
    assert manifest["rows_skipped"] == 0
    ranges = kaggle_split(8000)
    assert ranges == {"train": (0, 6858), "val": (6858, 7429), "test": (7429, 8000)}
    for split, (lo, hi) in ranges.items():
        assert manifest["splits"][split]["rows"] == hi - lo
        got = read_split(tmp_path, split)
        rows = sample_rows[lo:hi]
        assert got["label"].dtype == np.int8
        np.testing.assert_array_equal(got["label"], [int(r[0]) for r in rows])
        for j, name in enumerate(INT_NAMES):
            expected = [math.log(max(int(r[1 + j] or 0), 0) + 1) for r in rows]
            assert got[name].dtype == np.float32
            np.testing.assert_allclose(got[name], expected, rtol=1e-6)
        for j, name in enumerate(CAT_NAMES):
            assert got[name].dtype == np.int64
            np.testing.assert_array_equal(got[name], [raw_id(r[14 + j]) % n for r in rows])
    # Shards hold rows_per_shard input lines and never span two splits.
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [3000, 3000, 858]
    for j, name in enumerate(CAT_NAMES):
        feature = manifest["features"][name]
        assert feature["num_embeddings"] == n
        assert feature["cardinality"] == len({raw_id(r[14 + j]) % n for r in sample_rows})
    frequencies = load_frequencies(tmp_path)
    for j, name in enumerate(CAT_NAMES):
        counts = Counter(raw_id(r[14 + j]) % n for r in sample_rows[:6858])
        expected = np.zeros(n, np.int64)
        expected[list(counts)] = list(counts.values())
        assert frequencies[name].dtype == torch.int64
        np.testing.assert_array_equal(frequencies[name].numpy(), expected)
        assert int(frequencies[name].sum()) == manifest["splits"]["train"]["rows"]


def test_real_sample_frequency(sample: Path, sample_rows: List[List[str]], tmp_path: Path) -> None:
    min_count = 2
    manifest = convert(sample, tmp_path, mode="frequency", min_count=min_count, progress=False)
    assert manifest["rows_read"] == 8000 == manifest["rows_written"]
    for j, name in enumerate(CAT_NAMES):
        counts = Counter(raw_id(r[14 + j]) for r in sample_rows[:6858])
        kept = sorted((k for k, c in counts.items() if c >= min_count), key=lambda k: (-counts[k], k))
        ids = {k: i + 1 for i, k in enumerate(kept)}
        assert manifest["features"][name]["num_embeddings"] == len(kept) + 1
        np.testing.assert_array_equal(np.load(tmp_path / "vocab" / f"{name}.npy"), kept)
        for split, (lo, hi) in kaggle_split(8000).items():
            got = read_split(tmp_path, split)[name]
            np.testing.assert_array_equal(got, [ids.get(raw_id(r[14 + j]), 0) for r in sample_rows[lo:hi]])
        mapped = {ids.get(raw_id(r[14 + j]), 0) for r in sample_rows}
        assert manifest["features"][name]["cardinality"] == len(mapped)
        freq = load_frequencies(tmp_path)[name].numpy()
        assert freq.sum() == 6858 and (freq[1:] >= min_count).all()
        assert (np.diff(freq[1:]) <= 0).all()  # ids ordered by decreasing train count


def test_min_count_one_keeps_every_train_id(sample: Path, sample_rows: List[List[str]], tmp_path: Path) -> None:
    manifest = convert(sample, tmp_path, mode="frequency", min_count=1, split="none", progress=False)
    for j, name in enumerate(CAT_NAMES):
        distinct = len({r[14 + j] for r in sample_rows})
        assert manifest["features"][name]["cardinality"] == distinct
        assert manifest["features"][name]["num_embeddings"] == distinct + 1


def test_num_embeddings_per_feature(sample: Path, sample_rows: List[List[str]], tmp_path: Path) -> None:
    sizes = [7 + j for j in range(26)]
    manifest = convert(sample, tmp_path, num_embeddings=sizes, split="none", progress=False)
    got = read_split(tmp_path, "train")
    for j, name in enumerate(CAT_NAMES):
        assert manifest["features"][name]["num_embeddings"] == sizes[j]
        np.testing.assert_array_equal(got[name], [raw_id(r[14 + j]) % sizes[j] for r in sample_rows])


def test_gzip_equals_plain(sample: Path, tmp_path: Path) -> None:
    gz = tmp_path / "train.txt.gz"
    gz.write_bytes(gzip.compress(sample.read_bytes()))
    convert(sample, tmp_path / "plain", rows_per_shard=2500, progress=False)
    convert(gz, tmp_path / "gz", rows_per_shard=2500, progress=False)
    for split in ("train", "val", "test"):
        plain, packed = read_split(tmp_path / "plain", split), read_split(tmp_path / "gz", split)
        for name in plain:
            np.testing.assert_array_equal(plain[name], packed[name])


def test_crlf_line_ends(sample: Path, tmp_path: Path) -> None:
    crlf = tmp_path / "train.txt"
    crlf.write_bytes(sample.read_bytes().replace(b"\n", b"\r\n"))
    convert(sample, tmp_path / "lf", split="none", progress=False)
    convert(crlf, tmp_path / "crlf", split="none", progress=False)
    lf, crlf_rows = read_split(tmp_path / "lf", "train"), read_split(tmp_path / "crlf", "train")
    for name in lf:
        np.testing.assert_array_equal(lf[name], crlf_rows[name])


def test_folder_of_days(sample_rows: List[List[str]], tmp_path: Path) -> None:
    days = tmp_path / "days"
    days.mkdir()
    for d in range(4):  # day_3 compressed, the others plain
        write_lines(days / (f"day_{d}.gz" if d == 3 else f"day_{d}"), sample_rows[d * 2000 : (d + 1) * 2000])
    (days / "README").write_text("not a day file")
    manifest = convert(days, tmp_path / "out", rows_per_shard=1500, progress=False)
    assert manifest["split_rule"] == {"rule": "days", "train_days": [0, 1, 2], "val_days": [3], "test_days": [3]}
    assert [s["day"] for s in manifest["sources"]] == [0, 1, 2, 3]
    assert {s: v["rows"] for s, v in manifest["splits"].items()} == {"train": 6000, "val": 1000, "test": 1000}
    np.testing.assert_array_equal(
        read_split(tmp_path / "out", "test")["label"], [int(r[0]) for r in sample_rows[7000:]]
    )
    # Days picked per split; day 1 left out is never read.
    manifest = convert(days, tmp_path / "out2", train_days=[0, 2], val_days=[3], test_days=[1], progress=False)
    assert {s: v["rows"] for s, v in manifest["splits"].items()} == {"train": 4000, "val": 2000, "test": 2000}
    np.testing.assert_array_equal(
        read_split(tmp_path / "out2", "test")["label"], [int(r[0]) for r in sample_rows[2000:4000]]
    )
    assert manifest["rows_read"] == 8000
    manifest = convert(days, tmp_path / "out3", train_days=[0], val_days=[3], test_days=[3], progress=False)
    assert manifest["rows_read"] == 4000


def test_day_options_are_checked(sample_rows: List[List[str]], tmp_path: Path) -> None:
    paths = [write_lines(tmp_path / f"day_{d}", sample_rows[:10]) for d in range(3)]
    with pytest.raises(ValueError, match="not among the inputs"):
        convert(paths, tmp_path / "a", train_days=[0, 7], progress=False)
    with pytest.raises(ValueError, match="in train and in val/test"):
        convert(paths, tmp_path / "b", train_days=[0, 2], val_days=[2], progress=False)
    with pytest.raises(ValueError, match="exactly one input"):
        convert(paths, tmp_path / "c", split="kaggle", progress=False)


# --- malformed lines -------------------------------------------------------------------------

GOOD = (
    ["1", "5", "-1", "", "3", "", "0", "2", "4", "", "1", "1", "", "7"]
    + ["0a1b2c3d", "", "FFFFFFFF"]
    + ["1234abcd"] * 23
)

BAD_LINES = {
    "too few fields": ("\t".join(GOOD[:-1]), "field_count", "expected 40 tab-separated fields, found 39"),
    "too many fields": ("\t".join(GOOD + ["x"]), "field_count", "found 41"),
    "empty line": ("", "bad_label", "label '' is not 0 or 1"),
    "non-hex": ("\t".join(GOOD[:20] + ["12zz5678"] + GOOD[21:]), "non_hex", "cat_6 '12zz5678'"),
    "hex too long": ("\t".join(GOOD[:14] + ["1" * 17] + GOOD[15:]), "non_hex", "cat_0"),
    "non-integer": ("\t".join(GOOD[:3] + ["1.5"] + GOOD[4:]), "non_integer", "int_2 '1.5'"),
    "lone minus": ("\t".join(GOOD[:3] + ["-"] + GOOD[4:]), "non_integer", "int_2 '-'"),
    "inner minus": ("\t".join(GOOD[:13] + ["7-1"] + GOOD[14:]), "non_integer", "int_12 '7-1'"),
    "label 2": ("\t".join(["2"] + GOOD[1:]), "bad_label", "label '2'"),
    "label missing": ("\t".join([""] + GOOD[1:]), "bad_label", "label ''"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line(kind: str, tmp_path: Path) -> None:
    line, reason, message = BAD_LINES[kind]
    good = "\t".join(GOOD)
    path = tmp_path / "in.tsv"
    path.write_text("\n".join([good] * 6 + [line] + [good] * 5) + "\n")
    with pytest.raises(CriteoFormatError) as error:
        convert(path, tmp_path / "err", split="none", progress=False)
    assert f"{path}:7: " in str(error.value) and message in str(error.value)
    assert error.value.line == 7 and error.value.path == str(path)
    manifest = convert(path, tmp_path / "skip", split="none", on_bad_line="skip", progress=False)
    assert manifest["rows_read"] == 12 and manifest["rows_written"] == 11 and manifest["rows_skipped"] == 1
    assert manifest["skipped_by_reason"][reason] == 1
    assert sum(manifest["skipped_by_reason"].values()) == 1
    assert manifest["skipped_examples"][0].startswith(f"{path}:7: ")


def test_good_line_values(tmp_path: Path) -> None:
    """Edge values that are valid: negatives clamp to 0, uppercase hex, missing fields."""
    path = write_lines(tmp_path / "in.tsv", [GOOD])
    convert(path, tmp_path / "out", split="none", mode="frequency", min_count=1, progress=False)
    got = read_split(tmp_path / "out", "train")
    assert got["int_1"][0] == 0 and got["int_2"][0] == 0  # -1 clamped, missing
    assert got["int_0"][0] == np.float32(math.log(6))
    raw = {name: np.load(tmp_path / "out" / "vocab" / f"{name}.npy") for name in ("cat_0", "cat_1", "cat_2")}
    assert raw == {"cat_0": [0x0A1B2C3D], "cat_1": [0], "cat_2": [0xFFFFFFFF]}


def test_many_bad_lines_counted_by_reason(sample_rows: List[List[str]], tmp_path: Path) -> None:
    rows = [list(r) for r in sample_rows[:3000]]
    for i in range(0, 3000, 7):
        rows[i][20] = "nothex!!"
    for i in range(3, 3000, 11):
        rows[i] = rows[i][:30]
    for i in range(5, 3000, 13):
        rows[i][0] = "x"
    path = write_lines(tmp_path / "in.tsv", rows)
    manifest = convert(
        path, tmp_path / "out", on_bad_line="skip", rows_per_shard=700, block_size=1 << 16, progress=False
    )
    bad_hex = set(range(0, 3000, 7))
    field = set(range(3, 3000, 11))
    label = set(range(5, 3000, 13)) - field
    expected = {"field_count": len(field), "bad_label": len(label), "non_hex": len(bad_hex - field - label)}
    assert {k: v for k, v in manifest["skipped_by_reason"].items() if v} == expected
    assert manifest["rows_read"] == 3000 == manifest["rows_written"] + manifest["rows_skipped"]
    good = [i for i in range(3000) if i not in bad_hex | field | label]
    lo, hi = kaggle_split(3000)["train"]
    np.testing.assert_array_equal(
        read_split(tmp_path / "out", "train")["label"], [int(rows[i][0]) for i in good if lo <= i < hi]
    )


def test_error_then_resume_with_skip(sample_rows: List[List[str]], tmp_path: Path) -> None:
    """Shards finished before the bad line are kept when the user re-runs with skip."""
    rows = [list(r) for r in sample_rows[:5000]]
    rows[4321][0] = "7"
    path = write_lines(tmp_path / "in.tsv", rows)
    with pytest.raises(CriteoFormatError, match=r"in.tsv:4322: label '7'"):
        convert(path, tmp_path / "out", split="none", rows_per_shard=1000, progress=False)
    finished = sorted((tmp_path / "out" / "train").glob("part-*.parquet"))
    assert len(finished) == 4
    stamps = {p: p.stat().st_mtime_ns for p in finished}
    manifest = convert(path, tmp_path / "out", split="none", rows_per_shard=1000, on_bad_line="skip", progress=False)
    assert manifest["rows_skipped"] == 1 and manifest["rows_written"] == 4999
    assert {p: p.stat().st_mtime_ns for p in finished} == stamps


# --- unreadable and empty files --------------------------------------------------------------


def test_empty_file_is_zero_rows(sample_rows: List[List[str]], tmp_path: Path) -> None:
    """An empty input converts to no rows; an empty day in a folder of days is just a day without rows."""
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    for on_bad_line in ("error", "skip"):
        for split in ("kaggle", "none"):
            manifest = convert(
                empty, tmp_path / f"out_{split}_{on_bad_line}", split=split, on_bad_line=on_bad_line, progress=False
            )
            assert manifest["rows_read"] == manifest["rows_written"] == manifest["rows_skipped"] == 0
    days = tmp_path / "days"
    days.mkdir()
    write_lines(days / "day_0", sample_rows[:300])
    (days / "day_1").write_bytes(b"")
    gzip.open(days / "day_2.gz", "wb").close()  # an empty gzip stream
    write_lines(days / "day_3", sample_rows[300:500])
    for mode in ("mod", "frequency"):
        manifest = convert(days, tmp_path / f"days_{mode}", mode=mode, rows_per_shard=100, progress=False)
        assert {s: v["rows"] for s, v in manifest["splits"].items()} == {"train": 300, "val": 100, "test": 100}
        assert manifest["rows_read"] == 500
        np.testing.assert_array_equal(
            read_split(tmp_path / f"days_{mode}", "train")["label"], [int(r[0]) for r in sample_rows[:300]]
        )


def test_truncated_gzip_names_file_and_keeps_finished_shards(sample_rows: List[List[str]], tmp_path: Path) -> None:
    whole = write_lines(tmp_path / "whole.tsv.gz", sample_rows[:5000])
    path = tmp_path / "cut.tsv.gz"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 4])  # cut inside the deflate stream
    out = tmp_path / "out"
    for on_bad_line in ("error", "skip"):
        with pytest.raises(CriteoReadError) as error:
            # small blocks put the cut ~60 blocks in, far beyond pyarrow's bounded read-ahead (with
            # 64 KiB blocks a full-suite run once saw the error before the first batch)
            convert(
                path, out, split="none", rows_per_shard=100, block_size=1 << 14, on_bad_line=on_bad_line, progress=False
            )
        assert str(error.value).startswith(f"{path}: cannot be read past line ")
        assert "Truncated compressed stream" in str(error.value) and error.value.path == str(path)
        assert 0 < error.value.line < 5000  # the reader reads ahead: the error comes some blocks early
        # Every shard filled by the lines read is kept; the second run redoes none of them.
        finished = sorted((out / "train").glob("part-*.parquet"))
        assert len(finished) == error.value.line // 100 >= 2
        if on_bad_line == "error":
            stamps = {p: p.stat().st_mtime_ns for p in finished}
        else:
            assert {p: p.stat().st_mtime_ns for p in finished} == stamps
        assert not (out / "manifest.json").exists()
    labels = pq.read_table(finished, columns=["label"]).column(0).to_numpy()
    np.testing.assert_array_equal(labels, [int(r[0]) for r in sample_rows[: len(finished) * 100]])
    # The Kaggle split counts lines first: the counting pass names the file too.
    with pytest.raises(CriteoReadError, match=f"{path}: cannot be read.*Truncated compressed stream"):
        convert(path, tmp_path / "kaggle", progress=False)


# --- resume and atomicity --------------------------------------------------------------------


class Crash(Exception):
    pass


def test_killed_conversion_resumes(sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real_close = shards_module.ShardFile.close
    closed = []

    def crash_after_two(self: shards_module.ShardFile) -> object:
        if len(closed) == 2:  # dies while finishing the third shard: rows written, no footer
            self._flush(final=True)
            raise Crash()
        closed.append(self.rel)
        return real_close(self)

    monkeypatch.setattr(shards_module.ShardFile, "close", crash_after_two)
    with pytest.raises(Crash):
        convert(sample, out, rows_per_shard=1000, progress=False)
    monkeypatch.setattr(shards_module.ShardFile, "close", real_close)

    with pytest.raises(FileNotFoundError, match="unfinished"):
        load_manifest(out)
    visible = sorted(p.name for p in (out / "train").glob("part-*.parquet"))
    assert visible == ["part-00000.parquet", "part-00001.parquet"]
    assert not (out / "train" / ".part-00002.parquet.tmp").exists()  # a failed run drops its open shard
    assert ds.dataset(out / "train").count_rows() == 2000
    stamps = {p: p.stat().st_mtime_ns for p in (out / "train").glob("part-*.parquet")}

    manifest = convert(sample, out, rows_per_shard=1000, progress=False)
    assert manifest["rows_read"] == 8000 == manifest["rows_written"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished shards not redone
    assert not list(out.glob("**/.*.tmp")) and not (out / ".convert_state.json").exists()
    clean = convert(sample, tmp_path / "clean", rows_per_shard=1000, progress=False)
    assert manifest["splits"] == clean["splits"] and manifest["features"] == clean["features"]
    for split in ("train", "val", "test"):
        a, b = read_split(out, split), read_split(tmp_path / "clean", split)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_sigkilled_conversion_resumes(tmp_path: Path) -> None:
    """A real `kill -9` of `memcom data convert` part-way, then the same command again."""
    from torchrec_memcom.data import write_synthetic_tsv

    tsv = tmp_path / "day_0.gz"
    write_synthetic_tsv(tsv, 100_000, seed=5, progress=False)
    out = tmp_path / "out"
    args = [str(tsv), "--out", str(out), "--split", "none", "--rows-per-shard", "2000", "--quiet"]
    code = f"import sys; from torchrec_memcom.cli import main; sys.exit(main({['data', 'convert'] + args!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code])
    state = out / ".convert_state.json"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and "part-00003.parquet" in state.read_text():
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "conversion finished before it could be killed"
    assert not (out / "manifest.json").exists()
    # the shards the state records are kept; one renamed into place just before the kill but not
    # yet recorded is redone
    recorded = [out / r["path"] for r in json.loads(state.read_text())["shards"] if r["path"]]
    before = {p: p.stat().st_mtime_ns for p in recorded}
    assert 4 <= len(before) < 50
    assert set(before) <= set((out / "train").glob("part-*.parquet"))

    from torchrec_memcom.cli import main

    assert main(["data", "convert"] + args) == 0
    manifest = load_manifest(out)
    assert manifest["rows_read"] == 100_000 == manifest["rows_written"]
    assert len(manifest["splits"]["train"]["shards"]) == 50
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert ds.dataset(out / "train").count_rows() == 100_000


def test_rerun_is_noop_and_other_options_refused(sample: Path, tmp_path: Path) -> None:
    first = convert(sample, tmp_path, progress=False)
    stamp = (tmp_path / "manifest.json").stat().st_mtime_ns
    assert convert(sample, tmp_path, progress=False) == first
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="--overwrite"):
        convert(sample, tmp_path, num_embeddings=10, progress=False)
    manifest = convert(sample, tmp_path, num_embeddings=10, overwrite=True, progress=False)
    assert manifest["features"]["cat_0"]["num_embeddings"] == 10


def test_bad_arguments(sample: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "missing.tsv", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="mod mode"):
        convert(sample, tmp_path / "out", mode="frequency", num_embeddings=5, progress=False)
    with pytest.raises(ValueError, match="26 positive sizes"):
        convert(sample, tmp_path / "out", num_embeddings=[5, 6], progress=False)
    with pytest.raises(FileNotFoundError, match="no day_N files"):
        convert(tmp_path, tmp_path / "out", progress=False)


def peak_rss_of_conversion(tsv: Path, out: Path) -> int:
    """Peak resident memory (bytes) of a fresh process that converts `tsv`."""
    code = (
        "import resource; from torchrec_memcom.data import convert;"
        f"convert({str(tsv)!r}, {str(out)!r}, split='none', block_size=1 << 20, progress=False);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return 1024 * int(run.stdout.split()[-1])


def check_memory_is_bounded(tmp_path: Path, rows: int) -> None:
    """Converting 4x more lines must not need noticeably more memory: the input is streamed."""
    from torchrec_memcom.data import write_synthetic_tsv

    big = tmp_path / "big.tsv"
    write_synthetic_tsv(big, rows, seed=1, progress=False)
    small = tmp_path / "small.tsv"
    with open(big, "rb") as src, open(small, "wb") as dst:
        dst.writelines(line for _, line in zip(range(rows // 4), src))
    growth = peak_rss_of_conversion(big, tmp_path / "big_out") - peak_rss_of_conversion(small, tmp_path / "small_out")
    input_growth = big.stat().st_size - small.stat().st_size
    assert load_manifest(tmp_path / "big_out")["rows_written"] == rows
    assert growth < input_growth / 4, f"peak RSS grew {growth >> 20} MiB for {input_growth >> 20} MiB more input"


def test_memory_does_not_grow_with_input(tmp_path: Path) -> None:
    check_memory_is_bounded(tmp_path, 200_000)  # ~48 MB of TSV


@pytest.mark.slow
def test_memory_does_not_grow_with_input_large(tmp_path: Path) -> None:
    check_memory_is_bounded(tmp_path, 4_000_000)  # ~970 MB of TSV
