"""Checks and reports every compressed collection shares (MEmCom, hash, QR, budgeted)."""

import dataclasses
import functools
from typing import Dict, List, Mapping, Optional, TypeVar, Union

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

Spec = TypeVar("Spec")


def check_ids(features: KeyedJaggedTensor, num_embeddings: Dict[str, int]) -> None:
    """Raise naming the feature when an id falls outside ``[0, n)`` of its table."""
    values = features.values()
    if values.numel() == 0:
        return
    lengths = torch.tensor(features.length_per_key(), device=values.device)
    limits = torch.tensor([num_embeddings[k] for k in features.keys()], device=values.device, dtype=values.dtype)
    bad = (values < 0) | (values >= torch.repeat_interleave(limits, lengths))
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0])
        key = features.keys()[int(torch.searchsorted(lengths.cumsum(0), first, right=True))]
        raise ValueError(f"feature {key!r}: id {int(values[first])} is outside [0, {num_embeddings[key]}) of its table")


def table_specs(
    tables: List[EmbeddingBagConfig], compression: Union[Spec, Mapping[str, Spec]]
) -> Dict[str, Optional[Spec]]:
    """The spec of every table (None: uncompressed); a dict naming unknown tables is an error."""
    if isinstance(compression, Mapping):
        unknown = set(compression) - {t.name for t in tables}
        if unknown:
            raise ValueError(f"compression names unknown tables: {sorted(unknown)}")
        return {t.name: compression.get(t.name) for t in tables}
    return {t.name: compression for t in tables}


def feature_sizes(tables: List[EmbeddingBagConfig]) -> Dict[str, int]:
    """``n`` of the table each feature reads; a feature read by two tables is an error."""
    out: Dict[str, int] = {}
    owner: Dict[str, str] = {}
    for t in tables:
        for f in t.feature_names:
            if f in owner:
                raise ValueError(
                    f"feature {f!r} is read by tables {owner[f]!r} and {t.name!r}; compressed "
                    f"collections need each feature to read one table"
                )
            out[f], owner[f] = t.num_embeddings, t.name
    return out


def check_unweighted(features: KeyedJaggedTensor, method: str) -> None:
    """Compressed collections pool unweighted bags; refuse weights rather than drop them."""
    if features.weights_or_none() is not None:
        raise ValueError(
            f"{method} collections take unweighted features; got KJT weights (under DMP: this "
            f"collection was not sharded; give the sharders compress() returns to both the "
            f"planner and DistributedModelParallel)"
        )


def check_input(features: KeyedJaggedTensor, method: str, num_embeddings: Dict[str, int]) -> None:
    """``check_unweighted`` and ``check_ids``: what an unsharded collection checks of its input.

    They read data, so a module calling this fx-wraps it (``torch.fx.wrap("check_input")`` at
    its top level): a traced model keeps the check as one call instead of failing to trace it.
    """
    check_unweighted(features, method)
    check_ids(features, num_embeddings)


def cost_report(rows: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Per-table rows (each with ``parameters`` and ``uncompressed_parameters``) plus ``total``."""
    params = sum(r["parameters"] for r in rows.values())
    full = sum(r["uncompressed_parameters"] for r in rows.values())
    return {**rows, "total": {"parameters": params, "uncompressed_parameters": full, "ratio": full / params}}


def with_rows(config: EmbeddingBagConfig, rows: int) -> EmbeddingBagConfig:
    """``config`` for a table of ``rows`` rows: a user's own ``init_fn`` is kept; TorchRec's
    default (uniform in +-sqrt(1/n), set when none is given) is recomputed for ``rows``."""
    fn = config.init_fn
    default = (
        isinstance(fn, functools.partial)
        and fn.func is torch.nn.init.uniform_
        and fn.keywords == {"a": config.get_weight_init_min(), "b": config.get_weight_init_max()}
    )
    return dataclasses.replace(config, num_embeddings=rows, init_fn=None if default else fn)
