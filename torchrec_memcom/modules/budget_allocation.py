"""Allocations of budgeted embedding tables: tiers of frequency ranks, their checks and files.

A table's ids are ordered by frequency rank (most frequent first) and cut into tiers of
consecutive ranks; tier ``j`` stores its ids at ``dim_j`` (non-increasing in ``j``) and is
projected to the model dim by a bias-free ``dim_j -> d`` matrix (none when ``dim_j == d``). The
last tier may instead be a MEmCom tier: ``hash_rows`` shared rows plus one scalar per id.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

SIZE_STEP = 4  # tier dims are multiples of this (or the model dim)
FORMAT = "torchrec-memcom-allocation/1"


def candidate_dims(model_dim: int) -> List[int]:
    """Sizes a tier may take: multiples of ``SIZE_STEP`` up to the model dim, and the model dim."""
    return sorted({*range(SIZE_STEP, model_dim + 1, SIZE_STEP), model_dim})


@dataclasses.dataclass(frozen=True)
class Tier:
    """``rows`` consecutive frequency ranks stored at ``dim``; a MEmCom tier if ``hash_rows``.

    Args:
        rows: the ranks (ids) the tier holds.
        dim: the dim it stores them at.
        hash_rows: the shared rows of a MEmCom tier (None: one row per id).

    Example::

        Tier(rows=1000, dim=16)                 # 1000 rows of dim 16
        Tier(rows=90_000, dim=4, hash_rows=500)  # MEmCom: 500 shared rows, 90_000 scalars
    """

    rows: int
    dim: int
    hash_rows: Optional[int] = None

    @property
    def stored_rows(self) -> int:
        return self.rows if self.hash_rows is None else self.hash_rows


@dataclasses.dataclass(frozen=True)
class TableAllocation:
    """The tiers of one table, most popular first.

    Args:
        tiers: consecutive frequency ranks from rank 0, dims non-increasing.

    Example::

        a = TableAllocation((Tier(rows=100, dim=16), Tier(rows=900, dim=4)))
        a.starts                      # [0, 100]
        a.validate("t0", 1000, 16)    # raises unless the tiers fit a 1000-id, dim-16 table
    """

    tiers: Tuple[Tier, ...]

    @property
    def starts(self) -> List[int]:
        """First rank of every tier."""
        out, at = [], 0
        for t in self.tiers:
            out.append(at)
            at += t.rows
        return out

    def validate(self, table: str, num_embeddings: int, model_dim: int) -> None:
        """Raise naming the table unless the tiers cover its ids with sizes BET allows."""
        where = f"allocation of table {table!r}"
        if not self.tiers:
            raise ValueError(f"{where}: no tiers")
        if sum(t.rows for t in self.tiers) != num_embeddings:
            raise ValueError(
                f"{where}: tiers cover {sum(t.rows for t in self.tiers)} ids, the table has {num_embeddings}"
            )
        allowed = candidate_dims(model_dim)
        for j, t in enumerate(self.tiers):
            if t.rows < 1:
                raise ValueError(f"{where}: tier {j} has {t.rows} rows")
            if t.dim not in allowed:
                raise ValueError(f"{where}: tier {j} has dim {t.dim}; allowed: {allowed}")
            if j and t.dim > self.tiers[j - 1].dim:
                raise ValueError(
                    f"{where}: tier {j} (dim {t.dim}) is larger than the more popular tier "
                    f"{j - 1} (dim {self.tiers[j - 1].dim}); sizes must not grow with rank"
                )
            if t.hash_rows is not None:
                if j != len(self.tiers) - 1:
                    raise ValueError(f"{where}: only the last (rarest) tier may be a MEmCom tier")
                if not 1 <= t.hash_rows <= t.rows:
                    raise ValueError(f"{where}: MEmCom tier needs 1 <= hash_rows <= {t.rows}")


@dataclasses.dataclass(frozen=True)
class Allocation:
    """A table-level action: the tiers of every table at once.

    Args:
        tables: each table's ``TableAllocation``, by table name.
        meta: what the file records beside them (the budget, the data folder); not compared.

    Example::

        allocation = Allocation({"t0": TableAllocation((Tier(rows=100, dim=16), Tier(rows=900, dim=4)))})
        allocation.save("allocation.json")
        Allocation.load("allocation.json") == allocation  # True
    """

    tables: Mapping[str, TableAllocation]
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def to_json(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            **self.meta,
            "tables": {
                name: {"tiers": [{k: v for k, v in dataclasses.asdict(t).items() if v is not None} for t in a.tiers]}
                for name, a in self.tables.items()
            },
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Allocation":
        if obj.get("format") != FORMAT:
            raise ValueError(f"not an allocation: format {obj.get('format')!r}, expected {FORMAT!r}")
        tables = {name: TableAllocation(tuple(Tier(**t) for t in a["tiers"])) for name, a in obj["tables"].items()}
        return cls(tables, {k: v for k, v in obj.items() if k not in ("format", "tables")})

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Allocation":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: cannot read allocation: {e}") from None
