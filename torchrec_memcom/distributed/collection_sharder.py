"""The sharder shape all our EBC-like collections share: the stock EBC sharder, pointed at our
unsharded and sharded module types (DMP picks sharders by exact module type)."""

from typing import Any, Dict, Optional, Type

import torch
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder, ShardedEmbeddingBagCollection
from torchrec.distributed.types import ParameterSharding, ShardingEnv


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
