"""The quotient-remainder trick (Shi et al., KDD 2020): two small tables combined per id."""

from typing import List, cast

from torch import nn

from torchrec_memcom.distributed.qr_embeddingbag import QREmbeddingBagCollectionSharder
from torchrec_memcom.inference.records import TableExport
from torchrec_memcom.modules.qr_embedding_bag import QRConfig, QREmbeddingBagCollection, qr_collection
from torchrec_memcom.registry import CompressionMethod, register_method


def export_tables(c: nn.Module) -> List[TableExport]:
    """QR tables as the quotient rows (``weight``) and the remainder rows; plain ones as they are."""
    qr = cast(QREmbeddingBagCollection, c)
    weights = {name: cast(nn.Embedding, e).weight for name, e in qr.embeddings.items()}
    out = []
    for cfg, t in zip(qr.embedding_bag_configs(), qr.tables):
        if not t.compressed:
            out.append(TableExport(t.name, list(cfg.feature_names), "none", t.num_embeddings, weights[t.name]))
            continue
        out.append(
            TableExport(
                t.name,
                list(cfg.feature_names),
                "qr",
                t.num_embeddings,
                weights[f"{t.name}@q"],
                remainder=weights[f"{t.name}@r"],
                operation=t.operation,
            )
        )
    return out


METHOD = register_method(
    CompressionMethod(
        name="qr",
        config=QRConfig,
        collection=QREmbeddingBagCollection,
        build=lambda tables, configs, device: qr_collection(tables, dict(configs), device=device),
        sharder=lambda fused: QREmbeddingBagCollectionSharder(fused_params=fused),
        export=export_tables,
        # plain tables inside a QR collection would take its unpooled per-id path: keep them stock
        holds_plain_tables=False,
    )
)
