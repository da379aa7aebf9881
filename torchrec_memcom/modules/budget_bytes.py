"""Budgets of budgeted embedding tables and the byte arithmetic that holds allocations to them.

Bytes, everything fp32 but the remap: a tier stores ``rows * dim`` (MEmCom: ``hash_rows * dim +
rows``), its projection ``dim * d``; a table whose frequency ranks do not follow its id order
keeps the rank of every id (int32, ``4 * n`` bytes). The sparse optimizer's state, when the
budget counts it: row-wise Adagrad one float per stored row, Adagrad one per parameter, SGD
none; a MEmCom tier's scalars one float each under both Adagrads. Projections are dense
parameters: the dense optimizer's state of these few ``dim * d`` matrices is not counted.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from torchrec_memcom.modules.budget_allocation import Allocation, TableAllocation, Tier, candidate_dims
from torchrec_memcom.modules.frequency import needs_remap

FP32_BYTES = 4
INDEX_BYTES = 4  # the int32 rank of each id
# Optimizer state the budget can count, in floats: (per stored row, per parameter).
OPTIMIZER_STATE = {"sgd": (0, 0), "rowwise_adagrad": (1, 0), "adagrad": (0, 1)}
FBGEMM_NAMES = {"EXACT_SGD": "sgd", "EXACT_ROWWISE_ADAGRAD": "rowwise_adagrad", "EXACT_ADAGRAD": "adagrad"}


def _short_name(optimizer: Any) -> Any:
    """``optimizer`` (a name or an FBGEMM ``EmbOptimType``) by this module's names where it has one."""
    name = getattr(optimizer, "name", optimizer)
    return FBGEMM_NAMES.get(name, name)


def optimizer_name(optimizer: Any) -> Optional[str]:
    """``None``, a name of ``OPTIMIZER_STATE`` or an FBGEMM ``EmbOptimType`` -> the name."""
    if optimizer is None:
        return None
    name = _short_name(optimizer)
    if name not in OPTIMIZER_STATE:
        raise ValueError(
            f"budget optimizer must be one of {sorted(OPTIMIZER_STATE)} (or None: parameters only), got {optimizer!r}"
        )
    return name


def check_training_optimizer(counted: Optional[str], trained: Any) -> None:
    """Raise unless a budget that counts optimizer state counts the state the tables train with.

    counted: the budget's optimizer (None: parameters only, nothing to check); trained: the
    sparse optimizer as a name of ``OPTIMIZER_STATE`` or an FBGEMM ``EmbOptimType`` (None:
    unknown). Otherwise the budget would hold bytes the training does not, or miss some.
    """
    if counted is None or trained is None:
        return
    name = _short_name(trained)
    if name != counted:
        raise ValueError(
            f"budgeted tables: the budget counts {counted} state (budgeted params `optimizer`, "
            f"`memcom budget --optimizer`, or the budget an allocation file records) but the tables train with "
            f"{name} (run config `optimizer.sparse.type`, or the sharder's fused_params "
            f"`optimizer`): make the two the same, or leave `optimizer` out of the budget to "
            f"count parameters only"
        )


@dataclasses.dataclass(frozen=True)
class Budget:
    """A hard memory budget: ``bytes``, or ``ratio`` (uncompressed bytes / budget).

    Args:
        bytes: the budget in bytes (give it or ``ratio``).
        ratio: uncompressed bytes / budget, >= 1.
        optimizer: also count this sparse optimizer's state ("sgd", "rowwise_adagrad",
            "adagrad", or FBGEMM's ``EmbOptimType``), and measure ``ratio`` against uncompressed
            tables with the same state; None counts parameters only.

    Example::

        Budget(ratio=16, optimizer="rowwise_adagrad").resolve({"t0": (1000, 16)})  # 4250 bytes
    """

    bytes: Optional[int] = None
    ratio: Optional[float] = None
    optimizer: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.ratio is None):
            raise ValueError("a budget needs exactly one of bytes or ratio")
        if self.bytes is not None and self.bytes < 1:
            raise ValueError(f"budget bytes must be positive, got {self.bytes}")
        if self.ratio is not None and self.ratio < 1.0:
            raise ValueError(f"budget ratio must be >= 1 (uncompressed / budget), got {self.ratio}")
        object.__setattr__(self, "optimizer", optimizer_name(self.optimizer))

    def resolve(self, shapes: Mapping[str, Tuple[int, int]]) -> int:
        """The budget in bytes for tables of these ``(num_embeddings, dim)``."""
        if self.bytes is not None:
            return int(self.bytes)
        full = sum(uncompressed_bytes(n, d, self.optimizer) for n, d in shapes.values())
        return int(full / self.ratio)  # type: ignore[operator]


