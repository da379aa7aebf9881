"""compress(): swapping compressed collections into an existing TorchRec model."""

import pytest
import torch
from conftest import random_kjt, small_tables
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_memcom import (
    CompressionSpec,
    MEmComEmbeddingBagCollection,
    MEmComEmbeddingBagCollectionSharder,
    TableCompression,
    compress,
)


def _dlrm() -> DLRM:
    torch.manual_seed(0)
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(small_tables()),
        dense_in_features=5,
        dense_arch_layer_sizes=[8, 8],
        over_arch_layer_sizes=[8, 1],
    )


def test_swap_keeps_every_feature_and_output_shape() -> None:
    model = _dlrm()
    kjt = random_kjt(small_tables(), batch=6, seed=0)
    dense = torch.randn(6, 5)
    before_keys = model.sparse_arch.embedding_bag_collection(kjt).keys()
    before = model(dense, kjt)
    spec = CompressionSpec(method="memcom", params={"ratio": 4}, min_rows=100)
    model, sharders = compress(model, spec)
    ebc = model.sparse_arch.embedding_bag_collection
    assert type(ebc) is MEmComEmbeddingBagCollection
    assert [t.compressed for t in ebc.tables] == [True, True, False]  # t2 has 60 rows
    assert ebc(kjt).keys() == before_keys
    assert model(dense, kjt).shape == before.shape
    types = [type(s) for s in sharders]
    assert MEmComEmbeddingBagCollectionSharder in types and EmbeddingBagCollectionSharder in types
    loss = model(dense, kjt).sum()
    loss.backward()
    assert all(p.grad is not None for p in ebc.entity_weights.values())


def test_per_table_overrides_and_leave_alone() -> None:
    spec = CompressionSpec(
        method="memcom",
        params={"num_hash_rows": 15},
        tables={
            "t0": TableCompression("memcom", {"ratio": 2}),
            "t1": TableCompression("none"),
        },
    )
    model, _ = compress(_dlrm(), spec)
    ebc = model.sparse_arch.embedding_bag_collection
    ratios = {t.name: t.ratio for t in ebc.tables}
    assert ratios["t0"] == pytest.approx(2, rel=0.01)
    assert ratios["t1"] == 1.0
    assert ratios["t2"] == pytest.approx(60 * 8 / (15 * 8 + 60))  # the default method and params


def test_nothing_to_compress_keeps_the_stock_collection() -> None:
    model, sharders = compress(_dlrm(), CompressionSpec())
    assert type(model.sparse_arch.embedding_bag_collection) is EmbeddingBagCollection
    assert not any(isinstance(s, MEmComEmbeddingBagCollectionSharder) for s in sharders)


def test_bad_specs_error_clearly() -> None:
    with pytest.raises(ValueError, match="unknown method 'zip'"):
        CompressionSpec(method="zip")
    with pytest.raises(ValueError, match=r"tables.t9.method: unknown method"):
        CompressionSpec(tables={"t9": TableCompression("zip")})
    with pytest.raises(ValueError, match="unknown tables: \\['nope'\\]"):
        compress(_dlrm(), CompressionSpec(tables={"nope": TableCompression("none")}))
    with pytest.raises(ValueError, match="wrap a bare EBC"):
        compress(EmbeddingBagCollection(small_tables()), CompressionSpec())
    weighted = _dlrm()
    weighted.sparse_arch.embedding_bag_collection = EmbeddingBagCollection(small_tables(), is_weighted=True)
    with pytest.raises(ValueError, match="weighted EmbeddingBagCollection"):
        compress(weighted, CompressionSpec(method="memcom", params={"ratio": 2}))


def test_dlrm_with_memcom_tables_learns() -> None:
    """Unsharded: labels that depend on one feature's ids are learned through MEmCom rows."""
    torch.manual_seed(0)
    model, _ = compress(_dlrm(), CompressionSpec(method="memcom", params={"ratio": 4}, min_rows=100))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    tables = small_tables()
    losses = []
    for step in range(60):
        kjt = random_kjt(tables, batch=64, seed=step, max_len=1)
        first = kjt.to_dict()["f0"]
        labels = torch.zeros(64)
        labels[(first.lengths() > 0).nonzero().squeeze(1)] = (first.values() % 2 == 0).float()
        logits = model(torch.randn(64, 5), kjt).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
