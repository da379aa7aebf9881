"""`MixedEmbeddingBagCollection`: one EBC interface over collections of different kinds."""

from typing import List

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.modules.compressed_collection import ShardedByPlugin


class MixedEmbeddingBagCollection(EmbeddingBagCollectionInterface, metaclass=ShardedByPlugin):
    """Routes each feature to the collection holding its table and joins their outputs.

    Used by ``compress`` when tables of one EBC get different methods; DMP shards each child
    with its own sharder. Children's outputs are joined by key, never by position: a sharded
    EBC returns its keys grouped by sharding type, not in config order. Output keys and dims
    are fixed here, not read off the children's outputs, so TorchRec's train pipeline can
    fx-trace it with sharded children as leaves (``KeyedTensor.regroup`` is fx-wrapped).
    """

    def __init__(self, collections: List[EmbeddingBagCollectionInterface]) -> None:
        super().__init__()
        self.collections = nn.ModuleList(collections)
        self._features = [
            [f for cfg in c.embedding_bag_configs() for f in cfg.feature_names]
            for c in collections
        ]
        self._keys = [f for feats in self._features for f in feats]
        self._dims = [
            cfg.embedding_dim for c in collections for cfg in c.embedding_bag_configs() for _ in cfg.feature_names
        ]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        outputs = [
            c(features.permute([features.keys().index(f) for f in feats]))
            for c, feats in zip(self.collections, self._features)
        ]
        return KeyedTensor(
            keys=self._keys,
            length_per_key=self._dims,
            values=KeyedTensor.regroup(outputs, [self._keys])[0],
        )

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return [cfg for c in self.collections for cfg in c.embedding_bag_configs()]

    def is_weighted(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return self.collections[0].device