@dataclasses.dataclass(frozen=True)
class TableBytes:
    """Where a table's bytes go.

    Args:
        tables: the tier tables' rows.
        scalars: MEmCom tiers' per-entity scalars.
        projections: the tiers' projections to the model dim.
        remap: the rank of every id (tables not in rank order).
        optimizer: the sparse optimizer's state the budget counts.

    Example::

        b = table_bytes(TableAllocation((Tier(rows=100, dim=16), Tier(rows=900, dim=4))), 16, False, None)
        b.tables, b.projections, b.total  # 20800, 256, 21056
    """

    tables: int = 0
    scalars: int = 0
    projections: int = 0
    remap: int = 0
    optimizer: int = 0

    @property
    def parameters(self) -> int:
        """All of the module's state: everything but the optimizer's."""
        return self.tables + self.scalars + self.projections + self.remap

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer


def table_bytes(allocation: TableAllocation, model_dim: int, remap: bool, optimizer: Optional[str]) -> TableBytes:
    """Bytes of one table under ``allocation`` (``remap``: it keeps the rank of every id)."""
    per_row, per_param = OPTIMIZER_STATE[optimizer] if optimizer else (0, 0)
    tables = scalars = projections = state = 0
    for t in allocation.tiers:
        tables += t.stored_rows * t.dim
        state += t.stored_rows * per_row + t.stored_rows * t.dim * per_param
        if t.hash_rows is not None:
            scalars += t.rows
            state += t.rows if optimizer in ("rowwise_adagrad", "adagrad") else 0
        if t.dim != model_dim:
            projections += t.dim * model_dim
    n = sum(t.rows for t in allocation.tiers)
    return TableBytes(
        tables=FP32_BYTES * tables,
        scalars=FP32_BYTES * scalars,
        projections=FP32_BYTES * projections,
        remap=INDEX_BYTES * n if remap else 0,
        optimizer=FP32_BYTES * state,
    )


def uncompressed_bytes(num_embeddings: int, dim: int, optimizer: Optional[str]) -> int:
    """A plain table of the same shape, under the same accounting."""
    return table_bytes(TableAllocation((Tier(num_embeddings, dim),)), dim, False, optimizer).total


def cheapest_table(
    num_embeddings: int,
    model_dim: int,
    optimizer: Optional[str],
    tail: bool,
    sizes: Optional[Sequence[int]] = None,
) -> TableAllocation:
    """The cheapest allocation of a table: one tier at some size (the smallest size is not
    always cheapest: a tiny table pays more for a projection than for full-dim rows) or, with
    ``tail``, one MEmCom tier of a single shared row. ``sizes``: the sizes allowed."""
    options = [
        TableAllocation((Tier(num_embeddings, dim, 1 if memcom else None),))
        for dim in (sizes or candidate_dims(model_dim))
        for memcom in ((False, True) if tail else (False,))
    ]
    return min(options, key=lambda a: table_bytes(a, model_dim, False, optimizer).total)


