"""`torchrec_memcom.inference.inference_model` on a model that is not Criteo-shaped: two towers
with their own feature names, a mixed collection from compress() (MEmCom with the mix hash,
hashing, QR with MEAN over multi-hot bags, a stock table of another dim), a budgeted collection
(tiers below the model dim, a MEmCom tail, multi-hot tags) nested in a submodule, and a weighted
stock EBC; eager, TorchScript and torch.export against the trained model within the tolerance
each precision's quantization allows."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from conftest import REPO
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom import CompressionSpec, HashConfig, MEmComConfig, QRConfig, compress
from torchrec_memcom.inference import ExportError, InferenceEmbeddingBagCollection, inference_model, kjt_dynamic_shapes
from torchrec_memcom.modules.budget_allocation import Allocation, TableAllocation, Tier
from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedEmbeddingBagCollection

BATCH = 6
USER_TABLES = [
    EmbeddingBagConfig(name="users", embedding_dim=8, num_embeddings=500, feature_names=["user_id"]),
    EmbeddingBagConfig(name="geo", embedding_dim=8, num_embeddings=90, feature_names=["user_geo"]),
    EmbeddingBagConfig(
        name="history",
        embedding_dim=8,
        num_embeddings=300,
        feature_names=["watched", "liked"],
        pooling=PoolingType.MEAN,
    ),
    EmbeddingBagConfig(
        name="age", embedding_dim=4, num_embeddings=12, feature_names=["age_bucket"], pooling=PoolingType.MEAN
    ),
]
USER_SPEC = CompressionSpec(
    tables={
        "users": MEmComConfig(num_hash_rows=37, hash="mix"),
        "geo": HashConfig(num_hash_rows=16, hash="mix"),
        "history": QRConfig(num_collisions=7, operation="mult"),
    }
)
ITEM_TABLES = [
    EmbeddingBagConfig(name="items", embedding_dim=8, num_embeddings=400, feature_names=["item_id"]),
    EmbeddingBagConfig(name="tags", embedding_dim=8, num_embeddings=120, feature_names=["item_tags"]),
]
ITEM_ALLOCATION = Allocation(
    {
        "items": TableAllocation((Tier(60, 8), Tier(140, 4), Tier(200, 4, hash_rows=23))),
        "tags": TableAllocation((Tier(20, 8), Tier(100, 4))),
    }
)
QUERY_TABLES = [EmbeddingBagConfig(name="terms", embedding_dim=8, num_embeddings=80, feature_names=["query_terms"])]
# multi-hot features: up to this many ids per bag (empty bags included)
MAX_LENGTH = {"watched": 5, "liked": 3, "item_tags": 4, "query_terms": 3}


class ItemTower(nn.Module):
    def __init__(self, tables: nn.Module) -> None:
        super().__init__()
        self.tables = tables
        self.mlp = nn.Linear(16, 8)

    def forward(self, items: KeyedJaggedTensor) -> Tensor:
        kt = self.tables(items).to_dict()
        return self.mlp(torch.cat([kt["item_id"], kt["item_tags"]], 1))


class UserTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tables = EmbeddingBagCollection(USER_TABLES)
        self.mlp = nn.Linear(36, 8)

    def forward(self, users: KeyedJaggedTensor) -> Tensor:
        kt = self.tables(users).to_dict()
        return self.mlp(torch.cat([kt["user_id"], kt["user_geo"], kt["watched"], kt["liked"], kt["age_bucket"]], 1))


class Recommender(nn.Module):
    """Scores (user, item, query) triples; reads its collections' outputs by key."""

    def __init__(self) -> None:
        super().__init__()
        self.users = UserTower()
        g = torch.Generator().manual_seed(0)
        frequencies = {"items": torch.randint(0, 50, (400,), generator=g), "tags": torch.arange(120, 0, -1)}
        self.items = ItemTower(
            BudgetedEmbeddingBagCollection(
                ITEM_TABLES, budget_ratio=1, frequencies=frequencies, allocation=ITEM_ALLOCATION
            )
        )
        self.query_tables = EmbeddingBagCollection(QUERY_TABLES, is_weighted=True)
        self.query_mlp = nn.Linear(8, 8)

    def forward(self, users: KeyedJaggedTensor, items: KeyedJaggedTensor, queries: KeyedJaggedTensor) -> Tensor:
        user = self.users(users)
        query = self.query_mlp(self.query_tables(queries).to_dict()["query_terms"])
        return (user * (self.items(items) + query)).sum(1)


