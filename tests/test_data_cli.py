"""`memcom data` command tests, and TorchRec name compatibility."""

import json
from pathlib import Path

import pytest

from torchrec_memcom.cli import main
from torchrec_memcom.data import load_manifest
from torchrec_memcom.data.schema import CAT_NAMES, INT_NAMES, LABEL_NAME

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "criteo_kaggle_sample_8k.tsv"


def test_names_match_torchrec() -> None:
    from torchrec.datasets import criteo

    assert LABEL_NAME == criteo.DEFAULT_LABEL_NAME
    assert INT_NAMES == criteo.DEFAULT_INT_NAMES
    assert CAT_NAMES == criteo.DEFAULT_CAT_NAMES


def test_synth_and_info(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "synth"
    assert main(["data", "synth", "--rows", "3000", "--out", str(out), "--seed", "2", "--quiet"]) == 0
    assert "best AUC" in capsys.readouterr().out
    assert load_manifest(out)["rows_written"] == 3000
    assert main(["data", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cat_25" in text and "num_embeddings" in text
    assert main(["data", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["generator"]["seed"] == 2


def test_synth_tsv_then_convert(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tsv = tmp_path / "day_0"
    assert main(["data", "synth", "--rows", "1500", "--out", str(tsv), "--format", "tsv", "--quiet"]) == 0
    assert len(tsv.read_text().splitlines()) == 1500
    sizes = ",".join(str(100 + j) for j in range(26))
    assert (
        main(
            [
                "data",
                "convert",
                str(tsv),
                "--out",
                str(tmp_path / "out"),
                "--split",
                "none",
                "--num-embeddings",
                sizes,
                "--quiet",
            ]
        )
        == 0
    )
    manifest = load_manifest(tmp_path / "out")
    assert manifest["features"]["cat_25"]["num_embeddings"] == 125 and manifest["rows_written"] == 1500


def test_convert_real_sample(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if not SAMPLE.is_file():
        pytest.skip(f"real Criteo sample not found at {SAMPLE} (see ../shared/data/README.md)")
    assert (
        main(
            [
                "data",
                "convert",
                str(SAMPLE),
                "--out",
                str(tmp_path),
                "--mode",
                "frequency",
                "--min-count",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "8,000 rows written" in out and "train" in out
    assert load_manifest(tmp_path)["min_count"] == 2


def test_bad_line_exit_code_and_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text("1\t2\n")
    assert main(["data", "convert", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{path}:1: expected 40 tab-separated fields, found 2" in err
    assert main(["data", "convert", str(path), "--out", str(tmp_path / "out"), "--quiet", "--on-bad-line", "skip"]) == 0
    assert load_manifest(tmp_path / "out")["rows_skipped"] == 1


def test_unreadable_and_empty_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A truncated gzip is one line naming the file (no traceback), under either --on-bad-line; an empty file is 0 rows."""
    whole = tmp_path / "whole.gz"
    assert main(["data", "synth", "--rows", "2000", "--out", str(whole), "--format", "tsv", "--quiet"]) == 0
    cut = tmp_path / "cut.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    for on_bad_line in ("error", "skip"):
        assert (
            main(
                [
                    "data",
                    "convert",
                    str(cut),
                    "--out",
                    str(tmp_path / "out"),
                    "--split",
                    "none",
                    "--quiet",
                    "--on-bad-line",
                    on_bad_line,
                ]
            )
            == 1
        )
        err = capsys.readouterr().err
        assert err.startswith(f"memcom data convert: error: {cut}: cannot be read") and "Truncated" in err
        assert len(err.splitlines()) == 1
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    assert main(["data", "convert", str(empty), "--out", str(tmp_path / "e"), "--on-bad-line", "skip", "--quiet"]) == 0
    assert "0 rows written" in capsys.readouterr().out


def test_days_options(tmp_path: Path) -> None:
    for day in range(3):
        assert (
            main(
                [
                    "data",
                    "synth",
                    "--rows",
                    "700",
                    "--seed",
                    str(day),
                    "--format",
                    "tsv",
                    "--out",
                    str(tmp_path / f"day_{day}.gz"),
                    "--quiet",
                ]
            )
            == 0
        )
    assert (
        main(
            [
                "data",
                "convert",
                str(tmp_path),
                "--out",
                str(tmp_path / "out"),
                "--train-days",
                "0-1",
                "--val-days",
                "2",
                "--test-days",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    splits = load_manifest(tmp_path / "out")["splits"]
    assert {s: v["rows"] for s, v in splits.items()} == {"train": 1400, "val": 350, "test": 350}
    assert main(["data", "convert", str(tmp_path), "--out", str(tmp_path / "x"), "--train-days", "a"]) == 1


def test_convert_with_workers_and_parts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if not SAMPLE.is_file():
        pytest.skip(f"real Criteo sample not found at {SAMPLE}")
    common = [str(SAMPLE), "--num-embeddings", "500", "--rows-per-shard", "3000", "--quiet"]
    assert main(["data", "convert", *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["data", "convert", *common, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    capsys.readouterr()
    assert load_manifest(tmp_path / "one") == load_manifest(tmp_path / "two")
    assert main(["data", "convert", *common, "--out", str(tmp_path / "p"), "--part", "1/1"]) == 1
    assert "--part 1/1: expected K/N with 0 <= K < N" in capsys.readouterr().err
    assert main(["data", "convert", *common, "--out", str(tmp_path / "p"), "--workers", "0"]) == 1
    assert "workers must be at least 1" in capsys.readouterr().err