def smallest_feasible_bytes(
    shapes: Mapping[str, Tuple[int, int]],
    optimizer: Optional[str],
    tail: bool,
    sizes: Optional[Mapping[str, Sequence[int]]] = None,
) -> int:
    """The least any allocation of these tables can cost (one tier per table needs no remap)."""
    return sum(
        table_bytes(cheapest_table(n, d, optimizer, tail, (sizes or {}).get(name)), d, False, optimizer).total
        for name, (n, d) in shapes.items()
    )


def allocation_bytes(
    allocation: Allocation,
    shapes: Mapping[str, Tuple[int, int]],
    clean: Mapping[str, torch.Tensor],
    optimizer: Optional[str],
) -> Dict[str, TableBytes]:
    """Bytes per table of ``allocation`` for tables of ``shapes`` with these clean cuts."""
    return {
        name: table_bytes(allocation.tables[name], d, needs_remap(allocation.tables[name], clean[name]), optimizer)
        for name, (n, d) in shapes.items()
    }


def check_budget(
    allocation: Allocation,
    shapes: Mapping[str, Tuple[int, int]],
    clean: Mapping[str, torch.Tensor],
    budget: Budget,
    tail: bool = False,
) -> Dict[str, TableBytes]:
    """Validate ``allocation`` for these tables and hold it to ``budget``; its bytes per table.

    The error for an allocation over budget says the smallest feasible budget when the budget
    itself is below it (``tail``: MEmCom tails are allowed).
    """
    missing = sorted(set(shapes) - set(allocation.tables))
    if missing:
        raise ValueError(f"allocation lacks tables {missing}")
    unknown = sorted(set(allocation.tables) - set(shapes))
    if unknown:
        raise ValueError(f"allocation names unknown tables {unknown}")
    for name, (n, d) in shapes.items():
        allocation.tables[name].validate(name, n, d)
    limit = budget.resolve(shapes)
    per_table = allocation_bytes(allocation, shapes, clean, budget.optimizer)
    total = sum(b.total for b in per_table.values())
    if total > limit:
        tail = tail or _uses_tail(allocation)
        floor = smallest_feasible_bytes(shapes, budget.optimizer, tail)
        tail_floor = None if tail else smallest_feasible_bytes(shapes, budget.optimizer, True)
        raise_over_budget(limit, total, floor, budget.optimizer, tail, tail_floor)
    return per_table


def raise_over_budget(
    limit: int, needed: int, floor: int, optimizer: Optional[str], tail: bool, tail_floor: Optional[int] = None
) -> None:
    """The error for ``needed > limit`` bytes: the smallest feasible budget ``floor`` if the
    budget is below it (and ``tail_floor``, the smaller one a MEmCom tail reaches, when tails
    were not allowed), else by how much the allocation is over."""
    what = "parameters and " + optimizer + " state" if optimizer else "parameters"
    if limit < floor:
        lower = ""
        if tail_floor is not None and tail_floor < floor:
            lower = (
                f"; a MEmCom tail for the rarest ids (`tail=True`, `--tail`, params `tail: true`) "
                f"goes down to {tail_floor} bytes" + (", which this budget meets" if limit >= tail_floor else "")
            )
        raise ValueError(
            f"budget of {limit} bytes ({what}) is too small: the smallest feasible budget for "
            f"these tables is {floor} bytes (every table in its cheapest single tier"
            + (", or one MEmCom tier of one shared row" if tail else "")
            + ")"
            + lower
        )
    raise ValueError(
        f"allocation needs {needed} bytes ({what}), over the budget of {limit} bytes by "
        f"{needed - limit}; search one for this budget (`memcom budget search`) or use the "
        f"heuristic one"
    )


def _uses_tail(allocation: Allocation) -> bool:
    return any(t.hash_rows is not None for a in allocation.tables.values() for t in a.tiers)


def shapes_of(tables: Sequence[Any]) -> Dict[str, Tuple[int, int]]:
    """``{name: (num_embeddings, embedding_dim)}`` of EmbeddingBagConfigs."""
    return {t.name: (t.num_embeddings, t.embedding_dim) for t in tables}
