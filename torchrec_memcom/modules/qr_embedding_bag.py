"""`QREmbeddingBagCollection`: the quotient-remainder trick (Shi et al., KDD 2020).

Entity ``i`` of a table with ``n`` ids and ``c`` collisions is ``Q[i // c] * R[i % c]``
(element-wise; ``+`` with ``operation="add"``) with a quotient table ``Q`` of ``ceil(n/c)`` rows
and a remainder table ``R`` of ``c`` rows. Unlike hashing, no two ids share both rows. The
product is taken per id, before pooling, so the lookups are unpooled (sequence) ones: the tables
``Q``, ``R`` (and uncompressed ones) are those of a TorchRec ``EmbeddingCollection``, and the
sharded module runs on its stock sharded form (see ``distributed/qr_embeddingbag.py``).
"""

import dataclasses
import enum
import math
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingCollection,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.modules.collection_checks import (
    check_input,
    cost_report,
    feature_sizes,
    table_specs,
)
from torchrec_memcom.modules.compressed_collection import CompressedCollection
from torchrec_memcom.modules.config_checks import check_config
from torchrec_memcom.modules.layout_cache import LayoutCache
from torchrec_memcom.modules.mixed_embedding_bag import MixedEmbeddingBagCollection

# fx-traced models keep this data-reading call as single nodes (TorchRec wraps its own alike)
torch.fx.wrap("check_input")


class QROperation(str, enum.Enum):
    """How an id's quotient and remainder rows combine: element-wise product or sum.

    Example::

        QRConfig(ratio=4, operation=QROperation.ADD.value)  # configs keep the plain string
    """

    MULT = "mult"
    ADD = "add"


POOLING = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


@dataclasses.dataclass(frozen=True)
class _SplitLayout:
    """What ``split_ids`` needs of one KJT layout, built once (``_SPLIT_LAYOUTS``)."""

    keys: List[str]  # the lookup features: f@q, f@r per compressed feature f, else f
    divisors: torch.Tensor  # per input value: c of its feature (1 if uncompressed: q = id)
    gather: torch.Tensor  # output value i is [q; r][gather[i]]
    bags: torch.Tensor  # output feature k has the bags of input feature bags[k]

    @staticmethod
    def build(
        keys: List[str], length_per_key: List[int], collisions: Tuple[Tuple[str, int], ...], values: torch.Tensor
    ) -> "_SplitLayout":
        device, total = values.device, sum(length_per_key)
        position = {k: i for i, k in enumerate(keys)}
        offsets = [0]
        for n in length_per_key:
            offsets.append(offsets[-1] + n)
        out_keys: List[str] = []
        gather: List[torch.Tensor] = []
        bags: List[int] = []
        for f, c in collisions:
            i = position[f]
            ids = torch.arange(offsets[i], offsets[i + 1], device=device)
            if c:
                out_keys += [f"{f}@q", f"{f}@r"]
                gather += [ids, ids + total]
                bags += [i, i]
            else:
                out_keys.append(f)
                gather.append(ids)
                bags.append(i)
        c_of = dict(collisions)
        return _SplitLayout(
            keys=out_keys,
            divisors=torch.repeat_interleave(
                torch.tensor([c_of.get(k) or 1 for k in keys], dtype=values.dtype, device=device),
                torch.tensor(length_per_key, dtype=torch.int64, device=device),
                output_size=total,
            ),
            gather=torch.cat(gather) if gather else torch.zeros(0, dtype=torch.int64, device=device),
            bags=torch.tensor(bags, dtype=torch.int64, device=device),
        )


# split_ids is a free function (fx-wraps it): its layouts are cached here, by value
_SPLIT_LAYOUTS = LayoutCache()


