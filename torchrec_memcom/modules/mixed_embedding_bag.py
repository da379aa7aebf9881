"""`MixedEmbeddingBagCollection`: one EBC interface over collections of different kinds."""

from typing import Dict, List, Tuple, cast

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.modules.compressed_collection import ShardedByPlugin


@torch.fx.wrap  # reads the children's keys: one node in a traced model
def join_by_key(outputs: List[KeyedTensor], keys: List[str], dims: List[int]) -> KeyedTensor:
    """The children's outputs as one KeyedTensor of ``keys`` (each of its dim), read by key:
    a sharded child returns its keys grouped by sharding type, not in config order.

    One copy each way: the children's columns, split by key, joined in ``keys``' order
    (``KeyedTensor.regroup`` copies twice, a ``cat`` and a permute, forward and backward).
    """
    columns: Dict[str, torch.Tensor] = {}
    for kt in outputs:
        columns.update(zip(kt.keys(), kt.values().split(kt.length_per_key(), dim=1)))
    return KeyedTensor(keys=keys, length_per_key=dims, values=torch.cat([columns[k] for k in keys], dim=1))


class MixedEmbeddingBagCollection(EmbeddingBagCollectionInterface, metaclass=ShardedByPlugin):
    """Routes each feature to the collection holding its table and joins their outputs.

    Used by ``compress`` when tables of one EBC get different methods.
    ``MixedEmbeddingBagCollectionSharder`` shards it as one module (each child by its own
    sharder), which TorchRec's train pipeline pipelines; output keys and dims are fixed here, so
    it fx-traces too (``join_by_key`` is fx-wrapped).

    Args:
        collections: EBC-like collections reading disjoint features (their own tables).

    Example::

        mixed = MixedEmbeddingBagCollection([MEmComEmbeddingBagCollection(big, MEmComConfig(ratio=8)),
                                             HashEmbeddingBagCollection(small, {})])
        mixed(kjt)["f0"]  # read by key
    """

    def __init__(self, collections: List[EmbeddingBagCollectionInterface]) -> None:
        super().__init__()
        self.collections = nn.ModuleList(collections)
        self._features = [[f for cfg in c.embedding_bag_configs() for f in cfg.feature_names] for c in collections]
        self._keys = [f for feats in self._features for f in feats]
        self._dims = [
            cfg.embedding_dim for c in collections for cfg in c.embedding_bag_configs() for _ in cfg.feature_names
        ]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        outputs = [
            c(features.permute([features.keys().index(f) for f in feats]))
            for c, feats in zip(self.collections, self._features)
        ]
        return join_by_key(outputs, self._keys, self._dims)

    def child_features(self) -> List[List[str]]:
        """The features each child reads, in the children's order."""
        return self._features

    def output_keys(self) -> Tuple[List[str], List[int]]:
        """The output's keys (config order) and their dims."""
        return self._keys, self._dims

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        # nn.ModuleList types its items as plain modules
        children = [cast(EmbeddingBagCollectionInterface, c) for c in self.collections]
        return [cfg for c in children for cfg in c.embedding_bag_configs()]

    def is_weighted(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return cast(EmbeddingBagCollectionInterface, self.collections[0]).device
