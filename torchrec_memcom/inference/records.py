"""The records export reads a trained collection's tables into (one per user table), and the
forms each kind of collection gives: every method's registration names its collection's
(``CompressionMethod.export``); ``tables.collect_tables`` gathers them."""

import dataclasses
from typing import List, Optional, Sequence, Union, cast

from torch import Tensor, nn

from torchrec_memcom.modules.hash_embedding_bag import HashEmbeddingBagCollection, HashTable
from torchrec_memcom.modules.memcom_embedding_bag import MEmComEmbeddingBagCollection, MEmComTable


@dataclasses.dataclass
class TableExport:
    """One trained table, as the export needs it.

    Args:
        name: the table's name.
        features: the features reading it.
        method: its method ("none", "memcom", "hash", "qr").
        num_embeddings: ``n``, its ids.
        weight: the rows ids read (``n x d`` stock, ``m x d`` MEmCom/hash, QR's quotient table).
        hash: the hash of a hashed table (None: not hashed).
        scalars: MEmCom's per-entity scalars by slot.
        remainder: QR's ``c x d`` table.
        operation: how QR combines its two rows ("mult" or "add").

    Example::

        TableExport("t0", ["f0"], "none", 1000, ebc.embedding_bags["t0"].weight)
    """

    name: str
    features: List[str]
    method: str
    num_embeddings: int
    weight: Tensor
    hash: Optional[str] = None
    scalars: Optional[Tensor] = None
    remainder: Optional[Tensor] = None
    operation: str = "mult"

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def fp32_bytes(self) -> int:
        """Bytes of the trained float32 state."""
        parts = [self.weight, self.scalars, self.remainder]
        return sum(p.numel() * 4 for p in parts if p is not None)


@dataclasses.dataclass
class TierExport:
    """One tier of a budgeted table.

    Args:
        rows: the ranks it holds.
        weight: their rows, ``rows x dim`` (a MEmCom tier: ``hash_rows x dim``).
        scalars: a MEmCom tier's per-entity scalars, by row.
        projection: ``d x dim``; None for a tier at the model dim.

    Example::

        TierExport(900, torch.zeros(900, 4), projection=torch.zeros(16, 4))
    """

    rows: int
    weight: Tensor
    scalars: Optional[Tensor] = None
    projection: Optional[Tensor] = None

    @property
    def dim(self) -> int:
        return self.weight.shape[1]


@dataclasses.dataclass
class BudgetedTableExport:
    """A budgeted table, as the export needs it.

    Args:
        name: the table's name.
        features: the features reading it.
        num_embeddings: ``n``, its ids.
        embedding_dim: ``d``, the model dim.
        tiers: its tiers, most popular first.
        ranks: the rank of every id (None when the ids are in rank order already).
        method: "budgeted".

    Example::

        BudgetedTableExport("t0", ["f0"], 1000, 16, [TierExport(100, w0), TierExport(900, w1, projection=p1)])
    """

    name: str
    features: List[str]
    num_embeddings: int
    embedding_dim: int
    tiers: List[TierExport]
    ranks: Optional[Tensor] = None
    method: str = "budgeted"

    @property
    def fp32_bytes(self) -> int:
        """Bytes of the trained state: float32 tiers, scalars and projections, int32 ranks."""
        parts = [p for t in self.tiers for p in (t.weight, t.scalars, t.projection) if p is not None]
        return sum(p.numel() * 4 for p in parts) + (0 if self.ranks is None else self.ranks.numel() * 4)


AnyTable = Union[TableExport, BudgetedTableExport]


def hashed_tables(c: nn.Module, method: str, scalars: bool) -> List[TableExport]:
    """The tables of a collection of hashed rows (``c.tables`` as MEmCom's and hashing's):
    ``m x d`` rows read at the hash of an id, with per-entity scalars (``c.entity_weights``)
    if ``scalars``; its uncompressed tables as they are."""
    hashed = cast(Union[MEmComEmbeddingBagCollection, HashEmbeddingBagCollection], c)
    tables: Sequence[Union[MEmComTable, HashTable]] = hashed.tables
    out = []
    for cfg, t in zip(hashed.embedding_bag_configs(), tables):
        out.append(
            TableExport(
                t.name,
                list(cfg.feature_names),
                method if t.compressed else "none",
                t.num_embeddings,
                hashed.embedding_bags[t.name].weight,
                hash=t.hash if t.compressed else None,
                scalars=hashed.entity_weights.flat(t.name) if t.compressed and scalars else None,
            )
        )
    return out
