"""`memcom score` input faults: each gives one line naming the file (and line), and loses nothing."""

import gzip
from pathlib import Path

import pytest
import torch

from torchrec_memcom.cli import main
from torchrec_memcom.export.raw import RawLineError, parse_line, read_batches


def line(k: int) -> str:
    return "\t".join([str(k % 2), str(k)] + [""] * 12 + [f"{k:08x}"] + ["0a"] * 25)


def test_bom_is_ignored_as_convert_does(tmp_path: Path) -> None:
    path = tmp_path / "bom.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(line(k) + "\n" for k in range(3)).encode())
    (batch,) = read_batches(str(path), 10)
    expected = [parse_line(line(k)) for k in range(3)]
    assert batch.labels.tolist() == [e[0] for e in expected]
    assert torch.equal(batch.cats, torch.tensor([e[2] for e in expected]))


def test_non_utf8_byte_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.tsv"
    path.write_bytes((line(0) + "\n" + line(1)[:-2]).encode() + b"\xe9a\n")
    with pytest.raises(RawLineError, match=rf"{path}:2: not UTF-8 text \(byte 0xe9 at character"):
        list(read_batches(str(path), 1))


def test_corrupt_gz_is_one_line_error(tmp_path: Path) -> None:
    whole = gzip.compress("".join(line(k) + "\n" for k in range(20000)).encode())
    cut = tmp_path / "cut.tsv.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(RawLineError, match=rf"{cut}: cannot be read past line [0-9,]+: "):
        list(read_batches(str(cut), 1000))
    junk = tmp_path / "junk.tsv.gz"
    junk.write_bytes(b"not gzip at all\n")
    with pytest.raises(RawLineError, match=rf"{junk}: cannot be read past line 0: Not a gzipped file"):
        list(read_batches(str(junk), 10))


def test_out_equal_to_an_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "requests.tsv"
    data.write_text("".join(line(k) + "\n" for k in range(5)))
    before = data.read_bytes()
    model = tmp_path / "model.pt"
    model.write_bytes(b"model")
    for out in (str(data), str(tmp_path / "." / "requests.tsv"), str(model)):
        assert main(["score", str(model), str(data), "--out", out]) == 1
        assert "writing would empty it" in capsys.readouterr().err
    assert data.read_bytes() == before and model.read_bytes() == b"model"
