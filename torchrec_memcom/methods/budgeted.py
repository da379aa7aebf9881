"""Budgeted tables (after BET, Qu et al., WSDM 2024): a collection held to a hard memory budget,
its tables cut into tiers by id popularity."""

from typing import List

from torch import nn

from torchrec_memcom.distributed.budgeted_embeddingbag import BudgetedEmbeddingBagCollectionSharder
from torchrec_memcom.inference.records import BudgetedTableExport, TierExport
from torchrec_memcom.modules.budgeted_embedding_bag import (
    BudgetedConfig,
    BudgetedEmbeddingBagCollection,
    build_budgeted,
    tier_key,
)
from torchrec_memcom.registry import CompressionMethod, register_method


def export_tables(c: nn.Module) -> List[BudgetedTableExport]:
    """Each table as its tiers (rows, MEmCom scalars, projection) and the rank of every id."""
    ranks = c.remap.as_dict()
    out = []
    for t in c.tables:
        tiers = [
            TierExport(
                tier.rows,
                c.embedding_bags[key].weight,
                c.entity_weights.flat(key) if tier.hash_rows is not None else None,
                c.projections[key].weight if key in c.projections else None,
            )
            for j, tier in enumerate(t.tiers)
            for key in [tier_key(t.name, j)]
        ]
        out.append(BudgetedTableExport(
            t.name, list(t.feature_names), t.num_embeddings, t.embedding_dim, tiers, ranks.get(t.name)
        ))
    return out


METHOD = register_method(
    CompressionMethod(
        name="budgeted",
        config=BudgetedConfig,
        collection=BudgetedEmbeddingBagCollection,
        build=build_budgeted,
        sharder=lambda fused: BudgetedEmbeddingBagCollectionSharder(fused_params=fused),
        export=export_tables,
        # tables left out of the budget stay stock, outside it
        shared_config=True,
    )
)
