"""Inputs and situations a hostile user brings to `memcom data convert`: each is refused with a
line naming the input, or converted with every line accounted for; nothing is lost."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from torchrec_memcom.cli import main
from torchrec_memcom.data import CriteoFormatError, convert, load_manifest, sources as sources_module
from torchrec_memcom.data.manifest import locked
from torchrec_memcom.data.sources import count_lines, line_index, open_at_line, parse_days


def row(k: int) -> str:
    """A valid Criteo line whose label and first integer identify it."""
    return "\t".join([str(k % 2), str(k)] + [str(j) for j in range(12)] + [f"{k * 26 + j:08x}" for j in range(26)])


def converted(out: Path) -> Dict[str, np.ndarray]:
    """int_0 (log1p of the line's k) and label of every row, all splits in order."""
    manifest = load_manifest(out)
    tables = [
        pq.read_table(out / s["path"], columns=["label", "int_0"])
        for split in manifest["splits"].values()
        for s in split["shards"]
    ]
    return {
        "k": np.concatenate([np.rint(np.expm1(t.column("int_0").to_numpy().astype(np.float64))) for t in tables]),
        "label": np.concatenate([t.column("label").to_numpy() for t in tables]),
    }


# --- one rule for line ends ------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=24).map(lambda b: bytes(b"ab\r\n"[x % 4] for x in b)), every=st.integers(1, 4))
def test_counter_and_resume_offset_follow_the_readers_line_ends(data: bytes, every: int) -> None:
    """Line ends are `\\n`, `\\r\\n` and a lone `\\r` (pyarrow's and bytes.splitlines' rule), even when
    a `\\r\\n` straddles two read chunks."""
    import tempfile

    old = sources_module._CHUNK
    sources_module._CHUNK = 3
    try:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "f.tsv")
            Path(path).write_bytes(data)
            lines = data.splitlines(keepends=True)
            assert count_lines(path) == len(lines)
            index = line_index(path, every)
            assert index[0] == len(lines)
            for k in range(1, len(lines) + 2):
                for given_index in (None, (every, index[1])):
                    with open_at_line(path, k, given_index) as stream:
                        assert stream.read() == b"".join(lines[k - 1 :])
    finally:
        sources_module._CHUNK = old


def test_lone_cr_inside_a_line_loses_nothing(tmp_path: Path) -> None:
    """The reader ends a line at a lone `\\r`; the counter (Kaggle split) and resume agree with it."""
    lines = [row(k) for k in range(700)]
    broken = lines[400][:30] + "\r" + lines[400][30:]  # one line becomes two malformed ones
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines[:400] + [broken] + lines[401:]) + "\n", newline="")
    out = tmp_path / "out"
    with pytest.raises(CriteoFormatError) as error:
        convert(path, out, rows_per_shard=100, progress=False)
    assert error.value.line == 401 and "found 14" in str(error.value)  # the line up to the lone CR
    manifest = convert(path, out, rows_per_shard=100, on_bad_line="skip", progress=False)  # resumes
    assert manifest["rows_read"] == 701 == len(path.read_bytes().splitlines())
    assert manifest["rows_skipped"] == 2 and manifest["skipped_by_reason"]["field_count"] == 2
    np.testing.assert_array_equal(converted(out)["k"], [k for k in range(700) if k != 400])


# --- the output folder -----------------------------------------------------------------------


