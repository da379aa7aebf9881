"""MEmCom (Pansare et al., MLSys 2022): shared rows times one scalar per entity."""

from torchrec_memcom.distributed.memcom_embeddingbag import MEmComEmbeddingBagCollectionSharder
from torchrec_memcom.inference.records import hashed_tables
from torchrec_memcom.modules.memcom_config import MEmComConfig
from torchrec_memcom.modules.memcom_embedding_bag import MEmComEmbeddingBagCollection
from torchrec_memcom.registry import CompressionMethod, register_method

METHOD = register_method(
    CompressionMethod(
        name="memcom",
        config=MEmComConfig,
        collection=MEmComEmbeddingBagCollection,
        build=lambda tables, configs, device: MEmComEmbeddingBagCollection(tables, dict(configs), device=device),
        sharder=lambda fused: MEmComEmbeddingBagCollectionSharder(fused_params=fused),
        export=lambda c: hashed_tables(c, "memcom", scalars=True),
        holds_plain_tables=True,
    )
)
