"""compress() keeps what the user set for the sparse optimizer: optimizers attached in backward
to the stock tables move to the new tables, refused with the fix where they cannot; the fused
params reach every sharder returned, TorchRec's stock ones too."""

import pytest
import torch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from torchrec_memcom import CompressionSpec, compress

TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=1000, feature_names=["f0"]),
    EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=50, feature_names=["f1"]),
]
SPECS = {
    "memcom": {"ratio": 4},
    "hash": {"ratio": 4},
    "qr": {"num_collisions": 4},
}


def _dlrm() -> DLRM:
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(TABLES, device=torch.device("meta")),
        dense_in_features=3,
        dense_arch_layer_sizes=[8],
        over_arch_layer_sizes=[4, 1],
    )


@pytest.mark.parametrize("method", list(SPECS))
def test_optimizer_attached_before_compress_moves_to_every_new_table_parameter(method: str) -> None:
    model = _dlrm()
    apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": 0.3, "eps": 1e-6})
    model, _ = compress(model, CompressionSpec(method=method, params=SPECS[method], min_rows=100))
    params = dict(model.sparse_arch.named_parameters())
    assert any(p.shape[0] < 1000 for p in params.values())  # new tensors of the compressed t0
    for name, p in params.items():
        assert p._optimizer_classes == [RowWiseAdagrad], name
        assert p._optimizer_kwargs == [{"lr": 0.3, "eps": 1e-6}], name


def test_what_cannot_be_carried_is_refused_naming_the_fix() -> None:
    model = _dlrm()
    apply_optimizer_in_backward(torch.optim.Adam, model.sparse_arch.parameters(), {"lr": 0.1})
    with pytest.raises(ValueError, match=r"table 't0'.*SGD, Adagrad or RowWiseAdagrad.*Adam"):
        compress(model, CompressionSpec(method="memcom", params={"ratio": 4}, min_rows=100))
    model = _dlrm()
    apply_optimizer_in_backward(torch.optim.SGD, model.sparse_arch.parameters(), {"lr": 0.1, "momentum": 0.9})
    with pytest.raises(ValueError, match=r"table 't0'.*unsupported optimizer options \{'momentum': 0.9\}"):
        compress(model, CompressionSpec(method="memcom", params={"ratio": 4}, min_rows=100))
    model = _dlrm()
    for _ in range(2):
        apply_optimizer_in_backward(torch.optim.SGD, model.sparse_arch.parameters(), {"lr": 0.1})
    with pytest.raises(ValueError, match=r"table 't0' has 2 optimizers.*apply one, or apply them after compress"):
        compress(model, CompressionSpec(method="hash", params={"ratio": 4}, min_rows=100))


def test_fused_params_reach_every_sharder_returned() -> None:
    fused = {"learning_rate": 0.3}
    _, sharders = compress(
        _dlrm(), CompressionSpec(method="qr", params={"num_collisions": 4}, min_rows=100), fused_params=fused
    )
    # DMP picks one sharder per module type: ours, then every stock one get_default_sharders() has
    assert {s.module_type for s in sharders} >= {s.module_type for s in get_default_sharders()}
    stock = next(s for s in sharders if type(s) is EmbeddingBagCollectionSharder)
    assert stock.fused_params == fused
    training = [s for s in sharders if "Quant" not in type(s).__name__]
    for s in training:
        inner = getattr(s, "_ebc_sharder", None) or getattr(s, "_e_sharder", None) or s
        assert inner.fused_params == fused, type(s).__name__