@torch.fx.wrap  # reads the layout: one node in a traced model
def split_ids(features: KeyedJaggedTensor, collisions: Tuple[Tuple[str, int], ...]) -> KeyedJaggedTensor:
    """Each feature ``f`` of ``collisions`` (``(f, c)`` pairs, ``c`` 0 if uncompressed, in
    order) as the lookup features ``f@q`` (ids ``i // c``) and ``f@r`` (``i % c``), or ``f``.

    All ids at once: one division by per-value divisors (``_SplitLayout``), one gather of the
    quotients and remainders into the lookup features' order, one of the bag lengths.
    """
    keys, length_per_key, values = features.keys(), features.length_per_key(), features.values()
    layout = _SPLIT_LAYOUTS.get(
        (tuple(keys), tuple(length_per_key), collisions, values.dtype, values.device),
        lambda: _SplitLayout.build(keys, length_per_key, collisions, values),
    )
    quotients = torch.div(values, layout.divisors, rounding_mode="floor")
    split = torch.cat([quotients, values - quotients * layout.divisors]).index_select(0, layout.gather)
    batch = features.stride()
    lengths = features.lengths().view(-1, batch).index_select(0, layout.bags).view(-1)
    return KeyedJaggedTensor(keys=layout.keys, values=split, lengths=lengths, stride=batch)


@torch.fx.wrap  # reads lengths: one node in a traced model
def pool_bags(per_id: List[torch.Tensor], lengths: List[torch.Tensor], mean: List[bool]) -> torch.Tensor:
    """Each feature's per-id rows pooled by bag, side by side: ``[batch, features * dim]``.

    ``per_id[f]`` holds the rows of feature ``f``'s ids bag after bag, ``lengths[f]`` its bag
    sizes; its bags are summed, or averaged where ``mean[f]`` (an empty bag pools to 0). The
    features share one dim. One id per bag (Criteo's) needs no pooling on the CPU: the rows are
    joined as they are (a CPU ``segment_reduce`` per feature, as before, took about 3x as long
    forward and 2x backward on 15 features of 2048 bags). Otherwise, on the CPU, one
    ``index_add_`` sums every id into row ``b * F + f`` of the output (about 1.5x as fast forward
    as a ``segment_reduce`` per feature with 0-5 ids a bag, as fast backward); elsewhere one
    ``segment_reduce`` over all bags. Each adds a bag's ids in order from 0 and divides by the
    bag's size, as a ``segment_reduce`` per feature does (the same bits on the CPU: tested).
    """
    batch, features = lengths[0].numel(), len(per_id)
    device = per_id[0].device
    if device.type == "cpu" and all(v.shape[0] == batch for v in per_id) and bool(torch.stack(lengths).eq(1).all()):
        return torch.cat(per_id, dim=1)
    bag_lengths = torch.cat(lengths).to(torch.int64)  # feature-major: bag (f, b) at f * batch + b
    values = torch.cat(per_id)
    if device.type == "cpu":
        bag_rows = torch.arange(batch * features, device=device).view(batch, features).t().reshape(-1)
        rows = torch.repeat_interleave(bag_rows, bag_lengths, output_size=values.shape[0])
        pooled = values.new_zeros(batch * features, values.shape[1]).index_add_(0, rows, values)
        pooled = pooled.view(batch, features, -1)
    else:
        pooled = torch.segment_reduce(values, "sum", lengths=bag_lengths, initial=0.0)
        pooled = pooled.view(features, batch, -1).transpose(0, 1)
    if any(mean):
        counts = bag_lengths.view(features, batch).t().clamp(min=1)
        divisor = torch.where(torch.tensor(mean, device=device), counts, 1).to(pooled.dtype)
        pooled = pooled / divisor.unsqueeze(-1)
    return pooled.reshape(batch, -1)


