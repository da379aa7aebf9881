"""The sharder shape all our EBC-like collections share: the stock EBC sharder, pointed at our
unsharded and sharded module types (DMP picks sharders by exact module type); and which FBGEMM
optimizer their sharding fuses into a table."""

from typing import Any, Dict, Optional, Type

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder, ShardedEmbeddingBagCollection
from torchrec.distributed.types import ParameterSharding, ShardingEnv
from torchrec.distributed.utils import optimizer_type_to_emb_opt_type


class CollectionSharder(EmbeddingBagCollectionSharder):
    """Subclasses name ``unsharded`` and ``sharded``; the sharded type takes the stock
    ShardedEmbeddingBagCollection arguments. Shardable parameters: ``embedding_bags.T.weight``."""

    unsharded: Type[nn.Module]
    sharded: Type[ShardedEmbeddingBagCollection]

    def shard(
        self,
        module: Any,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedEmbeddingBagCollection:
        return self.sharded(
            module,
            params,
            env,
            fused_params=self.fused_params,
            device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            module_fqn=module_fqn,
        )

    def shardable_parameters(self, module: Any) -> Dict[str, nn.Parameter]:
        return {name: bag.weight for name, bag in module.embedding_bags.items()}

    @property
    def module_type(self) -> Type[nn.Module]:  # type: ignore[override]
        return self.unsharded

    @property
    def sharded_module_type(self) -> Type[ShardedEmbeddingBagCollection]:  # type: ignore[override]
        return self.sharded


def fused_optimizer(weight: nn.Parameter, fused_params: Optional[Dict[str, Any]]) -> Optional[EmbOptimType]:
    """The FBGEMM optimizer TorchRec's sharding fuses into a table's backward: the one
    ``apply_optimizer_in_backward`` attached to its weight, else the sharder's fused params
    (None: unknown, or an optimizer FBGEMM cannot fuse)."""
    kwargs = getattr(weight, "_optimizer_kwargs", [{}])[0]
    if "optimizer" in kwargs:
        return kwargs["optimizer"]
    optimizer_class = getattr(weight, "_optimizer_classes", [None])[0]
    if optimizer_class is not None:
        try:
            return optimizer_type_to_emb_opt_type(optimizer_class)
        except ValueError:
            return None
    return (fused_params or {}).get("optimizer")
