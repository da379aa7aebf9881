"""Unsharded MEmCom collection: forward and gradients against a plain-PyTorch reference."""

import dataclasses

import pytest
import torch
from conftest import assert_matches_reference, random_kjt, small_tables
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from torchrec_memcom import MEmComConfig, MEmComEmbeddingBagCollection
from torchrec_memcom.modules.hashing import slots
from torchrec_memcom.modules.sorting import stable_argsort


def reference_forward(state, tables, module, kjt):
    """Pooled ``sum_j U[slot(i_j) % m] * w[slot(i_j)]`` per bag, with Python loops."""
    out = {}
    by_name = {t.name: t for t in module.tables}
    d = kjt.to_dict()
    for cfg in tables:
        t = by_name[cfg.name]
        U = state[f"embedding_bags.{cfg.name}.weight"]
        for f in cfg.feature_names:
            rows = []
            for ids in d[f].to_dense():
                bag = torch.zeros(cfg.embedding_dim)
                for i in ids.tolist():
                    if t.compressed:
                        s = int(slots(torch.tensor([i]), t.num_embeddings, t.hash))
                        bag = bag + U[s % t.hash_rows] * state[f"entity_weights.{cfg.name}"][s]
                    else:
                        bag = bag + U[i]
                rows.append(bag)
            out[f] = torch.stack(rows)
    return out


@pytest.mark.parametrize("hash", ["mod", "mix"])
def test_forward_and_gradients_match_reference(hash: str) -> None:
    torch.manual_seed(0)
    tables = small_tables()
    module = MEmComEmbeddingBagCollection(
        tables, {"t0": MEmComConfig(ratio=4, hash=hash), "t1": MEmComConfig(num_hash_rows=37, hash=hash)}
    )
    with torch.no_grad():
        for w in module.entity_weights.values():
            w.uniform_(0.5, 1.5)
    assert_matches_reference(module, tables, reference_forward)


def test_state_dict_keys_and_shapes() -> None:
    module = MEmComEmbeddingBagCollection(small_tables(), MEmComConfig(ratio=4, min_rows=100))
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    m0, m1 = module.tables[0].hash_rows, module.tables[1].hash_rows
    assert shapes == {
        "embedding_bags.t0.weight": (m0, 8),
        "embedding_bags.t1.weight": (m1, 8),
        "embedding_bags.t2.weight": (60, 8),  # below min_rows: uncompressed, no scalars
        "entity_weights.t0": (1000,),
        "entity_weights.t1": (400,),
    }
    again = MEmComEmbeddingBagCollection(small_tables(), MEmComConfig(ratio=4, min_rows=100))
    again.load_state_dict(module.state_dict())
    kjt = random_kjt(small_tables(), 4, seed=3)
    torch.testing.assert_close(again(kjt).values(), module(kjt).values())


def test_shared_tables_keep_a_users_init_fn() -> None:
    """A user's init_fn initialises the shared table; TorchRec's default is redone for m rows."""
    tables = small_tables()
    tables[0] = dataclasses.replace(tables[0], init_fn=lambda w: torch.nn.init.constant_(w, 0.25))
    module = MEmComEmbeddingBagCollection(tables, MEmComConfig(ratio=4, min_rows=100))
    assert torch.all(module.embedding_bags["t0"].weight == 0.25)
    m = module.tables[1].hash_rows
    bound = (1 / m) ** 0.5  # TorchRec's default bound for a table of m rows
    w1 = module.embedding_bags["t1"].weight
    assert w1.abs().max() <= bound and w1.abs().max() > (1 / 400) ** 0.5


@pytest.mark.parametrize("ratio", [1.5, 2, 4, 7.9, 16, 30])
def test_achieved_ratio_and_parameter_counts(ratio: float) -> None:
    tables = [EmbeddingBagConfig(name="t", embedding_dim=32, num_embeddings=100_000, feature_names=["f"])]
    module = MEmComEmbeddingBagCollection(tables, MEmComConfig(ratio=ratio), device=torch.device("meta"))
    cost = module.cost()
    held = sum(p.numel() for p in module.parameters())  # what the module holds, counted
    assert cost["t"]["parameters"] == held
    assert cost["t"]["ratio"] == pytest.approx(100_000 * 32 / held)
    assert abs(cost["t"]["ratio"] - ratio) <= 0.01 * ratio
    assert cost["total"]["ratio"] == pytest.approx(cost["t"]["ratio"])


def test_impossible_ratios_error() -> None:
    tables = [EmbeddingBagConfig(name="wide", embedding_dim=8, num_embeddings=1000, feature_names=["f"])]
    with pytest.raises(ValueError, match="'wide'.*cannot be reached with dim 8"):
        MEmComEmbeddingBagCollection(tables, MEmComConfig(ratio=8))
    tiny = [EmbeddingBagConfig(name="tiny", embedding_dim=8, num_embeddings=100, feature_names=["f"])]
    with pytest.raises(ValueError, match="'tiny'.*within 1%"):
        MEmComEmbeddingBagCollection(tiny, MEmComConfig(ratio=7.99))  # would need m < 1
    with pytest.raises(ValueError, match=">= 1"):
        MEmComConfig(ratio=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        MEmComConfig(ratio=2, num_hash_rows=10)
    with pytest.raises(ValueError, match="exceeds"):
        MEmComEmbeddingBagCollection(tables, MEmComConfig(num_hash_rows=2000))
    with pytest.raises(ValueError, match="unknown tables"):
        MEmComEmbeddingBagCollection(tables, {"nope": MEmComConfig(ratio=2)})
    mean = [
        EmbeddingBagConfig(name="m", embedding_dim=8, num_embeddings=100, feature_names=["f"], pooling=PoolingType.MEAN)
    ]
    with pytest.raises(ValueError, match="'m'.*SUM"):
        MEmComEmbeddingBagCollection(mean, MEmComConfig(ratio=2))


@pytest.mark.parametrize("bad", [-1, 1000])
def test_bad_ids_name_the_feature(bad: int) -> None:
    tables = small_tables()
    module = MEmComEmbeddingBagCollection(tables, MEmComConfig(ratio=4, min_rows=100))
    kjt = random_kjt(tables, 3, seed=0)
    values = kjt.values().clone()
    values[int(kjt.length_per_key()[0]) - 1] = bad  # last id of f0
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    broken = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), values, kjt.lengths())
    with pytest.raises(ValueError, match=f"feature 'f0': id {bad} is outside \\[0, 1000\\)"):
        module(broken)


@pytest.mark.parametrize("n", [1, 7, 64, 1000, 4099])
def test_mix_hash_is_a_bijection_that_spreads_structured_ids(n: int) -> None:
    s = slots(torch.arange(n), n, "mix")
    assert sorted(s.tolist()) == list(range(n))
    if n >= 1000:
        m = 50
        multiples = torch.arange(0, n, m)  # every id lands on row 0 under "mod"
        rows = slots(multiples, n, "mix") % m
        # about as many distinct rows as random placement gives (birthday collisions aside)
        assert rows.unique().numel() >= min(multiples.numel(), m) // 2


@pytest.mark.parametrize("n", [0, 1, 5000])
def test_stable_argsort_equals_torch(n: int) -> None:
    """The CPU fast path (numpy) gives exactly what torch's own stable sort gives."""
    x = torch.randint(0, max(n // 10, 1), (n,))
    assert torch.equal(stable_argsort(x), torch.sort(x, stable=True).indices)
