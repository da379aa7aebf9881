"""What our sharded collections hand TorchRec's stock sharded EBC: a stock EBC viewing their own
tables, and KJTs whose ids were remapped (with weights of our choosing) before ``input_dist``;
the features whose row-wise MEAN divisor to keep after it; and the per-value constants of a KJT
layout."""

from typing import Any, Dict, List, Optional, Sequence, TypeVar

import torch
from torch import nn
from torchrec.distributed.embedding_types import BaseEmbeddingSharder
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.types import ParameterSharding, ShardingEnv
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_memcom.distributed.state import copy_full_tensor

T = TypeVar("T")


def stock_view(
    configs: List[EmbeddingBagConfig], embedding_bags: nn.ModuleDict, device: torch.device, is_weighted: bool
) -> EmbeddingBagCollection:
    """A stock EBC over ``embedding_bags`` (shared, not copied), for the stock sharder."""
    view = EmbeddingBagCollection(configs, is_weighted=is_weighted, device=torch.device("meta"))
    view.embedding_bags = embedding_bags
    # the stock sharded EBC copies a module's values in when its `device` (a read-only property
    # over `_device`) is not the CPU: the view reports the tables' own device
    view._device = device
    return view


def shard_view(
    module: Any,
    is_weighted: bool,
    sharder: BaseEmbeddingSharder,
    plan: Dict[str, ParameterSharding],
    env: ShardingEnv,
    device: Optional[torch.device],
    module_fqn: Optional[str],
) -> ShardedEmbeddingBagCollection:
    """What ``sharder`` (the stock EBC sharder) makes of a collection's tables, its
    ``hashed_configs()`` over its ``embedding_bags``, holding the collection's values on every
    device (the stock sharded EBC copies them in only off the CPU)."""
    view = stock_view(module.hashed_configs(), module.embedding_bags, module.device, is_weighted)
    sharded = sharder.shard(view, plan, env, device, module_fqn)
    if module.device.type != "meta":
        state = sharded.state_dict()
        for name, bag in module.embedding_bags.items():
            copy_full_tensor(state[f"embedding_bags.{name}.weight"], bag.weight.detach())
    return sharded


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


def row_sharded_columns(sharded: ShardedEmbeddingBagCollection, device: torch.device) -> torch.Tensor:
    """Per output column of ``sharded``, whether its feature is row-sharded: the only ones whose
    MEAN divisor (``ctx.divisor``) should be their bag length.

    TorchRec 1.8.0's stock sharded EBC, when it holds a row-wise (or table-row-wise) MEAN
    table, divides every feature that is not row-sharded by its bag length too (it resets only
    row-sharded SUM features to 1), although table-, column-wise and data-parallel lookups pool
    in the kernel. Reads the stock module's private feature lists: TorchRec has no public ones.
    """
    row_sharded = {f for features in sharded._pooling_type_to_rs_features.values() for f in features}
    keep = [name in row_sharded for name in sharded._embedding_names]
    return torch.repeat_interleave(
        torch.tensor(keep, device=device), torch.tensor(sharded._embedding_dims, device=device)
    )


def repeat_per_key(per_key: Sequence[int], lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    """``per_key[i]`` repeated ``lengths[i]`` times, for all keys: one value per KJT value."""
    return torch.repeat_interleave(
        torch.tensor(per_key, dtype=torch.int64, device=device),
        torch.tensor(lengths, device=device),
        output_size=sum(lengths),
    )
