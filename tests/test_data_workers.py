"""`convert(..., workers=N)`: the same output as one process (rows in every split, counts,
frequencies, vocab, manifest) over byte ranges of one file and over day files; resumable."""

import gzip
import json
from pathlib import Path
from typing import List

import pyarrow.parquet as pq
import pytest

from torchrec_memcom.data import CriteoFormatError, convert

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "criteo_kaggle_sample_8k.tsv"


@pytest.fixture(scope="module")
def sample() -> Path:
    if not SAMPLE.is_file():
        pytest.skip(f"real Criteo sample not found at {SAMPLE}")
    return SAMPLE


def assert_same_output(a: Path, b: Path) -> None:
    """Same manifest and the same files: shards equal as tables, every other file byte for byte."""
    assert json.loads((a / "manifest.json").read_text()) == json.loads((b / "manifest.json").read_text())
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != ".lock")
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != ".lock")
    for rel in files:
        if rel.suffix == ".parquet":
            assert pq.read_table(a / rel).equals(pq.read_table(b / rel)), rel
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


@pytest.mark.parametrize("mode", ["mod", "frequency"])
def test_byte_ranges_of_one_file_equal_one_process(sample: Path, tmp_path: Path, mode: str) -> None:
    options = dict(mode=mode, rows_per_shard=1500, progress=False)
    one = convert(sample, tmp_path / "one", **options)
    two = convert(sample, tmp_path / "two", workers=2, **options)
    assert two["rows_written"] == one["rows_written"] == 8000
    assert len(two["splits"]["train"]["shards"]) == 5  # 6,858 train lines in 1,500-line shards
    assert_same_output(tmp_path / "one", tmp_path / "two")


def day_folder(sample: Path, folder: Path, bad_lines: List[int] = ()) -> Path:
    """The sample as day_0.gz .. day_3.gz (2,000 lines each); `bad_lines` (0-based) get a bad label."""
    lines = sample.read_text().splitlines(keepends=True)
    for k in bad_lines:
        lines[k] = "7" + lines[k][1:]
    folder.mkdir()
    for d in range(4):
        with gzip.open(folder / f"day_{d}.gz", "wt") as f:
            f.writelines(lines[2000 * d : 2000 * (d + 1)])
    return folder


def test_day_files_equal_one_process(sample: Path, tmp_path: Path) -> None:
    days = day_folder(sample, tmp_path / "days")
    options = dict(mode="frequency", min_count=2, rows_per_shard=700, progress=False)
    convert(days, tmp_path / "one", **options)
    manifest = convert(days, tmp_path / "three", workers=3, **options)
    assert manifest["split_rule"]["train_days"] == [0, 1, 2]
    assert_same_output(tmp_path / "one", tmp_path / "three")


def test_first_bad_line_reported_and_resume_with_other_workers(sample: Path, tmp_path: Path) -> None:
    days = day_folder(sample, tmp_path / "days", bad_lines=[6100, 2345])
    out = tmp_path / "out"
    with pytest.raises(CriteoFormatError) as error:
        convert(days, out, rows_per_shard=500, workers=2, progress=False)
    assert (error.value.path, error.value.line) == (str(days / "day_1.gz"), 346)  # the first, in input order
    state = json.loads((out / ".convert_state.json").read_text())
    kept = {r["path"]: (out / r["path"]).stat().st_mtime_ns for r in state["shards"]}
    assert len(kept) >= 8  # every shard without a bad line was finished and recorded
    convert(days, out, rows_per_shard=500, on_bad_line="skip", workers=3, progress=False)  # resumes
    assert all((out / p).stat().st_mtime_ns == t for p, t in kept.items())
    convert(days, tmp_path / "one", rows_per_shard=500, on_bad_line="skip", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows_skipped"] == 2 and manifest["skipped_by_reason"]["bad_label"] == 2
    assert_same_output(tmp_path / "one", out)


# --- several hosts: parts, then a merge ------------------------------------------------------


def test_parts_then_merge_equal_one_process(sample: Path, tmp_path: Path) -> None:
    days = day_folder(sample, tmp_path / "days", bad_lines=[10])
    options = dict(rows_per_shard=700, on_bad_line="skip", progress=False)
    convert(days, tmp_path / "one", **options)
    out = tmp_path / "parts"
    with pytest.raises(TimeoutError, match=r"parts/0/part.json: part 0 of 3 not finished after 0 s"):
        convert(days, out, merge_parts=3, wait_s=0, **options)
    for k in range(3):  # hosts may run different numbers of workers
        part = convert(days, out, part=(k, 3), workers=1 + (k == 1), **options)
        assert {r["source"] for r in part["shards"]} == {k, k + 3} & {0, 1, 2, 3}
    convert(days, out, merge_parts=3, workers=2, **options)
    assert not (out / ".parts").exists()
    assert_same_output(tmp_path / "one", out)
    with pytest.raises(ValueError, match="mod mode only"):
        convert(days, tmp_path / "freq", mode="frequency", part=(0, 2), progress=False)


def test_torchx_component_converts_on_two_hosts(sample: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    days = day_folder(sample, tmp_path / "days")
    convert(days, tmp_path / "one", num_embeddings=1000, rows_per_shard=700, progress=False)
    torchx = Path(sys.executable).with_name("torchx")
    run = subprocess.run(
        [
            str(torchx),
            "run",
            "-s",
            "local_cwd",
            "launch/memcom_torchx.py:convert",
            "--inputs",
            str(days),
            "--out",
            str(tmp_path / "tx"),
            "--nnodes",
            "2",
            "--workers",
            "1",
            "--num_embeddings",
            "1000",
            "--extra",
            "--rows-per-shard 700",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_output(tmp_path / "one", tmp_path / "tx")


def test_sigkilled_parallel_conversion_resumes(sample: Path, tmp_path: Path) -> None:
    """`kill -9` of a `--workers 2` convert: its workers die with it; the same command resumes."""
    import signal
    import subprocess
    import sys
    import time

    days = day_folder(sample, tmp_path / "days")
    out = tmp_path / "out"
    args = ["data", "convert", str(days), "--out", str(out), "--rows-per-shard", "100", "--workers", "2", "--quiet"]
    code = f"import sys; from torchrec_memcom.cli import main; sys.exit(main({args!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code])
    state = out / ".convert_state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and state.read_text().count('"rows_written"') >= 6:
            break
        time.sleep(0.01)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "conversion finished before it could be killed"
    assert children, "no worker processes seen"
    time.sleep(1.0)
    alive = [
        pid
        for pid in children
        if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    ]
    assert not alive, f"workers {alive} outlived their parent"
    from torchrec_memcom.cli import main

    assert main(args) == 0
    convert(days, tmp_path / "one", rows_per_shard=100, progress=False)
    assert_same_output(tmp_path / "one", out)
