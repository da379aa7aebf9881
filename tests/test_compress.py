"""compress(): swapping compressed collections into an existing TorchRec model."""

import dataclasses

import pytest
import torch
from conftest import random_kjt, small_tables
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_memcom import (
    CompressionSpec,
    HashConfig,
    MEmComConfig,
    MEmComEmbeddingBagCollection,
    MEmComEmbeddingBagCollectionSharder,
    QRConfig,
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


def test_per_table_overrides_across_the_collections_of_a_model() -> None:
    """A model with two EBCs (two towers): each override reaches the collection holding its
    table; a name no collection holds is still refused."""
    user = [
        dataclasses.replace(t, name=f"u_{t.name}", feature_names=[f"u_{f}" for f in t.feature_names])
        for t in small_tables()
    ]
    towers = torch.nn.ModuleDict({"user": EmbeddingBagCollection(user), "item": EmbeddingBagCollection(small_tables())})
    spec = CompressionSpec(tables={"u_t0": MEmComConfig(ratio=4), "t1": HashConfig(ratio=4)})
    model, sharders = compress(towers, spec)
    assert type(model["user"]) is MEmComEmbeddingBagCollection
    assert {t.name for t in model["user"].tables if t.compressed} == {"u_t0"}
    assert type(model["item"]).__name__ == "HashEmbeddingBagCollection"
    assert {t.name: t.ratio > 1 for t in model["item"].tables} == {"t0": False, "t1": True, "t2": False}
    assert MEmComEmbeddingBagCollectionSharder in [type(s) for s in sharders]
    for name, tower in (("user", user), ("item", small_tables())):
        assert model[name](random_kjt(tower, batch=3, seed=1)).keys() == [f for t in tower for f in t.feature_names]
    with pytest.raises(ValueError, match=r"unknown tables: \['t9'\]"):
        compress(
            torch.nn.ModuleDict({"a": EmbeddingBagCollection(small_tables())}),
            CompressionSpec(tables={"t0": HashConfig(ratio=4), "t9": HashConfig(ratio=4)}),
        )


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


def test_uncompressed_tables_keep_their_trained_weights() -> None:
    """compress() of a trained model keeps every table it does not compress: the same
    EmbeddingBag (weights, device, dtype, attached optimizer), inside any collection it builds."""
    for spec in (
        CompressionSpec(method="memcom", params={"ratio": 4}, min_rows=100),  # t2 inside MEmCom
        CompressionSpec(method="qr", params=QRConfig(num_collisions=8), min_rows=100),  # mixed
        CompressionSpec(tables={"t0": HashConfig(ratio=4)}),  # t1, t2 in the plain child
    ):
        model = _dlrm()
        before = {n: b for n, b in model.sparse_arch.embedding_bag_collection.embedding_bags.items()}
        values = {n: b.weight.detach().clone() for n, b in before.items()}
        model, _ = compress(model, spec)
        state = model.sparse_arch.embedding_bag_collection.state_dict()
        kept = [c for c in small_tables() if spec.for_table(c).method == "none"]
        assert kept
        for cfg in kept:
            key = next(k for k in state if k.endswith(f"embedding_bags.{cfg.name}.weight"))
            torch.testing.assert_close(state[key], values[cfg.name])
            owner = model.sparse_arch.embedding_bag_collection
            assert any(m is before[cfg.name] for m in owner.modules()), cfg.name
    untouched = _dlrm()
    ebc = untouched.sparse_arch.embedding_bag_collection
    assert (
        compress(untouched, CompressionSpec(min_rows=10**6, method="hash", params={"ratio": 2}))[
            0
        ].sparse_arch.embedding_bag_collection
        is ebc
    )


def test_fp16_tables_run_unsharded() -> None:
    tables = [dataclasses.replace(t, data_type=DataType.FP16) for t in small_tables()]
    ebc = MEmComEmbeddingBagCollection(tables, MEmComConfig(num_hash_rows=20))
    kjt = random_kjt(tables, batch=4, seed=0)
    out = ebc(kjt).to_dict()
    for cfg, t in zip(tables, ebc.tables):
        w = ebc.embedding_bags[t.name].weight.float()
        jt = kjt.to_dict()[cfg.feature_names[0]]
        s = ebc.entity_weights.flat(t.name)[jt.values()].half().float()
        expected = torch.stack(
            [
                (w[i % 20] * s[o:e, None]).sum(0)
                for i, o, e in [(jt.values()[a:b], a, b) for a, b in zip(jt.offsets()[:-1], jt.offsets()[1:])]
            ]
        )
        torch.testing.assert_close(out[cfg.feature_names[0]], expected, atol=1e-2, rtol=1e-2)
    ebc(kjt).values().sum().backward()
    assert all(w.grad is not None for w in ebc.entity_weights.values())


class MyEBC(EmbeddingBagCollection):
    """A user's own EBC with code of its own."""


def test_subclass_is_refused_when_compressed_and_left_alone_otherwise() -> None:
    model = _dlrm()
    model.sparse_arch.embedding_bag_collection = MyEBC(small_tables())
    with pytest.raises(ValueError, match=r"sparse_arch.embedding_bag_collection is a MyEBC, a subclass"):
        compress(model, CompressionSpec(method="memcom", params={"ratio": 2}))
    kept, _ = compress(model, CompressionSpec(method="memcom", params={"ratio": 2}, min_rows=10**6))
    assert type(kept.sparse_arch.embedding_bag_collection) is MyEBC


def test_spec_takes_config_objects_and_checks_when_built() -> None:
    spec = CompressionSpec(
        params=MEmComConfig(ratio=4), tables={"t1": HashConfig(ratio=4), "t2": TableCompression("none")}
    )
    assert spec.method == "memcom" and spec.tables["t1"].method == "hash"
    assert spec.tables["t1"].params["ratio"] == 4
    as_dicts = CompressionSpec(
        method="memcom",
        params={"ratio": 4},
        tables={"t1": {"method": "hash", "params": {"ratio": 4}}, "t2": {"method": "none"}},
    )
    models = [compress(_dlrm(), s)[0].sparse_arch.embedding_bag_collection for s in (spec, as_dicts)]
    assert [type(c) for c in models[0].collections] == [type(c) for c in models[1].collections]
    with pytest.raises(ValueError, match=r"compression.params.ratoi: unknown key"):
        CompressionSpec(method="memcom", params={"ratoi": 4})
    with pytest.raises(ValueError, match=r"compression.tables.t1.params: MEmComConfig.ratio must be >= 1"):
        CompressionSpec(tables={"t1": TableCompression("memcom", {"ratio": 0.5})})
    with pytest.raises(ValueError, match=r"a HashConfig is method 'hash', not 'memcom'"):
        CompressionSpec(method="memcom", params=HashConfig(ratio=2))
    with pytest.raises(ValueError, match=r"compression.params: budget ratio must be >= 1"):
        CompressionSpec(method="budgeted", params={"budget_ratio": 0.5})


def test_budgeted_takes_frequency_tensors() -> None:
    counts = {t.name: torch.arange(t.num_embeddings, 0, -1) for t in small_tables()[:2]}
    spec = CompressionSpec(method="budgeted", params={"budget_ratio": 1.5, "frequencies": counts}, min_rows=100)
    ebc = compress(_dlrm(), spec)[0].sparse_arch.embedding_bag_collection
    budgeted = ebc.collections[0]
    assert [t.name for t in budgeted.tables] == ["t0", "t1"]
    assert budgeted.cost()["total"]["bytes"] <= budgeted.budget_limit


def test_unsharded_collection_given_weights_names_the_fix() -> None:
    """What an unsharded compressed collection under DMP would see: the error says what to do."""
    ebc = MEmComEmbeddingBagCollection(small_tables(), MEmComConfig(num_hash_rows=20))
    kjt = random_kjt(small_tables(), batch=2, seed=0)
    weighted = KeyedJaggedTensor(kjt.keys(), kjt.values(), torch.ones(kjt.values().shape), lengths=kjt.lengths())
    with pytest.raises(ValueError, match="give the sharders compress\\(\\) returns to both the planner and"):
        ebc(weighted)
