"""torchrec-memcom: compressed embedding tables for TorchRec."""

from torchrec_memcom.compress import CompressionSpec, TableCompression, compress
from torchrec_memcom.distributed.hash_embeddingbag import (
    HashEmbeddingBagCollectionSharder,
    ShardedHashEmbeddingBagCollection,
)
from torchrec_memcom.distributed.memcom_embeddingbag import (
    MEmComEmbeddingBagCollectionSharder,
    ShardedMEmComEmbeddingBagCollection,
)
from torchrec_memcom.distributed.qr_embeddingbag import (
    QREmbeddingBagCollectionSharder,
    ShardedQREmbeddingBagCollection,
)
from torchrec_memcom.modules.hash_embedding_bag import HashConfig, HashEmbeddingBagCollection
from torchrec_memcom.modules.memcom_config import MEmComConfig
from torchrec_memcom.modules.memcom_embedding_bag import MEmComEmbeddingBagCollection
from torchrec_memcom.modules.qr_embedding_bag import QRConfig, QREmbeddingBagCollection, qr_collection

__all__ = [
    "HashConfig",
    "HashEmbeddingBagCollection",
    "HashEmbeddingBagCollectionSharder",
    "ShardedHashEmbeddingBagCollection",
    "QRConfig",
    "QREmbeddingBagCollection",
    "QREmbeddingBagCollectionSharder",
    "ShardedQREmbeddingBagCollection",
    "qr_collection",
    "CompressionSpec",
    "TableCompression",
    "compress",
    "MEmComConfig",
    "MEmComEmbeddingBagCollection",
    "MEmComEmbeddingBagCollectionSharder",
    "ShardedMEmComEmbeddingBagCollection",
]
