"""Unsharded QR collection: forward and gradients against a plain-PyTorch reference, sizes, errors;
its split and pooling steps (and the mixed collection's join) against their plain forms."""

import dataclasses
import math

import pytest
import torch
from conftest import assert_matches_reference, random_kjt, small_tables
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.modules.mixed_embedding_bag import MixedEmbeddingBagCollection, join_by_key
from torchrec_memcom.modules.qr_embedding_bag import (
    QRConfig,
    QREmbeddingBagCollection,
    QRLayout,
    pool_bags,
    qr_collection,
)


def _tables():
    """The shared small tables, one of them MEAN-pooled."""
    t0, t1, t2 = small_tables()
    return [t0, dataclasses.replace(t1, pooling=PoolingType.MEAN), t2]


def reference_forward(state, tables, module, kjt):
    """Pooled ``Q[i // c] * R[i % c]`` (or ``+``) per bag, 0 for empty bags, with Python loops."""
    out = {}
    by_name = {t.name: t for t in module.tables}
    d = kjt.to_dict()
    for cfg in tables:
        t = by_name[cfg.name]
        for f in cfg.feature_names:
            rows = []
            for ln, ids in zip(d[f].lengths().tolist(), d[f].to_dense()):
                bag = torch.zeros(cfg.embedding_dim)
                for i in ids.tolist():
                    if not t.compressed:
                        bag = bag + state[f"embeddings.{cfg.name}.weight"][i]
                        continue
                    q = state[f"embeddings.{cfg.name}@q.weight"][i // t.num_collisions]
                    r = state[f"embeddings.{cfg.name}@r.weight"][i % t.num_collisions]
                    bag = bag + (q * r if t.operation == "mult" else q + r)
                rows.append(bag / ln if cfg.pooling == PoolingType.MEAN and ln else bag)
            out[f] = torch.stack(rows)
    return out


@pytest.mark.parametrize("operation", ["mult", "add"])
def test_forward_and_gradients_match_reference(operation: str) -> None:
    torch.manual_seed(0)
    tables = _tables()
    module = QREmbeddingBagCollection(
        tables,
        {"t0": QRConfig(num_collisions=8, operation=operation), "t1": QRConfig(ratio=5, operation=operation)},
    )
    assert [t.num_collisions for t in module.tables] == [8, 74, 0]  # t1: ratio 5 needs c > sqrt(400)
    assert_matches_reference(module, tables, reference_forward)


def test_every_id_keeps_its_own_embedding() -> None:
    """Unlike hashing, no two ids share both their quotient and their remainder row."""
    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=97, feature_names=["f"])]
    module = QREmbeddingBagCollection(tables, QRConfig(num_collisions=10))
    ids = torch.arange(97)
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], ids, torch.ones(97, dtype=torch.int64))
    with torch.no_grad():
        e = module(kjt).values()
    assert torch.unique(e, dim=0).shape[0] == 97


def test_state_dict_keys_and_shapes() -> None:
    tables = small_tables()
    module = QREmbeddingBagCollection(tables, QRConfig(num_collisions=30, min_rows=100))
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "embeddings.t0@q.weight": (34, 8),  # ceil(1000 / 30)
        "embeddings.t0@r.weight": (30, 8),
        "embeddings.t1@q.weight": (14, 8),
        "embeddings.t1@r.weight": (30, 8),
        "embeddings.t2.weight": (60, 8),  # below min_rows: uncompressed
    }
    again = QREmbeddingBagCollection(tables, QRConfig(num_collisions=30, min_rows=100))
    again.load_state_dict(module.state_dict())
    kjt = random_kjt(tables, 4, seed=3)
    torch.testing.assert_close(again(kjt).values(), module(kjt).values())
    assert module.embedding_bag_configs() is tables
    assert not module.is_weighted() and module.device == torch.device("cpu")
    before = module.state_dict()["embeddings.t0@q.weight"].clone()
    module.reset_parameters()  # TorchRec's default init for the compressed table's own rows
    after = module.state_dict()["embeddings.t0@q.weight"]
    assert not torch.equal(before, after) and after.abs().max() <= (1 / 34) ** 0.5


