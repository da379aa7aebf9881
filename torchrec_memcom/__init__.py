"""torchrec-memcom: compressed embedding tables for TorchRec.

Exports resolve lazily, so `memcom data ...` never pays for importing torch and torchrec.
"""

from typing import TYPE_CHECKING

from torchrec_memcom.lazy import lazy_getattr

if TYPE_CHECKING:
    from torchrec_memcom.compression import CompressionSpec, TableCompression, compress
    from torchrec_memcom.distributed.budgeted_embeddingbag import (
        BudgetedEmbeddingBagCollectionSharder,
        ShardedBudgetedEmbeddingBagCollection,
    )
    from torchrec_memcom.distributed.hash_embeddingbag import (
        HashEmbeddingBagCollectionSharder,
        ShardedHashEmbeddingBagCollection,
    )
    from torchrec_memcom.distributed.memcom_embeddingbag import (
        MEmComEmbeddingBagCollectionSharder,
        ShardedMEmComEmbeddingBagCollection,
    )
    from torchrec_memcom.distributed.mixed_embeddingbag import (
        MixedEmbeddingBagCollectionSharder,
        ShardedMixedEmbeddingBagCollection,
    )
    from torchrec_memcom.distributed.qr_embeddingbag import (
        QREmbeddingBagCollectionSharder,
        ShardedQREmbeddingBagCollection,
    )
    from torchrec_memcom.modules.budget_allocation import Allocation, TableAllocation, Tier
    from torchrec_memcom.modules.budgeted_embedding_bag import BudgetedConfig, BudgetedEmbeddingBagCollection
    from torchrec_memcom.modules.hash_embedding_bag import HashConfig, HashEmbeddingBagCollection
    from torchrec_memcom.modules.memcom_config import HashKind, MEmComConfig
    from torchrec_memcom.modules.memcom_embedding_bag import MEmComEmbeddingBagCollection
    from torchrec_memcom.modules.mixed_embedding_bag import MixedEmbeddingBagCollection
    from torchrec_memcom.modules.qr_embedding_bag import QRConfig, QREmbeddingBagCollection, QROperation, qr_collection

_EXPORTS = {
    "CompressionSpec": "compression",
    "TableCompression": "compression",
    "compress": "compression",
    "MEmComConfig": "modules.memcom_config",
    "HashKind": "modules.memcom_config",
    "MEmComEmbeddingBagCollection": "modules.memcom_embedding_bag",
    "MEmComEmbeddingBagCollectionSharder": "distributed.memcom_embeddingbag",
    "ShardedMEmComEmbeddingBagCollection": "distributed.memcom_embeddingbag",
    "HashConfig": "modules.hash_embedding_bag",
    "HashEmbeddingBagCollection": "modules.hash_embedding_bag",
    "HashEmbeddingBagCollectionSharder": "distributed.hash_embeddingbag",
    "ShardedHashEmbeddingBagCollection": "distributed.hash_embeddingbag",
    "QRConfig": "modules.qr_embedding_bag",
    "QROperation": "modules.qr_embedding_bag",
    "QREmbeddingBagCollection": "modules.qr_embedding_bag",
    "qr_collection": "modules.qr_embedding_bag",
    "QREmbeddingBagCollectionSharder": "distributed.qr_embeddingbag",
    "ShardedQREmbeddingBagCollection": "distributed.qr_embeddingbag",
    "Allocation": "modules.budget_allocation",
    "TableAllocation": "modules.budget_allocation",
    "Tier": "modules.budget_allocation",
    "MixedEmbeddingBagCollection": "modules.mixed_embedding_bag",
    "MixedEmbeddingBagCollectionSharder": "distributed.mixed_embeddingbag",
    "ShardedMixedEmbeddingBagCollection": "distributed.mixed_embeddingbag",
    "BudgetedEmbeddingBagCollection": "modules.budgeted_embedding_bag",
    "BudgetedConfig": "modules.budgeted_embedding_bag",
    "BudgetedEmbeddingBagCollectionSharder": "distributed.budgeted_embeddingbag",
    "ShardedBudgetedEmbeddingBagCollection": "distributed.budgeted_embeddingbag",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
