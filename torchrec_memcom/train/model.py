"""The DLRM of a run config, compressed as its `embeddings.compression` block says."""

import re
from typing import Dict, List, Tuple

import torch
from torch import nn
from torchrec.distributed.types import ModuleSharder
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from torchrec_memcom.compression import compress, table_parameters
from torchrec_memcom.data.schema import CAT_NAMES, INT_NAMES
from torchrec_memcom.train.config import RunConfig

SPARSE_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
}


def table_configs(dim: int, num_embeddings: List[int]) -> List[EmbeddingBagConfig]:
    """One table per Criteo categorical feature, named ``t_<feature>``."""
    if len(num_embeddings) != len(CAT_NAMES):
        raise ValueError(
            f"embeddings.num_embeddings: expected {len(CAT_NAMES)} sizes, got {len(num_embeddings)}"
        )
    return [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=n, feature_names=[f])
        for f, n in zip(CAT_NAMES, num_embeddings)
    ]


def build_model(
    config: RunConfig, num_embeddings: List[int], device: torch.device
) -> Tuple[DLRMTrain, List[ModuleSharder]]:
    """DLRMTrain with its tables on ``meta`` (DMP materialises them where the plan puts them),
    the sparse optimizer attached for FBGEMM to fuse, and the sharders DMP needs."""
    tables = table_configs(config.embeddings.dim, num_embeddings)
    ebc = EmbeddingBagCollection(tables, device=torch.device("meta"))
    m = config.model
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=len(INT_NAMES),
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
