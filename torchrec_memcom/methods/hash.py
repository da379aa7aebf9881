"""The hashing trick (Weinberger et al., ICML 2009): each table's ids folded onto shared rows."""

from torchrec_memcom.distributed.hash_embeddingbag import HashEmbeddingBagCollectionSharder
from torchrec_memcom.inference.records import hashed_tables
from torchrec_memcom.modules.hash_embedding_bag import HashConfig, HashEmbeddingBagCollection
from torchrec_memcom.registry import CompressionMethod, register_method

METHOD = register_method(
    CompressionMethod(
        name="hash",
        config=HashConfig,
        collection=HashEmbeddingBagCollection,
        build=lambda tables, configs, device: HashEmbeddingBagCollection(tables, dict(configs), device=device),
        sharder=lambda fused: HashEmbeddingBagCollectionSharder(fused_params=fused),
        export=lambda c: hashed_tables(c, "hash", scalars=False),
        holds_plain_tables=True,
    )
)
