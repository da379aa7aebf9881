"""Every shipped config trains: a few steps on small data of its kind (Criteo-shaped synthetic,
MovieLens-shaped) with its own model and optimizer."""

import math
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO
from dist_utils import run_multiprocess
from test_movielens import movielens_rows

from torchrec_memcom.data import convert_movielens, load_manifest, synthesize
from torchrec_memcom.data.movielens import write_movielens
from torchrec_memcom.train.config import RunConfig, load_config

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
STEPS, BATCH = 6, 256


def base_rate_logloss(data: Path) -> float:
    """Log loss of predicting the train split's click rate for every example."""
    manifest = load_manifest(data)
    labels = np.concatenate(
        [
            pq.read_table(data / s["path"], columns=["label"]).column(0).to_numpy()
            for s in manifest["splits"]["train"]["shards"]
        ]
    )
    p = float(labels.mean())
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def small_run(path: Path, data: Path, run_dir: Path) -> RunConfig:
    """The shipped config on small data: its model, tables' dim and optimizer; fewer rows per
    table (``min_rows`` scaled with them), smaller batches, a few steps."""
    config = load_config(path)
    config.data.path, config.data.synthetic = str(data), None
    config.embeddings.num_embeddings = "from_data"
    compression = config.embeddings.compression
    compression.min_rows = min(compression.min_rows, 1000)
    if "frequencies" in compression.params:
        compression.params["frequencies"] = str(data)
    train = config.train
    train.steps, train.batch_size, train.eval_every, train.eval_batches = STEPS, BATCH, 0, 1
    train.run_dir, train.checkpoint_dir, train.checkpoint_every = str(run_dir), None, 0
    return config


def _train_each(rank: int, world_size: int, runs: List[RunConfig], out: Dict[str, Any]) -> None:
    # trainer._train: the rank's job inside a process group that is already up (train() makes its own)
    from torchrec_memcom.train.trainer import _train

    for config in runs:
        result = _train(config, torch.device("cpu"), False, [])
        out[config.train.run_dir] = result["train_loss"]


@pytest.fixture(scope="module")
def criteo_shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("criteo") / "synth"
    synthesize(6000, path, seed=0, max_cardinality=2000, progress=False)
    return path


@pytest.fixture(scope="module")
def movielens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MovieLens-1M-shaped data with a user and a zip table of over 1000 rows (so compressed)."""
    folder = tmp_path_factory.mktemp("movielens")
    src = write_movielens(folder / "src", "grouplens", **movielens_rows(users=1500, movies=60, ratings=9000))
    convert_movielens(src, folder / "data")
    return folder / "data"


def test_every_shipped_config_trains_without_diverging(tmp_path: Path, criteo_shaped: Path, movielens: Path) -> None:
    """Mean training loss of the first steps stays within 10x the base-rate log loss. Measured
    on the Criteo-shaped data: the shipped configs 1.6-3x (Adagrad's first step lifts one step's loss to a
    few times the base rate); Adagrad lr 0.02 on the DLRM example's architecture (the Kaggle
    configs before) over 1000x."""
    assert len(CONFIGS) >= 12
    data = {p: movielens if p.stem.startswith("movielens") else criteo_shaped for p in CONFIGS}
    runs = [small_run(p, data[p], tmp_path / p.stem) for p in CONFIGS]
    manager = torch.multiprocessing.get_context("spawn").Manager()
    losses = manager.dict()
    run_multiprocess(_train_each, 1, runs, losses)
    bounds = {d: 10 * base_rate_logloss(d) for d in (criteo_shaped, movielens)}
    found = {p.name: (losses[str(tmp_path / p.stem)], bounds[data[p]]) for p in CONFIGS}
    bad = {name: v for name, v in found.items() if not (math.isfinite(v[0]) and v[0] < v[1])}
    assert not bad, f"(mean training loss, bound) too high: {bad} (all: {found})"