def kjt(
    tables: List[EmbeddingBagConfig], seed: int, weighted: bool = False, shuffle: bool = False, size: int = BATCH
) -> KeyedJaggedTensor:
    """A batch of bags (multi-hot features up to MAX_LENGTH ids, empty bags included), int32
    ids and lengths as TorchRec's data pipelines give; ``shuffle``: keys in another order."""
    g = torch.Generator().manual_seed(seed)
    keys, values, lengths = [], [], []
    for t in tables:
        for f in t.feature_names:
            if f in MAX_LENGTH:
                n = torch.randint(0, MAX_LENGTH[f] + 1, (size,), generator=g)
            else:
                n = torch.ones(size, dtype=torch.int64)
            keys.append(f)
            lengths.append(n)
            values.append(torch.randint(0, t.num_embeddings, (int(n.sum()),), generator=g))
    order = list(reversed(range(len(keys)))) if shuffle else list(range(len(keys)))
    v = torch.cat([values[i] for i in order]).int()
    weights = torch.rand(v.numel(), generator=g) * 2 - 0.5 if weighted else None
    return KeyedJaggedTensor(
        keys=[keys[i] for i in order], values=v, lengths=torch.cat([lengths[i] for i in order]).int(), weights=weights
    )


def batch(seed: int, shuffle: bool = False, size: int = BATCH) -> Dict[str, KeyedJaggedTensor]:
    return {
        "users": kjt(USER_TABLES, seed, shuffle=shuffle, size=size),
        "items": kjt(ITEM_TABLES, seed + 1, shuffle=shuffle, size=size),
        "queries": kjt(QUERY_TABLES, seed + 2, weighted=True, size=size),
    }


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """The recommender, compressed and trained a few steps (scalars and tiers move off their init)."""
    torch.manual_seed(0)
    model = Recommender()
    compress(model.users, USER_SPEC)  # the user tower's tables, each by its own method
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    for step in range(5):
        inputs = batch(step)
        loss = (model(**inputs) - 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def collections(model: nn.Module) -> Dict[str, nn.Module]:
    return {"users.tables": model.users.tables, "items.tables": model.items.tables, "query_tables": model.query_tables}


def magnitude(collection: nn.Module, features: KeyedJaggedTensor, row_max: bool) -> Dict[str, Tensor]:
    """The collection's output with every parameter and weight made non-negative (``row_max``:
    each table row replaced by its largest |entry|): what the errors of rounding each stored
    number (relative: fp16) or each row (to a fraction of its largest entry: int8) scale with,
    projections and QR products included."""
    c = copy.deepcopy(collection)
    with torch.no_grad():
        for name, p in c.named_parameters():
            is_table = p.dim() == 2 and "projections" not in name and "entity_weights" not in name
            p.copy_(p.abs().amax(1, keepdim=True).expand_as(p) if row_max and is_table else p.abs())
        weights = features.weights_or_none()
        if weights is not None:
            features = KeyedJaggedTensor(features.keys(), features.values(), weights.abs(), lengths=features.lengths())
        return c(features).to_dict()


FP16 = 2.0**-11  # fp16's relative rounding error
# int8 row-wise (FBGEMM): half a step of range / 255 <= max|x| / 255, plus the fp16 rounding of
# the bias (<= FP16 * max|x|) and of the scale (<= FP16 * range <= 2 FP16 max|x|)
INT8 = 1 / 255 + 3 * FP16
# Per precision: error bound per unit of `magnitude` (row_max for int8). A product of two
# rounded numbers (QR mult; a row times its fp16 scalar) errs by at most 2e + e^2; fp32 errs by
# the order of its sums only.
BOUNDS = {"fp32": (1e-5, False), "fp16": (2 * FP16 + FP16**2 + FP16, False), "int8": (2 * INT8 + INT8**2 + FP16, True)}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_collections_answer_within_the_precisions_error_bound(trained: nn.Module, precision: str) -> None:
    """Each inference collection's KeyedTensor has the trained one's keys and dims and values
    within the bound of its precision's rounding; keys in another order give the same answer."""
    factor, row_max = BOUNDS[precision]
    inputs = batch(10)
    shuffled = batch(10, shuffle=True)
    for (where, c), features, other in zip(collections(trained).items(), inputs.values(), shuffled.values()):
        ours = InferenceEmbeddingBagCollection.from_float(c, precision)
        with torch.no_grad():
            expected = c(features)
        got = ours(features)
        assert got.keys() == expected.keys() and got.length_per_key() == expected.length_per_key(), where
        bound = magnitude(c, features, row_max)
        for key, value in expected.to_dict().items():
            err = (got[key] - value).abs()
            limit = factor * bound[key] + 1e-6
            assert bool((err <= limit).all()), f"{where} {key}: error {float((err - limit).max()):.3g} over the bound"
            assert float(bound[key].abs().max()) > 0, f"{where} {key}: nothing looked up"
        assert torch.equal(ours(other).values(), got.values()), where


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_inference_model_scripts_exports_and_is_frozen(trained: nn.Module, precision: str) -> None:
    """inference_model swaps every collection (nested ones too), freezes the rest, leaves the
    trained model alone; the model's own code runs unchanged, eagerly, as TorchScript and
    through torch.export, all three equal; fp32 equals the trained model."""
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    served = inference_model(trained, precision)
    for where in collections(served):
        assert isinstance(served.get_submodule(where), InferenceEmbeddingBagCollection), where
    assert not served.training and not any(p.requires_grad for p in served.parameters())
    assert all(p.requires_grad for p in trained.parameters())
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    inputs = batch(20)
    with torch.no_grad():
        expected = trained(**inputs)
    ours = served(**inputs)
    if precision == "fp32":
        assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)
    else:  # the collections' bounds are checked above; the towers only carry them on
        assert float((ours - expected).abs().max()) < 0.05 * float(expected.abs().max())
    scripted = torch.jit.script(served)
    assert torch.allclose(scripted(**inputs), ours, rtol=1e-6, atol=1e-6)
    shapes = {name: kjt_dynamic_shapes(features) for name, features in inputs.items()}
    exported = torch.export.export(served, (), dict(inputs), strict=False, dynamic_shapes=shapes).module()
    assert torch.allclose(exported(**inputs), ours, rtol=1e-6, atol=1e-6)
    other = batch(21, size=BATCH + 5)  # another batch size, other bag lengths
    assert torch.allclose(exported(**other), served(**other), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strict", [False, True])
def test_exported_mix_slots_equal_the_modules_for_every_id(trained: nn.Module, strict: bool) -> None:
    """Under torch.export (strict or not) the mix hash walks a fixed number of passes: every id
    of the MEmCom and hashed tables still reads what the trained collection reads."""
    c = trained.users.tables
    size = 500
    ids = {
        "user_id": torch.arange(size),
        "user_geo": torch.arange(size) % 90,
        "watched": torch.arange(size) % 300,
        "liked": torch.arange(size) % 300,
        "age_bucket": torch.arange(size) % 12,
    }
    ones = torch.ones(size * len(ids), dtype=torch.int64)
    features = KeyedJaggedTensor(list(ids), torch.cat(list(ids.values())), lengths=ones)
    served = InferenceEmbeddingBagCollection.from_float(c, "fp32")
    exported = torch.export.export(served, (features,), strict=strict).module()
    with torch.no_grad():
        expected = c(features).values()
    assert torch.allclose(exported(features).values(), expected, rtol=1e-5, atol=1e-6)


def test_training_state_is_dropped() -> None:
    """In-backward optimizers (TorchRec's pattern) stay on the trained model, not on the copy."""
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    model = Recommender()
    compress(model.users, USER_SPEC)
    apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
    served = inference_model(model, "fp16")
    assert all(hasattr(p, "_in_backward_optimizers") for p in model.parameters())
    assert not any(hasattr(p, "_in_backward_optimizers") for p in served.parameters())


def _row_bytes(rows: int, dim: int, precision: str) -> int:
    """Bytes of ``rows`` rows of ``dim`` stored in ``precision`` (int8: fp16 scale and bias)."""
    return rows * (dim * {"fp32": 4, "fp16": 2, "int8": 1}[precision] + (4 if precision == "int8" else 0))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_bytes_match_a_count_from_the_trained_tables(trained: nn.Module, precision: str) -> None:
    """Tables, scalars, projections and ranks take the bytes their shapes and precision give."""
    scalar_size = 4 if precision == "fp32" else 2
    for where, c in collections(trained).items():
        got = InferenceEmbeddingBagCollection.from_float(c, precision).nbytes()
        rows = scalars = projections = remap = 0
        stores = 0
        for name, p in c.named_parameters():
            if "entity_weights" in name:
                scalars += p.numel() * scalar_size
            elif "projections" in name:
                continue
            else:
                rows += _row_bytes(p.shape[0], p.shape[1], precision)
        if isinstance(c, BudgetedEmbeddingBagCollection):
            stores = 1
            # a column block per (dim, k-th tier of that dim in its table) below the model dim
            blocks = {
                (x.dim, [y.dim for y in t.tiers[:j]].count(x.dim)) for t in c.tables for j, x in enumerate(t.tiers)
            }
            width = sum(dim for dim, _ in blocks if dim != 8)
            projections = len(c.embedding_bag_configs()) * width * 8 * 4  # [F, W, d] fp32
            remap = sum(t.num_embeddings * 2 for t in c.tables if t.remap)  # int16 ranks
        else:
            stores = len({cfg.embedding_dim for cfg in c.embedding_bag_configs()})
        assert got["tables"] == rows, where
        assert got["entity_scalars"] == scalars + stores * scalar_size, where  # each store's trailing 1.0
        assert got["projections"] == projections and got["remap"] == remap, where


def test_bad_input_is_refused_naming_the_feature(trained: nn.Module) -> None:
    served = InferenceEmbeddingBagCollection.from_float(trained.users.tables, "int8")
    good = batch(30)["users"]
    with pytest.raises(ValueError, match="feature user_geo is not in the input's keys"):
        served(KeyedJaggedTensor(["user_id"], good["user_id"].values(), lengths=good["user_id"].lengths()))
    bad = good.values().clone()
    bad[0] = 10_000
    with pytest.raises(ValueError, match="feature user_id: id 10000 is outside"):
        served(KeyedJaggedTensor(good.keys(), bad, lengths=good.lengths()))
    with pytest.raises(ValueError, match="unknown precision"):
        inference_model(trained, "int4")
    with pytest.raises(ExportError, match="is not an embedding bag collection"):
        InferenceEmbeddingBagCollection.from_float(nn.Linear(2, 2), "fp32")

    class OtherCollection(EmbeddingBagCollectionInterface):
        def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
            raise NotImplementedError

        def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
            return []

        def is_weighted(self) -> bool:
            return False

    model = nn.Sequential(nn.Sequential(OtherCollection()))
    with pytest.raises(ExportError, match="0.0: OtherCollection is not converted"):
        inference_model(model, "fp32")


@pytest.mark.slow
def test_docs_example_runs(tmp_path: Path) -> None:
    """docs/inference.md's worked example runs as written and finds what it prints."""
    doc = (Path(REPO) / "docs" / "inference.md").read_text()
    code = re.search(r"## A worked example.*?```python\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "example.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for line in ("TorchScript equal: True", "torch.export equal: True", "PredictModule equal: True"):
        assert line in run.stdout
