"""TorchRec's preprocessed Criteo npy files, made here by TorchRec's own BinaryCriteoUtils: read
through TorchRec's reader with ids hashed as the DLRM example does, described by `memcom data
info`, trained on by `memcom train`."""

import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
import yaml

from torchrec_memcom.cli import main
from torchrec_memcom.data.torchrec_npy import TorchRecNpyLoader, describe

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "criteo_kaggle_sample_8k.tsv"
SIZES = [97, 1000, 13] + [50] * 23


@pytest.fixture(scope="module")
def npy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Days 0-2 of 1,100, 900 and 1,001 real Criteo lines, as BinaryCriteoUtils.tsv_to_npys writes them."""
    from torchrec.datasets.criteo import BinaryCriteoUtils

    if not SAMPLE.is_file():
        pytest.skip(f"real Criteo sample not found at {SAMPLE}")
    lines = SAMPLE.read_text().splitlines(keepends=True)
    folder = tmp_path_factory.mktemp("npy")
    start = 0
    for day, rows in enumerate([1100, 900, 1001]):
        tsv = folder / f"day_{day}.tsv"
        tsv.write_text("".join(lines[start : start + rows]))
        start += rows
        BinaryCriteoUtils.tsv_to_npys(
            str(tsv), *(str(folder / f"day_{day}_{k}.npy") for k in ("dense", "sparse", "labels"))
        )
        tsv.unlink()
    return folder


def reference(folder: Path, days: list, rows: slice = slice(None)) -> Dict[str, np.ndarray]:
    load = lambda kind: np.concatenate([np.load(folder / f"day_{d}_{kind}.npy") for d in days])[rows]  # noqa: E731
    return {"dense": load("dense"), "ids": load("sparse") % np.array(SIZES), "labels": load("labels")[:, 0]}


def read_all(loader: TorchRecNpyLoader) -> Dict[str, np.ndarray]:
    batches = list(loader)
    assert len(batches) == len(loader)
    ids = [b.sparse_features.to_dict() for b in batches]
    assert all(b.labels.dtype == torch.float32 for b in batches)
    return {
        "dense": torch.cat([b.dense_features for b in batches]).numpy(),
        "ids": np.stack([torch.cat([d[f"cat_{j}"].values() for d in ids]).numpy() for j in range(26)], axis=1),
        "labels": torch.cat([b.labels for b in batches]).numpy(),
    }


def test_splits_hash_ids_as_the_dlrm_example(npy_folder: Path) -> None:
    for split, days, rows in [
        ("train", [0, 1], slice(0, 1984)),
        ("val", [2], slice(0, 501)),
        ("test", [2], slice(501, 1001)),
    ]:
        loader = TorchRecNpyLoader(
            npy_folder, split, 64, num_embeddings=SIZES, shuffle=False, drop_last=split == "train"
        )
        got, want = read_all(loader), reference(npy_folder, days, rows)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{split} {key}")


def test_two_ranks_get_equal_disjoint_parts(npy_folder: Path) -> None:
    ranks = [
        TorchRecNpyLoader(npy_folder, "train", 100, rank=r, world_size=2, num_embeddings=SIZES, seed=3)
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 10  # 2,000 rows: 20 full batches of 100
    parts = [read_all(loader) for loader in ranks]
    rows = lambda d: sorted(map(tuple, np.hstack([d["dense"], d["ids"], d["labels"][:, None]])))  # noqa: E731
    both = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    assert rows(both) == rows(reference(npy_folder, [0, 1]))  # every row once, on one rank


def test_info_and_refusals(npy_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    info = describe(npy_folder)
    assert info["days"] == {"0": 1100, "1": 900, "2": 1001}
    assert info["splits"]["train"]["rows"] == 2000 and info["splits"]["val"]["rows"] == 501
    assert main(["data", "info", str(npy_folder)]) == 0
    assert "3 days, 3,001 rows" in capsys.readouterr().out
    broken = tmp_path / "broken"
    broken.mkdir()
    for kind in ("dense", "sparse"):
        (broken / f"day_0_{kind}.npy").write_bytes((npy_folder / f"day_0_{kind}.npy").read_bytes())
    (broken / "day_0_labels.npy").write_bytes(b"junk")
    assert main(["data", "info", str(broken)]) == 1
    assert f"{broken / 'day_0_labels.npy'}: not a readable .npy file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs 26 positive num_embeddings"):
        TorchRecNpyLoader(npy_folder, "train", 64)


def test_memcom_train_reads_torchrec_npy(npy_folder: Path, tmp_path: Path) -> None:
    config = {
        "data": {"path": str(npy_folder), "format": "torchrec_npy"},
        "model": {"dense_arch_layer_sizes": [16], "over_arch_layer_sizes": [16, 1]},
        "embeddings": {
            "dim": 8,
            "num_embeddings": SIZES,
            "compression": {"method": "memcom", "params": {"ratio": 4}, "min_rows": 100},
        },
        "optimizer": {"sparse": {"type": "rowwise_adagrad", "lr": 0.1}, "dense": {"lr": 0.1}},
        "train": {"batch_size": 100, "steps": 6, "eval_every": 3, "run_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--nproc", "1"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["step"] == 6 and 0 <= results["auc"] <= 1
    config["embeddings"]["num_embeddings"] = "from_data"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--nproc", "1"]) != 0