def quotient_rows(num_embeddings: int, num_collisions: int) -> int:
    return -(-num_embeddings // num_collisions)


def compression_ratio(num_embeddings: int, num_collisions: int) -> float:
    """Achieved QR ratio ``n*d / ((ceil(n/c) + c) * d) = n / (ceil(n/c) + c)``."""
    return num_embeddings / (quotient_rows(num_embeddings, num_collisions) + num_collisions)


@dataclasses.dataclass
class QRConfig:
    """Compression spec of a quotient-remainder table.

    The largest ratio QR reaches is about ``sqrt(n) / 2``, at ``c = sqrt(n)``.

    Args:
        num_collisions: ``c``, ids per quotient row (the remainder table's rows); give it or
            ``ratio``.
        ratio: ``n / (ceil(n/c) + c)`` asked for; ``c`` is solved for it, preferring
            ``c <= sqrt(n)``, where the ratio is about ``c``, and else the ``c > sqrt(n)`` of the
            same size.
        operation: "mult" (the paper's element-wise product) or "add".
        min_rows: tables with fewer than this many rows stay uncompressed.

    Example::

        QRConfig(num_collisions=4)       # Q: ceil(n / 4) rows, R: 4 rows
        QRConfig(ratio=4, operation="add")
    """

    num_collisions: Optional[int] = None
    ratio: Optional[float] = None
    operation: str = QROperation.MULT.value
    min_rows: int = 0

    def __post_init__(self) -> None:
        check_config(
            self,
            ("num_collisions", "ratio"),
            {"ratio": 1, "num_collisions": 1, "min_rows": 0},
            {"operation": QROperation},
        )

    def compresses(self, num_embeddings: int) -> bool:
        """Whether a table of this many rows is compressed (``min_rows`` leaves small ones)."""
        return num_embeddings >= self.min_rows

    def collisions(self, num_embeddings: int, table: str) -> int:
        """``c`` for a table of ``n`` rows: its ratio within 1% of ``ratio``, or an error."""
        n = num_embeddings
        if self.num_collisions is not None:
            if self.num_collisions > n:
                raise ValueError(f"table {table!r}: num_collisions={self.num_collisions} exceeds its {n} rows")
            return self.num_collisions
        ratio = self.ratio
        assert ratio is not None
        best = max((k for k in (math.isqrt(n), math.isqrt(n) + 1) if k <= n), key=lambda k: compression_ratio(n, k))
        if ratio > 1.01 * compression_ratio(n, best):
            raise ValueError(
                f"table {table!r}: QR ratio {ratio} cannot be reached with n={n}: the most "
                f"it gives is {compression_ratio(n, best):.4g} (c={best}), about sqrt(n)/2"
            )
        # ceil(n/c) + c = n/ratio has two roots of equal size. The smaller (c <= sqrt(n), DLRM's
        # convention) gives ratios of about c, so whole numbers only; the larger reaches any.
        rows = n / ratio
        spread = math.sqrt(max(rows * rows - 4 * n, 0.0))
        tried: List[int] = []
        for root in ((rows - spread) / 2, (rows + spread) / 2):
            near = [k for k in range(math.floor(root) - 1, math.ceil(root) + 2) if 1 <= k <= n]
            c = min(near, key=lambda k: abs(compression_ratio(n, k) - ratio))
            if abs(compression_ratio(n, c) - ratio) <= 0.01 * ratio:
                return c
            tried += [k for k in near if k not in tried]
        nearest = ", ".join(f"c={k} gives {compression_ratio(n, k):.4g}" for k in tried)
        raise ValueError(
            f"table {table!r}: QR ratio {ratio} cannot be reached within 1% with n={n} (nearest: {nearest})"
        )


@dataclasses.dataclass(frozen=True)
class QRTable:
    """What one table became: ``Q`` (``ceil(n/c) x d``) and ``R`` (``c x d``), or itself.

    Args:
        name: the table's name.
        num_embeddings: ``n``, its ids.
        embedding_dim: ``d``.
        num_collisions: ``c`` (0 if uncompressed).
        operation: "mult" or "add" (``QRConfig.operation``).
        compressed: whether it is split into ``Q`` and ``R``.

    Example::

        t = QRTable("t0", num_embeddings=1000, embedding_dim=8, num_collisions=10, operation="mult", compressed=True)
        t.quotient_rows, t.ratio  # 100, 1000 / 110
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    num_collisions: int  # 0 if uncompressed
    operation: str
    compressed: bool

    @property
    def quotient_rows(self) -> int:
        return quotient_rows(self.num_embeddings, self.num_collisions) if self.compressed else 0

    @property
    def num_parameters(self) -> int:
        if not self.compressed:
            return self.num_embeddings * self.embedding_dim
        return (self.quotient_rows + self.num_collisions) * self.embedding_dim

    @property
    def ratio(self) -> float:
        return compression_ratio(self.num_embeddings, self.num_collisions) if self.compressed else 1.0


class QRLayout:
    """A QR collection's tables and the steps around its per-id lookups.

    Shared by the unsharded and the sharded module: ``split`` turns each feature ``f`` of a
    compressed table into ``f@q`` (ids ``i // c``) and ``f@r`` (ids ``i % c``) before the
    lookups; ``combine`` joins each id's two rows after them and pools the bags.

    Args:
        tables: the user's ``EmbeddingBagConfig``s (one dim; SUM or MEAN pooling).
        compression: one ``QRConfig`` for all tables, or a dict of them by table name.

    Example::

        layout = QRLayout(tables, QRConfig(num_collisions=4))
        split = layout.split(kjt)              # keys f@q, f@r per compressed feature f
        layout.lookup_configs()                # the tables T@q, T@r those keys read
    """

    def __init__(self, tables: List[EmbeddingBagConfig], compression: Union[QRConfig, Dict[str, QRConfig]]) -> None:
        dims = {t.name: t.embedding_dim for t in tables}
        if len(set(dims.values())) > 1:
            raise ValueError(
                "a QR collection's tables share one dim (its lookups run on TorchRec's "
                f"EmbeddingCollection); got dims {dims}: build one collection per dim "
                "(qr_collection does)"
            )
        self.configs = tables
        self.num_embeddings = feature_sizes(tables)
        specs = table_specs(tables, compression)
        self.tables: List[QRTable] = []
        for t in tables:
            if t.pooling not in POOLING:
                raise ValueError(f"table {t.name!r}: QR pools with SUM or MEAN, got {t.pooling.name}")
            spec = specs[t.name]
            compressed = spec is not None and spec.compresses(t.num_embeddings)
            self.tables.append(
                QRTable(
                    name=t.name,
                    num_embeddings=t.num_embeddings,
                    embedding_dim=t.embedding_dim,
                    num_collisions=spec.collisions(t.num_embeddings, t.name) if spec is not None and compressed else 0,
                    operation=spec.operation if spec is not None and compressed else "mult",
                    compressed=compressed,
                )
            )
        self._embedding_names = [n for names in get_embedding_names_by_table(tables) for n in names]
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        # per user feature, config order: its table, and whether its bags pool by MEAN
        self._features = [(f, t) for cfg, t in zip(tables, self.tables) for f in cfg.feature_names]
        self._mean = [cfg.pooling == PoolingType.MEAN for cfg in tables for _ in cfg.feature_names]
        self._collisions = tuple((f, t.num_collisions) for f, t in self._features)

    def lookup_configs(self) -> List[EmbeddingConfig]:
        """The unpooled tables: ``T@q`` and ``T@r`` per compressed table, uncompressed ``T``."""
        out = []
        for cfg, t in zip(self.configs, self.tables):
            if not t.compressed:
                out.append(
                    EmbeddingConfig(
                        name=cfg.name,
                        num_embeddings=cfg.num_embeddings,
                        embedding_dim=cfg.embedding_dim,
                        feature_names=list(cfg.feature_names),
                        data_type=cfg.data_type,
                        init_fn=cfg.init_fn,
                    )
                )
                continue
            for part, rows in (("q", t.quotient_rows), ("r", t.num_collisions)):
                out.append(
                    EmbeddingConfig(
                        name=f"{cfg.name}@{part}",
                        num_embeddings=rows,
                        embedding_dim=cfg.embedding_dim,
                        feature_names=[f"{f}@{part}" for f in cfg.feature_names],
                        data_type=cfg.data_type,
                    )
                )
        return out

    def split(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The features the lookups take: ``f@q``/``f@r`` for compressed tables, ``f`` else."""
        return split_ids(features, self._collisions)

    def combine(self, embeddings: Dict[str, JaggedTensor]) -> KeyedTensor:
        """Per-id ``Q[q] * R[r]`` (or ``+``) pooled by each bag, as the user's KeyedTensor."""
        per_id: List[torch.Tensor] = []
        lengths: List[torch.Tensor] = []
        for f, t in self._features:
            if t.compressed:
                q, r = embeddings[f"{f}@q"], embeddings[f"{f}@r"]
                per_id.append(q.values() * r.values() if t.operation == "mult" else q.values() + r.values())
                lengths.append(q.lengths())
            else:
                per_id.append(embeddings[f].values())
                lengths.append(embeddings[f].lengths())
        return KeyedTensor(
            keys=self._embedding_names, length_per_key=self._dims, values=pool_bags(per_id, lengths, self._mean)
        )

    def cost(self) -> Dict[str, Dict[str, float]]:
        """Per table ``n, d, c``, quotient rows, parameter count and achieved ratio, plus total."""
        return cost_report(
            {
                t.name: {
                    "n": t.num_embeddings,
                    "d": t.embedding_dim,
                    "c": t.num_collisions,
                    "quotient_rows": t.quotient_rows,
                    "parameters": t.num_parameters,
                    "uncompressed_parameters": t.num_embeddings * t.embedding_dim,
                    "ratio": t.ratio,
                }
                for t in self.tables
            }
        )


class QREmbeddingBagCollection(CompressedCollection):
    """EmbeddingBagCollection with quotient-remainder tables: ``e_i = Q[i // c] * R[i % c]``.

    Built from the user's own ``EmbeddingBagConfig``s (one dim for all) plus a ``QRConfig`` (one
    for all tables, or a dict by table name; tables left out, or smaller than ``min_rows``, stay
    uncompressed). Bags pool per-id embeddings with the configs' SUM or MEAN. State dict:
    ``embeddings.T@q.weight`` (``ceil(n/c) x d``) and ``embeddings.T@r.weight`` (``c x d``);
    ``embeddings.T.weight`` for uncompressed tables: the keys of the EmbeddingCollection that the
    sharded module is built on.

    Args:
        tables: the user's ``EmbeddingBagConfig``s (one dim; ``qr_collection`` takes several).
        compression: one ``QRConfig`` for all tables, or a dict of them by table name.
        device: where the tables are made (default: the CPU; ``meta`` for DMP to place them).

    Example::

        tables = [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=1000, feature_names=["f0"])]
        ebc = QREmbeddingBagCollection(tables, QRConfig(num_collisions=10))  # Q: 100 rows, R: 10
        ebc(kjt)["f0"]             # [B, 8] pooled embeddings
        ebc.cost()["t0"]["ratio"]  # 1000 / 110
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        compression: Union[QRConfig, Dict[str, QRConfig]],
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.layout = QRLayout(tables, compression)
        self._embedding_bag_configs = self.layout.configs
        self.embeddings: nn.ModuleDict = EmbeddingCollection(self.layout.lookup_configs(), device=device).embeddings
        self._device = torch.device(device or next(iter(self.embeddings.parameters())).device)
        self._lookup_features = [(cfg.name, f) for cfg in self.layout.lookup_configs() for f in cfg.feature_names]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        check_input(features, "QR", self.layout.num_embeddings)
        split = self.layout.split(features).to_dict()
        return self.layout.combine(
            {
                f: JaggedTensor(values=self.embeddings[table](split[f].values()).float(), lengths=split[f].lengths())
                for table, f in self._lookup_features
            }
        )

    def reset_parameters(self) -> None:
        """Every lookup table by its ``init_fn`` (``Q``, ``R``: TorchRec's default for their rows)."""
        if self._device.type == "meta":
            return
        with torch.no_grad():
            for cfg in self.layout.lookup_configs():
                assert cfg.init_fn is not None
                cfg.init_fn(self.embeddings[cfg.name].weight)

    def cost(self) -> Dict[str, Dict[str, float]]:
        return self.layout.cost()

    @property
    def tables(self) -> List[QRTable]:
        return self.layout.tables


def qr_collection(
    tables: List[EmbeddingBagConfig],
    compression: Union[QRConfig, Dict[str, QRConfig]],
    device: Optional[torch.device] = None,
) -> nn.Module:
    """One ``QREmbeddingBagCollection`` per embedding dim (joined if there are several)."""
    by_dim: Dict[int, List[EmbeddingBagConfig]] = {}
    for t in tables:
        by_dim.setdefault(t.embedding_dim, []).append(t)
    table_specs(tables, compression)  # a dict naming unknown tables fails here, before splitting by dim
    parts = [
        QREmbeddingBagCollection(
            group,
            {t.name: compression[t.name] for t in group if t.name in compression}
            if isinstance(compression, dict)
            else compression,
            device=device,
        )
        for group in by_dim.values()
    ]
    return parts[0] if len(parts) == 1 else MixedEmbeddingBagCollection(parts)