@pytest.mark.parametrize(
    "n, ratio",
    [(100_000, 1), (100_000, 2), (100_000, 3.7), (100_000, 16), (100_000, 150), (10**7, 4.5), (1000, 4)],
)
def test_achieved_ratio_and_parameter_counts(n: int, ratio: float) -> None:
    tables = [EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=n, feature_names=["f"])]
    module = QREmbeddingBagCollection(tables, QRConfig(ratio=ratio), device=torch.device("meta"))
    cost = module.cost()
    d, c = 16, cost["t"]["c"]
    assert cost["t"]["quotient_rows"] == math.ceil(n / c)
    expected = (math.ceil(n / c) + c) * d
    assert cost["t"]["parameters"] == expected == sum(p.numel() for p in module.parameters())
    assert cost["t"]["ratio"] == pytest.approx(n * d / expected)
    assert abs(cost["t"]["ratio"] - ratio) <= 0.01 * ratio
    if float(ratio).is_integer() and 100 * ratio**2 <= n:  # c^2/n small: ratio = c (1 - c^2/n) ~ c
        assert c == ratio  # DLRM's convention: c ids per quotient row, ratio about c


def test_impossible_specs_error() -> None:
    tables = [EmbeddingBagConfig(name="tiny", embedding_dim=8, num_embeddings=100, feature_names=["f"])]
    with pytest.raises(
        ValueError, match=r"'tiny'.*ratio 6 cannot be reached with n=100: the most it gives is 5 \(c=10\)"
    ):
        QREmbeddingBagCollection(tables, QRConfig(ratio=6))
    with pytest.raises(
        ValueError, match=r"'tiny'.*ratio 3 cannot be reached within 1% with n=100 \(nearest: .*c=29 gives 3.03"
    ):
        QREmbeddingBagCollection(tables, QRConfig(ratio=3))
    with pytest.raises(ValueError, match=">= 1"):
        QRConfig(ratio=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        QRConfig(ratio=2, num_collisions=10)
    with pytest.raises(ValueError, match="operation must be one of"):
        QRConfig(ratio=2, operation="concat")
    with pytest.raises(ValueError, match="'tiny'.*num_collisions=200 exceeds its 100 rows"):
        QREmbeddingBagCollection(tables, QRConfig(num_collisions=200))
    with pytest.raises(ValueError, match="unknown tables"):
        QREmbeddingBagCollection(tables, {"nope": QRConfig(ratio=2)})
    wide = tables + [EmbeddingBagConfig(name="wide", embedding_dim=16, num_embeddings=100, feature_names=["g"])]
    with pytest.raises(ValueError, match="share one dim"):
        QREmbeddingBagCollection(wide, QRConfig(ratio=2))
    with pytest.raises(ValueError, match="feature 'f' is read by tables 'tiny' and 'again'"):
        QREmbeddingBagCollection(tables + [dataclasses.replace(tables[0], name="again")], QRConfig(ratio=2))


def test_qr_collection_splits_by_dim() -> None:
    tables = small_tables() + [
        EmbeddingBagConfig(name="wide", embedding_dim=16, num_embeddings=500, feature_names=["g"])
    ]
    module = qr_collection(tables, {"t0": QRConfig(num_collisions=8), "wide": QRConfig(ratio=2)})
    assert isinstance(module, MixedEmbeddingBagCollection)
    assert [type(c) for c in module.collections] == [QREmbeddingBagCollection] * 2
    out = module(random_kjt(tables, 5, seed=0)).to_dict()
    assert {f: tuple(v.shape) for f, v in out.items()} == {
        "f0": (5, 8),
        "f1": (5, 8),
        "f2": (5, 8),
        "f3": (5, 8),
        "g": (5, 16),
    }
    assert isinstance(qr_collection(small_tables(), QRConfig(ratio=2)), QREmbeddingBagCollection)
    with pytest.raises(ValueError, match="unknown tables"):
        qr_collection(tables, {"nope": QRConfig(ratio=2)})


@pytest.mark.parametrize("bad", [-1, 1000])
def test_bad_ids_name_the_feature(bad: int) -> None:
    tables = small_tables()
    module = QREmbeddingBagCollection(tables, QRConfig(num_collisions=8))
    kjt = random_kjt(tables, 3, seed=0)
    values = kjt.values().clone()
    values[int(kjt.length_per_key()[0]) - 1] = bad  # last id of f0
    broken = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), values, kjt.lengths())
    with pytest.raises(ValueError, match=f"feature 'f0': id {bad} is outside \\[0, 1000\\)"):
        module(broken)


