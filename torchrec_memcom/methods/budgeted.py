"""Budgeted tables (after BET, Qu et al., WSDM 2024): a collection held to a hard memory budget,
its tables cut into tiers by id popularity."""

from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Union, cast

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_memcom.budget.space import AllocationSpace
from torchrec_memcom.data import load_frequencies
from torchrec_memcom.distributed.budgeted_embeddingbag import BudgetedEmbeddingBagCollectionSharder
from torchrec_memcom.inference.records import BudgetedTableExport, TierExport
from torchrec_memcom.modules.budget_allocation import Allocation
from torchrec_memcom.modules.budget_bytes import Budget
from torchrec_memcom.modules.budgeted_embedding_bag import (
    SCALAR_PARAMS,
    BudgetedConfig,
    BudgetedEmbeddingBagCollection,
    check_sum_pooling,
    collection_params,
    tier_key,
)
from torchrec_memcom.modules.frequency import table_counts
from torchrec_memcom.registry import CompressionMethod, register_method


def export_tables(c: nn.Module) -> List[BudgetedTableExport]:
    """Each table as its tiers (rows, MEmCom scalars, projection) and the rank of every id."""
    budgeted = cast(BudgetedEmbeddingBagCollection, c)
    ranks = budgeted.remap.as_dict()
    projections = {key: cast(nn.Linear, p).weight for key, p in budgeted.projections.items()}
    out = []
    for t in budgeted.tables:
        tiers = [
            TierExport(
                tier.rows,
                budgeted.embedding_bags[key].weight,
                budgeted.entity_weights.flat(key) if tier.hash_rows is not None else None,
                projections.get(key),
            )
            for j, tier in enumerate(t.tiers)
            for key in [tier_key(t.name, j)]
        ]
        out.append(
            BudgetedTableExport(
                t.name, list(t.feature_names), t.num_embeddings, t.embedding_dim, tiers, ranks.get(t.name)
            )
        )
    return out


def budgeted_collection(
    tables: List[EmbeddingBagConfig],
    frequencies: Mapping[str, Any],
    allocation: Union[None, Allocation, str, Path] = None,
    budget_bytes: Optional[int] = None,
    *,
    budget_ratio: Optional[float] = None,
    optimizer: Optional[str] = None,
    tail: bool = False,
    sizes: Optional[Sequence[int]] = None,
    scalars: Optional[Mapping[str, Any]] = None,
    device: Optional[torch.device] = None,
) -> BudgetedEmbeddingBagCollection:
    """A ``BudgetedEmbeddingBagCollection`` (same arguments) whose ``allocation`` None is the
    quick popularity heuristic for the budget (``budget.space.AllocationSpace.heuristic``).

    tail / sizes: for the heuristic: the rarest ids may share a MEmCom tier; the tier dims to use
        (any multiples of 4 up to the dim, BET's candidate set; default: 4, 8, 16, ... doubling,
        and the dim: ``budget.space.size_ladder``).

    Example::

        ebc = budgeted_collection(tables, load_frequencies("runs/data"), budget_ratio=16, tail=True)
    """
    if allocation is None:
        check_sum_pooling(tables)  # before the heuristic, whose budget error would hide it
        budget = Budget(bytes=budget_bytes, ratio=budget_ratio, optimizer=optimizer)
        frequencies = table_counts(tables, frequencies)
        allocation = AllocationSpace(tables, frequencies, budget, tail=tail, sizes=sizes).heuristic()
    return BudgetedEmbeddingBagCollection(
        tables,
        frequencies,
        allocation,
        budget_bytes,
        budget_ratio=budget_ratio,
        optimizer=optimizer,
        tail=tail,
        scalars=scalars,
        device=device,
    )


def build_budgeted(
    tables: List[EmbeddingBagConfig],
    params: Mapping[str, Union[BudgetedConfig, Mapping[str, Any]]],
    device: torch.device,
) -> BudgetedEmbeddingBagCollection:
    """``compress()``'s builder of the "budgeted" method: ``params`` by table, the same
    ``BudgetedConfig`` (or its dict) for every one."""
    p = collection_params(params)
    allocation = Allocation.load(p["allocation"]) if "allocation" in p else None
    recorded = dict(allocation.meta) if allocation is not None else {}
    budget = dict(recorded.get("budget", {}))
    if "budget_bytes" in p or "budget_ratio" in p:
        budget = {"bytes": p.get("budget_bytes"), "ratio": p.get("budget_ratio")}
    if "optimizer" in p:
        budget["optimizer"] = p["optimizer"]
    if budget.get("bytes") is None and budget.get("ratio") is None:
        raise ValueError(
            "budgeted tables need a budget: params `budget_bytes` or `budget_ratio`, or an "
            "`allocation` file that records one"
        )
    data = p.get("frequencies")
    if data is None:
        data = recorded.get("data")
    if data is None:
        raise ValueError(
            "budgeted tables rank ids by frequency: give params `frequencies` (per table the "
            "count of each id, or a data folder of `memcom data convert|synth`) or an "
            "`allocation` file made on one"
        )
    if not isinstance(data, Mapping):
        data = load_frequencies(data)
    return budgeted_collection(
        tables,
        data,
        allocation,
        budget.get("bytes"),
        budget_ratio=budget.get("ratio"),
        optimizer=budget.get("optimizer"),
        tail=bool(p.get("tail", False)),
        sizes=p.get("sizes"),
        scalars={k: p[k] for k in SCALAR_PARAMS if k in p},
        device=device,
    )


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
