"""Frequency ranks of ids and where a table can be cut into tiers without remapping its ids."""

from typing import Any, Dict, Mapping, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_memcom.modules.budget_allocation import TableAllocation


def frequency_ranks(counts: torch.Tensor) -> torch.Tensor:
    """Rank of every id (0 = most frequent), int64.

    Ids whose counts never increase from id 1 on keep their order, id 0 first (rank = id): that
    is the data path's ``--mode frequency``, whose id 0 collects the rare and unseen ids (and is
    looked up for every one of them, however few times it occurred in training). Otherwise a
    stable sort by count, ties in id order.
    """
    counts = counts.to(torch.int64)
    if bool((counts[1:-1] >= counts[2:]).all()):
        return torch.arange(counts.numel())
    order = torch.sort(counts, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), dtype=order.dtype)
    return ranks


def clean_cuts(ranks: torch.Tensor) -> torch.Tensor:
    """``clean[c]`` (``c`` in ``[0, n]``): ids ``< c`` are exactly the ranks ``< c``.

    A tier boundary at a clean cut separates ids by id as well as by rank, so a table whose
    cuts are all clean needs no remap (all cuts are clean for frequency-ranked ids; some are for
    ids only partly in frequency order).
    """
    n = ranks.numel()
    prefix_max = torch.cummax(ranks, dim=0).values
    clean = torch.ones(n + 1, dtype=torch.bool)
    clean[1:] = prefix_max == torch.arange(n, dtype=ranks.dtype)
    return clean


def needs_remap(allocation: TableAllocation, clean: torch.Tensor) -> bool:
    """Whether some tier boundary of ``allocation`` is not a clean cut."""
    return any(not bool(clean[s]) for s in allocation.starts[1:])


def table_counts(tables: Sequence[EmbeddingBagConfig], frequencies: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Per table, the count of each id: ``frequencies[table]``, else the sum over its features."""
    out = {}
    for t in tables:
        if t.name in frequencies:
            counts = torch.as_tensor(frequencies[t.name])
        elif all(f in frequencies for f in t.feature_names):
            counts = sum(torch.as_tensor(frequencies[f]) for f in t.feature_names)  # type: ignore[assignment]
        else:
            raise ValueError(
                f"frequencies lack table {t.name!r} (give it by table name or for all of its "
                f"features {list(t.feature_names)})"
            )
        if tuple(counts.shape) != (t.num_embeddings,):
            raise ValueError(
                f"frequencies of table {t.name!r}: expected shape ({t.num_embeddings},), got {tuple(counts.shape)}"
            )
        out[t.name] = counts.to(torch.int64)
    return out
