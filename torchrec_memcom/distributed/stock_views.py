"""What our sharded collections hand TorchRec's stock sharded EBC: a stock EBC viewing their own
tables, and KJTs whose ids were remapped (with weights of our choosing) before ``input_dist``."""

from typing import List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def stock_view(
    configs: List[EmbeddingBagConfig], embedding_bags: nn.ModuleDict, device: torch.device, is_weighted: bool
) -> EmbeddingBagCollection:
    """A stock EBC over ``embedding_bags`` (shared, not copied), for the stock sharder."""
    view = EmbeddingBagCollection(configs, is_weighted=is_weighted, device=torch.device("meta"))
    view.embedding_bags = embedding_bags
    view._device = device
    return view


def kjt_with(kjt: KeyedJaggedTensor, values: torch.Tensor, weights: Optional[torch.Tensor]) -> KeyedJaggedTensor:
    """``kjt`` with new values and weights, keeping its keys, lengths and batch layout."""
    return KeyedJaggedTensor(
        keys=kjt.keys(),
        values=values,
        weights=weights,
        lengths=kjt.lengths(),
        offsets=kjt.offsets_or_none(),
        stride=kjt.stride(),
        stride_per_key_per_rank=kjt.stride_per_key_per_rank() if kjt.variable_stride_per_key() else None,
        inverse_indices=kjt.inverse_indices_or_none(),
    )
