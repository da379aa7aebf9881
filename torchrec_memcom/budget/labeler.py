"""Short DLRM training and its validation AUC: how the search labels an allocation.

Unsharded and in-process (the search runs many short trainings on one machine); the same
function trains every method of the benchmark, so all of them see the same batches, model and
optimizer.
"""

import dataclasses
import math
import time
from itertools import islice
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface


@dataclasses.dataclass
class TrainSettings:
    """How ``train_and_evaluate`` trains a label: the same for every allocation, so that labels
    differ by the allocation only.

    Args:
        steps: optimizer steps (cycling over the batches given).
        lr: the lr of Adagrad on all parameters.
        dense_arch_layer_sizes: the DLRM's dense arch (the embedding dim is appended).
        over_arch_layer_sizes: the DLRM's over arch.
        seed: torch's seed, set before the collection is built.
        threads: torch's intra-op threads while training (one is fastest for these small models,
            and keeps timings steady on a shared machine).

    Example::

        train = load_batches("runs/data/synthetic", "train", batch_size=512, limit=100)
        val = load_batches("runs/data/synthetic", "val", batch_size=512, limit=8)
        train_and_evaluate(lambda: EmbeddingBagCollection(tables), train, val, TrainSettings(steps=100))["auc"]
    """

    steps: int = 300
    lr: float = 0.05
    dense_arch_layer_sizes: Sequence[int] = (64,)
    over_arch_layer_sizes: Sequence[int] = (64, 32, 1)
    seed: int = 0
    threads: int = 1


def load_batches(data_dir: str, split: str, batch_size: int, limit: int, seed: int = 0) -> List[Batch]:
    """The first ``limit`` batches of a split of a data folder (shuffled for ``train``)."""
    from torchrec_memcom.data import CriteoParquetLoader

    train = split == "train"
    loader = CriteoParquetLoader(data_dir, split, batch_size, seed=seed, shuffle=train, drop_last=train)
    return list(islice(iter(loader), limit))


def train_and_evaluate(
    build: Callable[[], EmbeddingBagCollectionInterface],
    train: Sequence[Batch],
    val: Sequence[Batch],
    settings: TrainSettings,
) -> Dict[str, float]:
    """Train a DLRM over ``build()``'s collection for ``settings.steps`` steps; validation metrics.

    The seed is set before ``build`` so that two allocations start from the same generator
    state (their difference is the allocation's, not the draw's).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _train_and_evaluate(build, train, val, settings)
    finally:
        torch.set_num_threads(threads)


def _train_and_evaluate(
    build: Callable[[], EmbeddingBagCollectionInterface],
    train: Sequence[Batch],
    val: Sequence[Batch],
    settings: TrainSettings,
) -> Dict[str, float]:
    torch.manual_seed(settings.seed)
    ebc = build()
    dim = ebc.embedding_bag_configs()[0].embedding_dim
    model = DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=train[0].dense_features.shape[1],
            dense_arch_layer_sizes=[*settings.dense_arch_layer_sizes, dim],
            over_arch_layer_sizes=list(settings.over_arch_layer_sizes),
        )
    )
    optimizer = torch.optim.Adagrad(model.parameters(), lr=settings.lr, foreach=True)
    start = time.perf_counter()
    losses = []
    model.train()
    for step in range(settings.steps):
        loss, _ = model(train[step % len(train)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in val:
            logits.append(model(batch)[1][1])
            labels.append(batch.labels)
    p, y = torch.sigmoid(torch.cat(logits)), torch.cat(labels)
    tail = losses[-max(1, len(losses) // 5) :]
    return {
        "auc": float(binary_auroc(p, y.long())),
        "logloss": float(nn.functional.binary_cross_entropy(p, y.float())),
        "train_loss": sum(tail) / len(tail),
        "train_seconds": seconds,
        "first_loss": losses[0] if losses else math.nan,
    }
