"""The DLRM of a run config, compressed as its `embeddings.compression` block says."""

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.distributed.types import ModuleSharder
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from torchrec_memcom.compression import compress, table_parameters
from torchrec_memcom.data.schema import Features
from torchrec_memcom.train.config import RunConfig

SPARSE_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
}


def table_configs(
    dim: int, num_embeddings: List[int], features: Optional[Sequence[str]] = None
) -> List[EmbeddingBagConfig]:
    """One table per categorical feature (default: Criteo's), named ``t_<feature>``; SUM pooling,
    which sums a multi-hot feature's bag."""
    features = list(features if features is not None else Features().sparse)
    if len(num_embeddings) != len(features):
        raise ValueError(f"embeddings.num_embeddings: expected {len(features)} sizes, got {len(num_embeddings)}")
    return [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=n, feature_names=[f])
        for f, n in zip(features, num_embeddings)
    ]


def build_model(
    config: RunConfig, num_embeddings: List[int], device: torch.device, features: Optional[Features] = None
) -> Tuple[DLRMTrain, List[ModuleSharder]]:
    """DLRMTrain over the data's ``features`` (default: Criteo's) with its tables on ``meta`` (DMP
    materialises them where the plan puts them), the sparse optimizer attached for FBGEMM to
    fuse, and the sharders DMP needs."""
    features = features or Features()
    tables = table_configs(config.embeddings.dim, num_embeddings, features.sparse)
    ebc = EmbeddingBagCollection(tables, device=torch.device("meta"))
    m = config.model
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=len(features.dense),
        dense_arch_layer_sizes=m.dense_arch_layer_sizes + [config.embeddings.dim],
        over_arch_layer_sizes=m.over_arch_layer_sizes,
        dense_device=device,
    )
    dlrm = (
        DLRM(**common)
        if m.arch == "DLRM"
        else DLRM_DCN(**common, dcn_num_layers=m.dcn_num_layers, dcn_low_rank_dim=m.dcn_low_rank_dim)
    )
    model, sharders = compress(DLRMTrain(dlrm), config.embeddings.compression)
    sparse = config.optimizer.sparse
    kwargs = {"lr": sparse.lr} if sparse.type == "sgd" else {"lr": sparse.lr, "eps": sparse.eps}
    # the tables' parameters (per-entity scalars take their table's rule; not the dense projections)
    table_params = [p for params in table_parameters(model).values() for _, p in params]
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[sparse.type], table_params, kwargs)
    return model, sharders


def embedding_bytes(collection: nn.Module, tables: List[str]) -> Dict[str, int]:
    """Parameter bytes of each table's state (all its tensors, global shapes), by table name."""
    out = {t: 0 for t in tables}
    names = set(tables)
    for key, value in collection.state_dict().items():
        owner = next((p.split("@")[0] for p in re.split(r"\.", key) if p.split("@")[0] in names), None)
        if owner is None:
            raise ValueError(f"cannot tell which table state {key!r} belongs to")
        out[owner] += value.numel() * value.element_size()
    return out