def test_second_convert_into_a_folder_in_use_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("".join(row(k) + "\n" for k in range(50)))
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; from pathlib import Path; from torchrec_memcom.data.manifest import locked\n"
            f"with locked(Path({str(out)!r})):\n print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(ValueError, match=f"{out} is in use by process {holder.pid}"):
            convert(path, out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written
    finally:
        holder.communicate("")
    assert convert(path, out, progress=False)["rows_written"] == 50  # free once the holder ends
    with locked(out):  # and the lock is the same in this process: a second holder is refused
        with pytest.raises(ValueError, match="in use"):
            convert(path, out, progress=False)


def test_damaged_listed_shard_is_named_and_redone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "train.txt"
    path.write_text("".join(row(k) + "\n" for k in range(1000)) + "bad line\n")
    out = tmp_path / "out"
    with pytest.raises(CriteoFormatError):
        convert(path, out, split="none", rows_per_shard=100, progress=False)
    state = json.loads((out / ".convert_state.json").read_text())
    assert len(state["shards"]) == 10
    damaged = out / "train" / "part-00003.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-40])  # the footer gone: "Couldn't deserialize thrift"
    manifest = convert(path, out, split="none", rows_per_shard=100, on_bad_line="skip", progress=False)
    assert f"{damaged}: listed as finished but unreadable" in capsys.readouterr().err
    assert manifest["rows_written"] == 1000
    np.testing.assert_array_equal(converted(out)["k"], np.arange(1000))


# --- bad values and long lines ---------------------------------------------------------------


def test_huge_bad_value_is_quoted_short(tmp_path: Path) -> None:
    fields = row(1).split("\t")
    fields[20] = "x" * (5 << 20)  # a 5 MB field
    path = tmp_path / "train.txt"
    path.write_text(row(0) + "\n" + "\t".join(fields) + "\n" + row(2) + "\n")
    with pytest.raises(CriteoFormatError) as error:
        convert(path, tmp_path / "err", split="none", block_size=16 << 20, progress=False)
    assert len(str(error.value)) < 300 and "(5,242,880 bytes)" in str(error.value)
    manifest = convert(path, tmp_path / "out", split="none", block_size=16 << 20, on_bad_line="skip", progress=False)
    assert manifest["rows_skipped"] == 1 and len(manifest["skipped_examples"][0]) < 300
    assert (tmp_path / "out" / "manifest.json").stat().st_size < 20_000


def test_line_longer_than_the_block(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    long = row(5).replace("\t0\t", "\t" + "7" * 30_000 + "\t", 1)  # 7x the 4 KiB block
    path = tmp_path / "train.txt"
    path.write_text("".join(row(k) + "\n" if k != 5 else long + "\n" for k in range(60)))
    with pytest.raises(CriteoFormatError, match=r"train.txt:6: line is longer than .* raise --block-size"):
        convert(path, tmp_path / "err", split="none", block_size=4096, progress=False)
    manifest = convert(path, tmp_path / "out", split="none", block_size=4096, on_bad_line="skip", progress=False)
    assert manifest["rows_read"] == 60 and manifest["skipped_by_reason"]["too_long"] == 1
    np.testing.assert_array_equal(converted(tmp_path / "out")["k"], [k for k in range(60) if k != 5])
    assert main(["data", "convert", str(path), "--out", str(tmp_path / "small"), "--block-size", "100"]) == 1
    assert "block_size 100 is below 4096 bytes" in capsys.readouterr().err


# --- inputs refused before any work ----------------------------------------------------------


def test_inputs_refused_before_any_work_name_the_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "train.txt"
    path.write_text("".join(row(k) + "\n" for k in range(20)))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"{path}: the same input file is given twice"):
        convert([path, tmp_path / "." / "train.txt"], out, progress=False)
    with pytest.raises(ValueError, match=r"range 5-3 runs backwards; write 3-5"):
        parse_days("0,5-3")
    with pytest.raises(ValueError, match=r"num_embeddings 4,611,686,018,427,387,904 \(cat_0\) is too large"):
        convert(path, out, num_embeddings=1 << 62, progress=False)
    assert main(["data", "convert", str(path), "--out", str(out), "--split", "days", "--train-days", "5-3"]) == 1
    assert "range 5-3 runs backwards" in capsys.readouterr().err
    assert not out.exists()


def test_day_folder_with_checksums(tmp_path: Path) -> None:
    days = tmp_path / "days"
    days.mkdir()
    for d in range(3):
        (days / f"day_{d}").write_text("".join(row(10 * d + k) + "\n" for k in range(10)))
        (days / f"day_{d}.md5").write_text("d41d8cd98f00b204e9800998ecf8427e  day_0\n")
    manifest = convert(days, tmp_path / "out", progress=False)  # the .md5 files are not days
    assert [s["day"] for s in manifest["sources"]] == [0, 1, 2] and manifest["rows_read"] == 30
    (days / "day_1.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"day 1 is given twice: {days / 'day_1'} and {days / 'day_1.gz'}"):
        convert(days, tmp_path / "out2", progress=False)
