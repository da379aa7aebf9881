"""torchrec-memcom: compressed embedding tables for TorchRec."""

from torchrec_memcom.compress import CompressionSpec, TableCompression, compress
from torchrec_memcom.distributed.memcom_embeddingbag import (
    MEmComEmbeddingBagCollectionSharder,
    ShardedMEmComEmbeddingBagCollection,
)
from torchrec_memcom.modules.memcom_config import MEmComConfig
from torchrec_memcom.modules.memcom_embedding_bag import MEmComEmbeddingBagCollection

__all__ = [
    "CompressionSpec",
    "TableCompression",
    "compress",
    "MEmComConfig",
    "MEmComEmbeddingBagCollection",
    "MEmComEmbeddingBagCollectionSharder",
    "ShardedMEmComEmbeddingBagCollection",
]