def test_weighted_features_are_refused() -> None:
    tables = small_tables()
    module = QREmbeddingBagCollection(tables, QRConfig(num_collisions=8))
    kjt = random_kjt(tables, 3, seed=0)
    weighted = KeyedJaggedTensor.from_lengths_sync(
        kjt.keys(), kjt.values(), kjt.lengths(), weights=torch.ones(kjt.values().numel())
    )
    with pytest.raises(ValueError, match="unweighted"):
        module(weighted)


@pytest.mark.parametrize("max_len", [1, 4])
def test_pooling_equals_per_feature_segment_reduce(max_len: int) -> None:
    """``pool_bags`` (one id per bag: joined; ragged and empty bags: one index_add_) gives the
    bits of one ``segment_reduce`` per feature, SUM and MEAN, forward and backward."""
    g = torch.Generator().manual_seed(0)
    batch, dim, mean = 7, 4, [False, True, False]
    lengths = [
        torch.ones(batch, dtype=torch.int64) if max_len == 1 else torch.randint(0, max_len + 1, (batch,), generator=g)
        for _ in mean
    ]
    per_id = [torch.randn(int(n.sum()), dim, generator=g, requires_grad=True) for n in lengths]
    grad = torch.randn(batch, len(mean) * dim, generator=g)
    pooled = pool_bags(per_id, lengths, mean)
    reference = torch.cat(
        [
            torch.segment_reduce(v, "mean" if m else "sum", lengths=n, initial=0.0)
            for v, n, m in zip(per_id, lengths, mean)
        ],
        dim=1,
    )
    assert torch.equal(pooled, reference)
    assert all(
        torch.equal(a, b)
        for a, b in zip(torch.autograd.grad(pooled, per_id, grad), torch.autograd.grad(reference, per_id, grad))
    )


def test_split_takes_keys_in_any_order() -> None:
    """The lookup features in config order, ``f@q``/``f@r`` per compressed feature, whatever
    the input's key order; the same again from the cached layout."""
    tables = small_tables()
    layout = QRLayout(tables, {"t0": QRConfig(num_collisions=8), "t2": QRConfig(num_collisions=7)})
    kjt = random_kjt(tables, 5, seed=3)
    shuffled = kjt.permute([3, 1, 0, 2])
    for features in (kjt, shuffled, shuffled):
        split = layout.split(features)
        assert split.keys() == ["f0@q", "f0@r", "f1", "f2@q", "f2@r", "f3@q", "f3@r"]
        assert split.stride() == 5
        d, ids = split.to_dict(), kjt.to_dict()
        for f, c in (("f0", 8), ("f2", 7), ("f3", 7)):
            assert torch.equal(d[f"{f}@q"].values(), ids[f].values() // c)
            assert torch.equal(d[f"{f}@r"].values(), ids[f].values() % c)
            assert torch.equal(d[f"{f}@q"].lengths(), ids[f].lengths())
        assert torch.equal(d["f1"].values(), ids["f1"].values())
        assert torch.equal(d["f1"].lengths(), ids["f1"].lengths())


def test_join_by_key_equals_regroup() -> None:
    """The mixed collection's join: ``KeyedTensor.regroup``'s values and gradients."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 8, generator=g, requires_grad=True)
    b = torch.randn(3, 4, generator=g, requires_grad=True)
    outputs = [KeyedTensor(["x", "z"], [5, 3], a), KeyedTensor(["y"], [4], b)]
    keys, dims = ["z", "y", "x"], [3, 4, 5]
    joined = join_by_key(outputs, keys, dims)
    reference = KeyedTensor.regroup(outputs, [keys])[0]
    assert joined.keys() == keys and joined.length_per_key() == dims
    assert torch.equal(joined.values(), reference)
    grad = torch.randn(3, 12, generator=g)
    assert all(
        torch.equal(x, y)
        for x, y in zip(
            torch.autograd.grad(joined.values(), [a, b], grad), torch.autograd.grad(reference, [a, b], grad)
        )
    )
