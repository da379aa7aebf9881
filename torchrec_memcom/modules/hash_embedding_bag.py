"""`HashEmbeddingBagCollection`: the hashing trick, each table's ids folded onto ``m`` shared rows."""

import dataclasses
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.modules.collection_checks import (
    check_input,
    feature_sizes,
    table_specs,
    with_rows,
)
from torchrec_memcom.modules.compressed_collection import CompressedCollection
from torchrec_memcom.modules.config_checks import check_config
from torchrec_memcom.modules.hashing import slots
from torchrec_memcom.modules.memcom_config import HashKind

# fx-traced models keep these data-reading calls as single nodes (TorchRec wraps its own alike)
torch.fx.wrap("check_input")
torch.fx.wrap("slots")


@dataclasses.dataclass
class HashConfig:
    """Compression spec of a hashed table (the hashing trick, Weinberger et al., ICML 2009).

    Entity ``i`` of a table with ``n`` ids is row ``h(i) mod m`` of an ``m x d`` table; ids that
    share a row share its embedding.

    Args:
        ratio: ``n / m`` asked for (``m`` is solved for it, within 1%); give it or ``num_hash_rows``.
        num_hash_rows: ``m`` itself.
        hash: "mod" (``i mod m``) or "mix" (a seeded bijection of ``[0, n)`` before the mod, as in
            ``MEmComConfig``, for ids with structure such as multiples of ``m``).
        min_rows: tables with fewer than this many rows stay uncompressed.

    Example::

        HashConfig(ratio=4)                          # m = n / 4 for every table
        HashConfig(num_hash_rows=1000, hash="mix")
    """

    ratio: Optional[float] = None
    num_hash_rows: Optional[int] = None
    hash: str = HashKind.MOD.value
    min_rows: int = 0

    def __post_init__(self) -> None:
        check_config(
            self, ("ratio", "num_hash_rows"), {"ratio": 1, "num_hash_rows": 1, "min_rows": 0}, {"hash": HashKind}
        )

    def compresses(self, num_embeddings: int) -> bool:
        """Whether a table of this many rows is compressed (``min_rows`` leaves small ones)."""
        return num_embeddings >= self.min_rows

    def hash_rows(self, num_embeddings: int, table: str) -> int:
        """``m`` for a table of ``n`` rows: within 1% of ``ratio``, or an error."""
        n = num_embeddings
        if self.num_hash_rows is not None:
            if self.num_hash_rows > n:
                raise ValueError(f"table {table!r}: num_hash_rows={self.num_hash_rows} exceeds its {n} rows")
            return self.num_hash_rows
        assert self.ratio is not None
        m = max(1, round(n / self.ratio))
        if abs(n / m - self.ratio) > 0.01 * self.ratio:
            raise ValueError(
                f"table {table!r}: hash ratio {self.ratio} cannot be reached within 1% with "
                f"n={n} (closest: m={m} gives {n / m:.4g})"
            )
        return m


@dataclasses.dataclass(frozen=True)
class HashTable:
    """What one table became: ``m`` rows (``m == n`` if uncompressed).

    Args:
        name: the table's name.
        num_embeddings: ``n``, its ids.
        embedding_dim: ``d``.
        hash_rows: ``m``, the rows it stores.
        hash: "mod" or "mix" (``HashConfig.hash``).
        compressed: whether it is hashed (else each id reads its own row).

    Example::

        t = HashTable("t0", num_embeddings=100, embedding_dim=8, hash_rows=25, hash="mod", compressed=True)
        t.rows(torch.tensor([3, 28]))  # tensor([3, 3])
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    hash_rows: int
    hash: str
    compressed: bool

    @property
    def num_parameters(self) -> int:
        return self.hash_rows * self.embedding_dim

    @property
    def ratio(self) -> float:
        return self.num_embeddings / self.hash_rows

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The row each id reads."""
        if not self.compressed:
            return ids
        return slots(ids, self.num_embeddings, self.hash) % self.hash_rows


class HashEmbeddingBagCollection(CompressedCollection):
    """EmbeddingBagCollection with hashed tables: id ``i`` reads row ``h(i) mod m``.

    Built from the user's own ``EmbeddingBagConfig``s plus a ``HashConfig`` (one for all tables,
    or a dict by table name; tables left out, or smaller than ``min_rows``, stay uncompressed).
    Pooling is the configs' own (SUM or MEAN). State dict: ``embedding_bags.T.weight``
    (``m x d``; ``n x d`` for uncompressed tables), as a stock EBC of ``m``-row tables has it.

    Args:
        tables: the user's ``EmbeddingBagConfig``s.
        compression: one ``HashConfig`` for all tables, or a dict of them by table name.
        device: where the tables are made (default: the CPU; ``meta`` for DMP to place them).

    Example::

        tables = [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=1000, feature_names=["f0"])]
        ebc = HashEmbeddingBagCollection(tables, HashConfig(ratio=4))  # t0: 250 rows
        ebc(kjt)["f0"]             # [B, 8] pooled embeddings
        ebc.cost()["t0"]["ratio"]  # 4.0
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        compression: Union[HashConfig, Dict[str, HashConfig]],
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self._embedding_bag_configs = tables
        self._num_embeddings = feature_sizes(tables)
        specs = table_specs(tables, compression)
        self.tables: List[HashTable] = []
        for t in tables:
            spec = specs[t.name]
            compressed = spec is not None and spec.compresses(t.num_embeddings)
            self.tables.append(
                HashTable(
                    name=t.name,
                    num_embeddings=t.num_embeddings,
                    embedding_dim=t.embedding_dim,
                    hash_rows=spec.hash_rows(t.num_embeddings, t.name)
                    if spec is not None and compressed
                    else t.num_embeddings,
                    hash=spec.hash if spec is not None and compressed else "mod",
                    compressed=compressed,
                )
            )
        # The hashed tables, as a stock EBC would hold them: `embedding_bags.T.weight`.
        self.embedding_bags = EmbeddingBagCollection(self.hashed_configs(), device=device).embedding_bags
        self._device = torch.device(device or next(iter(self.embedding_bags.parameters())).device)
        self._embedding_names = [n for names in get_embedding_names_by_table(tables) for n in names]
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]

    def hashed_configs(self) -> List[EmbeddingBagConfig]:
        """The configs of the hashed tables (``m`` rows) as a stock EBC would take them."""
        return [
            with_rows(cfg, t.hash_rows) if t.compressed else cfg
            for cfg, t in zip(self._embedding_bag_configs, self.tables)
        ]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        check_input(features, "hash", self._num_embeddings)
        feature_dict = features.to_dict()
        pooled = []
        for cfg, t in zip(self._embedding_bag_configs, self.tables):
            bag = self.embedding_bags[t.name]
            for feature in cfg.feature_names:
                f = feature_dict[feature]
                pooled.append(
                    F.embedding_bag(
                        t.rows(f.values()), bag.weight, f.offsets(), mode=bag.mode, include_last_offset=True
                    ).float()
                )
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._dims, values=torch.cat(pooled, dim=1))

    def reset_parameters(self) -> None:
        """Every table by its config's ``init_fn`` (hashed ones: TorchRec's default recomputed for ``m`` rows unless the user gave one)."""
        if self._device.type == "meta":
            return
        with torch.no_grad():
            for cfg in self.hashed_configs():
                assert cfg.init_fn is not None
                cfg.init_fn(self.embedding_bags[cfg.name].weight)
