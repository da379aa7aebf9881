"""Unsharded hash collection: forward and gradients against a plain-PyTorch reference, sizes, errors."""

import dataclasses

import pytest
import torch
from conftest import assert_matches_reference, random_kjt, small_tables
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_memcom.modules.hash_embedding_bag import HashConfig, HashEmbeddingBagCollection
from torchrec_memcom.modules.hashing import slots


def _tables():
    """The shared small tables, one of them MEAN-pooled."""
    t0, t1, t2 = small_tables()
    return [t0, dataclasses.replace(t1, pooling=PoolingType.MEAN), t2]


def reference_forward(state, tables, module, kjt):
    """Pooled ``W[slot(i) % m]`` per bag (sum or mean; 0 for empty bags), with Python loops."""
    out = {}
    by_name = {t.name: t for t in module.tables}
    d = kjt.to_dict()
    for cfg in tables:
        t = by_name[cfg.name]
        W = state[f"embedding_bags.{cfg.name}.weight"]
        for f in cfg.feature_names:
            rows = []
            for ln, ids in zip(d[f].lengths().tolist(), d[f].to_dense()):
                bag = torch.zeros(cfg.embedding_dim)
                for i in ids.tolist():
                    row = int(slots(torch.tensor([i]), t.num_embeddings, t.hash)) % t.hash_rows if t.compressed else i
                    bag = bag + W[row]
                rows.append(bag / ln if cfg.pooling == PoolingType.MEAN and ln else bag)
            out[f] = torch.stack(rows)
    return out


@pytest.mark.parametrize("hash", ["mod", "mix"])
def test_forward_and_gradients_match_reference(hash: str) -> None:
    torch.manual_seed(0)
    tables = _tables()
    module = HashEmbeddingBagCollection(
        tables, {"t0": HashConfig(ratio=4, hash=hash), "t1": HashConfig(num_hash_rows=37, hash=hash)}
    )
    assert_matches_reference(module, tables, reference_forward)


def test_state_dict_keys_and_shapes() -> None:
    tables = small_tables()
    module = HashEmbeddingBagCollection(tables, HashConfig(ratio=4, min_rows=100))
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "embedding_bags.t0.weight": (250, 8),
        "embedding_bags.t1.weight": (100, 8),
        "embedding_bags.t2.weight": (60, 8),  # below min_rows: uncompressed
    }
    again = HashEmbeddingBagCollection(small_tables(), HashConfig(ratio=4, min_rows=100))
    again.load_state_dict(module.state_dict())
    kjt = random_kjt(small_tables(), 4, seed=3)
    torch.testing.assert_close(again(kjt).values(), module(kjt).values())
    assert module.embedding_bag_configs() is tables
    assert not module.is_weighted() and module.device == torch.device("cpu")
    before = module.state_dict()["embedding_bags.t0.weight"].clone()
    module.reset_parameters()  # TorchRec's default init for the compressed table's own rows
    after = module.state_dict()["embedding_bags.t0.weight"]
    assert not torch.equal(before, after) and after.abs().max() <= (1 / 250) ** 0.5


@pytest.mark.parametrize("ratio", [1, 1.5, 2, 4, 7.9, 16, 100, 1000])
def test_achieved_ratio_and_parameter_counts(ratio: float) -> None:
    tables = [EmbeddingBagConfig(name="t", embedding_dim=32, num_embeddings=100_000, feature_names=["f"])]
    module = HashEmbeddingBagCollection(tables, HashConfig(ratio=ratio), device=torch.device("meta"))
    cost = module.cost()
    n, d, m = 100_000, 32, cost["t"]["m"]
    assert cost["t"]["parameters"] == m * d == sum(p.numel() for p in module.parameters())
    assert cost["t"]["ratio"] == pytest.approx(n / m)
    assert abs(cost["t"]["ratio"] - ratio) <= 0.01 * ratio
    assert cost["total"]["ratio"] == pytest.approx(cost["t"]["ratio"])


def test_impossible_specs_error() -> None:
    tables = [EmbeddingBagConfig(name="tiny", embedding_dim=8, num_embeddings=100, feature_names=["f"])]
    with pytest.raises(ValueError, match=r"'tiny'.*within 1% with n=100 \(closest: m=13 gives 7.692\)"):
        HashEmbeddingBagCollection(tables, HashConfig(ratio=7.99))
    with pytest.raises(ValueError, match=">= 1"):
        HashConfig(ratio=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        HashConfig(ratio=2, num_hash_rows=10)
    with pytest.raises(ValueError, match="exactly one"):
        HashConfig()
    with pytest.raises(ValueError, match="hash must be one of"):
        HashConfig(ratio=2, hash="crc")
    with pytest.raises(ValueError, match="'tiny'.*exceeds its 100 rows"):
        HashEmbeddingBagCollection(tables, HashConfig(num_hash_rows=200))
    with pytest.raises(ValueError, match="unknown tables"):
        HashEmbeddingBagCollection(tables, {"nope": HashConfig(ratio=2)})
    shared = tables + [EmbeddingBagConfig(name="other", embedding_dim=8, num_embeddings=10, feature_names=["f"])]
    with pytest.raises(ValueError, match="feature 'f' is read by tables 'tiny' and 'other'"):
        HashEmbeddingBagCollection(shared, HashConfig(ratio=2))


@pytest.mark.parametrize("bad", [-1, 1000])
def test_bad_ids_name_the_feature(bad: int) -> None:
    tables = small_tables()
    module = HashEmbeddingBagCollection(tables, HashConfig(ratio=4, min_rows=100))
    kjt = random_kjt(tables, 3, seed=0)
    values = kjt.values().clone()
    values[int(kjt.length_per_key()[0]) - 1] = bad  # last id of f0
    broken = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), values, kjt.lengths())
    with pytest.raises(ValueError, match=f"feature 'f0': id {bad} is outside \\[0, 1000\\)"):
        module(broken)


def test_weighted_features_are_refused() -> None:
    tables = small_tables()
    module = HashEmbeddingBagCollection(tables, HashConfig(ratio=4))
    kjt = random_kjt(tables, 3, seed=0)
    weighted = KeyedJaggedTensor.from_lengths_sync(
        kjt.keys(), kjt.values(), kjt.lengths(), weights=torch.ones(kjt.values().numel())
    )
    with pytest.raises(ValueError, match="unweighted"):
        module(weighted)
