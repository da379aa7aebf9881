"""`BudgetedEmbeddingBagCollection`: tables held to a hard memory budget, sized by popularity.

After BET (Qu et al., WSDM 2024): each table's ids are cut by frequency rank into tiers; a tier
stores its ids at its own dim and a bias-free projection brings it to the model dim. Because
the projection is linear, a SUM-pooled bag is the sum over tiers of the projected per-tier
pools, so the tiers are ordinary tables (``T@tier0``, ``T@tier1``, ...) that stock TorchRec
kernels look up, each fed the ids of its tier.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.modules.budget_allocation import Allocation, TableAllocation, Tier
from torchrec_memcom.modules.budget_bytes import (
    FP32_BYTES,
    Budget,
    TableBytes,
    check_budget,
    shapes_of,
    uncompressed_bytes,
)
from torchrec_memcom.modules.collection_checks import check_input, cost_report, feature_sizes
from torchrec_memcom.modules.compressed_collection import CompressedCollection
from torchrec_memcom.modules.frequency import clean_cuts, frequency_ranks, needs_remap, table_counts
from torchrec_memcom.modules.layout_cache import LayoutCache
from torchrec_memcom.modules.memcom_config import MEmComConfig
from torchrec_memcom.modules.memcom_embedding_bag import MEmComEmbeddingBagCollection, MEmComTable
from torchrec_memcom.modules.sorting import stable_argsort

# fx-traced models keep this data-reading call as single nodes (TorchRec wraps its own alike)
torch.fx.wrap("check_input")


def tier_key(name: str, tier: int) -> str:
    """Name of tier ``tier`` of a table or of a feature: ``name@tier<j>``."""
    return f"{name}@tier{tier}"


def check_sum_pooling(tables: Sequence[EmbeddingBagConfig]) -> None:
    """Raise naming the table unless every table pools with SUM (the per-tier pools add up to
    the bag only then)."""
    for t in tables:
        if t.pooling != PoolingType.SUM:
            raise ValueError(
                f"table {t.name!r}: budgeted tables pool with SUM (the per-tier pools add up "
                f"to the bag only then); got pooling {t.pooling.name}"
            )


@dataclasses.dataclass(frozen=True)
class BudgetedTable:
    """One user table and the tiers it became.

    Args:
        name: the table's name.
        num_embeddings: ``n``, its ids.
        embedding_dim: ``d``, the model dim.
        feature_names: the features reading it.
        tiers: its tiers, most popular first.
        remap: whether it keeps the rank of every id (its ids are not in rank order at the cuts).
        bytes: its bytes by kind, as the budget counts them.

    Example::

        t = ebc.tables[0]  # of a BudgetedEmbeddingBagCollection
        t.starts           # the first rank of each tier, e.g. [0, 100]
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: Tuple[str, ...]
    tiers: Tuple[Tier, ...]
    remap: bool
    bytes: TableBytes

    @property
    def starts(self) -> List[int]:
        return TableAllocation(self.tiers).starts


@dataclasses.dataclass(frozen=True)
class _TierLayout:
    """What ``split_by_tier`` needs of one KJT layout, built once (``_TIER_LAYOUTS``).

    The features' ranks are laid end to end (feature ``i`` from ``base_i``, the sizes of the
    tables of the features before it), so that one ``bucketize`` against every tier's first
    rank, feature after feature, finds the output key of every id at once.
    """

    keys: List[str]  # the output keys: f@tier<j> per input feature f, tier by tier
    starts: torch.Tensor  # the first (global) rank of each output key
    bases: torch.Tensor  # per value: base_i of its feature
    examples: torch.Tensor  # per bag (feature after feature): its example

    @staticmethod
    def build(
        keys: List[str], length_per_key: List[int], tables: List[BudgetedTable], batch: int, device: torch.device
    ) -> "_TierLayout":
        out_keys: List[str] = []
        starts: List[int] = []
        bases: List[int] = []
        base = 0
        for key, t in zip(keys, tables):
            bases.append(base)
            out_keys += [tier_key(key, j) for j in range(len(t.tiers))]
            starts += [base + s for s in t.starts]
            base += t.num_embeddings
        return _TierLayout(
            keys=out_keys,
            starts=torch.tensor(starts, dtype=torch.int64, device=device),
            bases=torch.repeat_interleave(
                torch.tensor(bases, dtype=torch.int64, device=device),
                torch.tensor(length_per_key, dtype=torch.int64, device=device),
                output_size=sum(length_per_key),
            ),
            examples=torch.arange(batch, device=device).repeat(len(keys)),
        )


# split_by_tier is a free function (fx-wraps it): its layouts are cached here, by value
_TIER_LAYOUTS = LayoutCache()


@torch.fx.wrap  # reads ids and lengths: one node in a traced model
def split_by_tier(
    features: KeyedJaggedTensor,
    feature_tables: Mapping[str, BudgetedTable],
    ranks: Mapping[str, torch.Tensor],
) -> KeyedJaggedTensor:
    """Ids of feature ``f`` -> rows of features ``f@tier<j>`` (every bag split by tier).

    The rank of an id is ``ranks[table][id]`` for remapped tables, the id itself otherwise; its
    tier is the last one starting at or before that rank, its row the rank minus that start.
    All features at once: one ``bucketize`` of their ranks laid end to end (``_TierLayout``),
    one stable sort of the ids by (output key, example).
    """
    if features.variable_stride_per_key():
        raise ValueError("budgeted tables take KJTs with one batch size for all features")
    batch = features.stride()
    values = features.values()
    keys = features.keys()
    length_per_key = features.length_per_key()
    tables = [feature_tables[key] for key in keys]
    layout = _TIER_LAYOUTS.get(
        (tuple(keys), tuple(length_per_key), tuple((t.num_embeddings, t.tiers) for t in tables), batch, values.device),
        lambda: _TierLayout.build(keys, length_per_key, tables, batch, values.device),
    )
    if any(t.remap for t in tables):
        ids = values.split(length_per_key)
        rank = torch.cat([ranks[t.name].index_select(0, part) if t.remap else part for t, part in zip(tables, ids)])
        rank = rank.to(torch.int64)
    else:
        rank = values.to(torch.int64)
    rank = rank + layout.bases
    out_key = torch.bucketize(rank, layout.starts, right=True) - 1  # the last tier starting at or before it
    example = torch.repeat_interleave(layout.examples, features.lengths().to(torch.int64), output_size=values.numel())
    slot = out_key * batch + example
    order = stable_argsort(slot)
    lengths = torch.bincount(slot, minlength=len(layout.keys) * batch).to(features.lengths().dtype)
    rows = (rank - layout.starts.index_select(0, out_key)).index_select(0, order)
    return KeyedJaggedTensor(keys=layout.keys, values=rows, lengths=lengths, stride=batch)


def combine_tiers(
    tables: Sequence[BudgetedTable], projections: nn.ModuleDict, pooled: Mapping[str, torch.Tensor]
) -> KeyedTensor:
    """Per user feature, the sum over its tiers of the projected per-tier pools.

    One matmul per table: the tiers' pools side by side times the projections side by side
    (the identity for a tier at the model dim); the features of a table share it.
    """
    out = []
    for t in tables:
        d = t.embedding_dim
        weight: Optional[torch.Tensor] = None
        if len(t.tiers) > 1 or t.tiers[0].dim != d:
            some = pooled[tier_key(t.feature_names[0], 0)]
            weight = torch.cat(
                [
                    cast(nn.Linear, projections[tier_key(t.name, j)]).weight
                    if tier.dim != d
                    else torch.eye(d, dtype=some.dtype, device=some.device)
                    for j, tier in enumerate(t.tiers)
                ],
                dim=1,
            )
        for f in t.feature_names:
            parts = [pooled[tier_key(f, j)] for j in range(len(t.tiers))]
            out.append(parts[0] if weight is None else F.linear(torch.cat(parts, dim=1), weight))
    return KeyedTensor(
        keys=[f for t in tables for f in t.feature_names],
        length_per_key=[t.embedding_dim for t in tables for _ in t.feature_names],
        values=torch.cat(out, dim=1),
    )


@torch.no_grad()
def identity_init(projection: nn.Linear) -> None:
    """``[I; 0]``: a tier's vector starts as the leading coordinates of the model-dim vector."""
    projection.weight.zero_()
    projection.weight.fill_diagonal_(1.0)


class RankBuffers(nn.Module):
    """The rank of every id (int32) of each remapped table, as buffers ``T`` (key ``remap.T``).

    Args:
        ranks: the rank of every id, by table name.
        device: where the buffers are made.

    Example::

        remap = RankBuffers({"t0": torch.tensor([2, 0, 1])}, device=None)
        remap.as_dict()["t0"]  # tensor([2, 0, 1], dtype=torch.int32)
    """

    def __init__(self, ranks: Mapping[str, torch.Tensor], device: Optional[torch.device]) -> None:
        super().__init__()
        for name, r in ranks.items():
            self.register_buffer(name, r.to(device=device, dtype=torch.int32))

    def as_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.named_buffers())


def budgeted_cost(tables: Sequence[BudgetedTable], limit: int, optimizer: Optional[str]) -> Dict[str, Dict[str, Any]]:
    """The shared cost report (parameters, ratio) plus, per table, its tiers and the budget's
    bytes by kind, and in ``total`` the bytes against the budget."""
    rows: Dict[str, Dict[str, Any]] = {}
    for t in tables:
        b = t.bytes
        rows[t.name] = {
            "n": t.num_embeddings,
            "d": t.embedding_dim,
            "tiers": [dataclasses.asdict(x) for x in t.tiers],
            "remap": t.remap,
            "parameters": (b.tables + b.scalars + b.projections) // FP32_BYTES,
            "uncompressed_parameters": t.num_embeddings * t.embedding_dim,
            "ratio": t.num_embeddings * t.embedding_dim * FP32_BYTES / (b.tables + b.scalars + b.projections),
            **{f"{kind}_bytes": v for kind, v in dataclasses.asdict(b).items()},
            "bytes": b.total,
            "uncompressed_bytes": uncompressed_bytes(t.num_embeddings, t.embedding_dim, optimizer),
        }
    report: Dict[str, Dict[str, Any]] = cost_report(rows)
    report["total"].update(
        bytes=sum(r["bytes"] for r in rows.values()),
        uncompressed_bytes=sum(r["uncompressed_bytes"] for r in rows.values()),
        budget_bytes=limit,
        optimizer=optimizer,
    )
    return report


class BudgetedEmbeddingBagCollection(CompressedCollection):
    """EmbeddingBagCollection whose tables fit a hard memory budget, sizes by id popularity.

    Construction fails unless the allocation fits the budget. State dict:
    ``embedding_bags.T@tier<j>.weight`` (rows of tier ``j`` by rank within the tier),
    ``entity_weights.T@tier<j>`` (per-id scalars of a MEmCom tier), ``projections.T@tier<j>.weight``
    (``d x dim_j``, only where ``dim_j < d``) and ``remap.T`` (int32 rank of each id, only for
    tables whose ids are not already in frequency order at the tier cuts).

    Args:
        tables: the user's ``EmbeddingBagConfig``s (SUM pooling); all of them are budgeted.
        frequencies: per table (or per feature, summed over a table's features) the count of each
            id, e.g. ``torchrec_memcom.data.load_frequencies(dir)``; ids are ranked by it.
        allocation: an ``Allocation`` (or a file from ``memcom budget search|heuristic``); for the
            quick popularity heuristic use ``torchrec_memcom.methods.budgeted.budgeted_collection``.
        budget_bytes / budget_ratio: the budget, in bytes or as uncompressed bytes / budget.
        optimizer: also count this sparse optimizer's state ("sgd", "rowwise_adagrad", "adagrad");
            it must be the one the tables train with (the sharder checks the fused optimizer).
        tail: MEmCom tails are allowed: the over-budget error's smallest feasible budget counts them.
        scalars: the per-entity scalars of MEmCom tiers: a ``MEmComConfig``'s ``init_weight``,
            ``scalar_lr``, ``scalar_lr_scale`` and ``scalar_eps`` as a dict (default: init 1, 10x the
            tier table's lr and its eps, as ``MEmComConfig``).
        device: where the tables are made (default: the CPU; ``meta`` for DMP to place them).

    Example::

        tables = [EmbeddingBagConfig(name="t0", embedding_dim=16, num_embeddings=1000, feature_names=["f0"])]
        allocation = Allocation({"t0": TableAllocation((Tier(rows=100, dim=16), Tier(rows=900, dim=4)))})
        ebc = BudgetedEmbeddingBagCollection(tables, {"t0": counts}, allocation, budget_ratio=2)
        ebc(kjt)["f0"]  # [B, 16]: popular ids at dim 16, the rest at 4, projected
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        frequencies: Mapping[str, Any],
        allocation: Union[Allocation, str, Path],
        budget_bytes: Optional[int] = None,
        *,
        budget_ratio: Optional[float] = None,
        optimizer: Optional[str] = None,
        tail: bool = False,
        scalars: Optional[Mapping[str, Any]] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        scalar_settings = scalar_params(scalars or {})
        self._num_embeddings = feature_sizes(tables)  # each feature reads one table
        check_sum_pooling(tables)
        self._embedding_bag_configs = tables
        self.budget = Budget(bytes=budget_bytes, ratio=budget_ratio, optimizer=optimizer)
        shapes = shapes_of(tables)
        counts = table_counts(tables, frequencies)
        if allocation is None:
            raise ValueError(
                "budgeted tables need an allocation (an Allocation or a file of `memcom budget "
                "search|heuristic`); torchrec_memcom.methods.budgeted.budgeted_collection builds the heuristic one"
            )
        if not isinstance(allocation, Allocation):
            allocation = Allocation.load(allocation)
        ranks = {name: frequency_ranks(c) for name, c in counts.items()}
        clean = {name: clean_cuts(r) for name, r in ranks.items()}
        per_table = check_budget(allocation, shapes, clean, self.budget, tail)
        self.allocation = allocation
        self.budget_limit = self.budget.resolve(shapes)
        self.tables: List[BudgetedTable] = [
            BudgetedTable(
                name=t.name,
                num_embeddings=t.num_embeddings,
                embedding_dim=t.embedding_dim,
                feature_names=tuple(t.feature_names),
                tiers=allocation.tables[t.name].tiers,
                remap=needs_remap(allocation.tables[t.name], clean[t.name]),
                bytes=per_table[t.name],
            )
            for t in tables
        ]
        # The tier tables as a MEmCom collection (MEmCom tiers compressed, the others plain).
        # This module adopts its modules, so parameters and the state dict show them at
        # `embedding_bags.*` / `entity_weights.*`; the collection itself is a submodule
        # registered last (module and parameter names list a module once, where first met),
        # whose `_tiers.*` copies of those keys the state-dict hooks leave out.
        tier_configs, memcom = [], {}
        for cfg, t in zip(tables, self.tables):
            for j, tier in enumerate(t.tiers):
                tier_configs.append(
                    dataclasses.replace(
                        cfg,
                        name=tier_key(t.name, j),
                        num_embeddings=tier.rows,
                        embedding_dim=tier.dim,
                        feature_names=[tier_key(f, j) for f in t.feature_names],
                        init_fn=cfg.init_fn,  # the whole table's init range, not the tier's
                    )
                )
                if tier.hash_rows is not None:
                    memcom[tier_key(t.name, j)] = MEmComConfig(num_hash_rows=tier.hash_rows, **scalar_settings)
        tiers = MEmComEmbeddingBagCollection(tier_configs, memcom, device=device)
        self.embedding_bags = tiers.embedding_bags
        self.entity_weights = tiers.entity_weights
        self._device = tiers.device
        self.projections = nn.ModuleDict(
            {
                tier_key(t.name, j): nn.Linear(tier.dim, t.embedding_dim, bias=False, device=self._device)
                for t in self.tables
                for j, tier in enumerate(t.tiers)
                if tier.dim != t.embedding_dim
            }
        )
        remapped = {t.name: ranks[t.name] for t in self.tables if t.remap}
        self.remap = RankBuffers(remapped, self._device)
        # A meta module holds no values: keep the ranks for the sharder to place.
        self._meta_ranks = remapped if self._device.type == "meta" else {}
        self._tiers = tiers
        self._load_prefix = ""  # this module's path in the load under way (see _with_tier_copies)
        self.register_state_dict_post_hook(_without_tier_copies)
        self.register_load_state_dict_pre_hook(_with_tier_copies)
        self.register_load_state_dict_post_hook(_report_tier_keys_once)
        self._feature_tables = {f: t for t in self.tables for f in t.feature_names}
        if self._device.type != "meta":
            for p in self.projections.values():
                identity_init(cast(nn.Linear, p))

    @property
    def tier_collection(self) -> MEmComEmbeddingBagCollection:
        """The tier tables as a MEmComEmbeddingBagCollection sharing this module's parameters."""
        return self._tiers

    def scalar_tables(self) -> List[MEmComTable]:
        """The tier tables with per-entity scalars (MEmCom tails)."""
        return self.tier_collection.scalar_tables()

    def ranks(self) -> Dict[str, torch.Tensor]:
        """Rank of every id of each remapped table (held on the host for a meta module)."""
        return dict(self._meta_ranks) or self.remap.as_dict()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        check_input(features, "budgeted", self._num_embeddings)
        tiered = split_by_tier(features, self._feature_tables, self.remap.as_dict())
        # forward, not __call__: its hook would warn of the tier tables apart from this module
        return combine_tiers(self.tables, self.projections, self.tier_collection.forward(tiered).to_dict())

    def reset_parameters(self) -> None:
        """Tier rows by their table's ``init_fn``, MEmCom scalars to 1, projections ``[I; 0]``."""
        if any(p.is_meta for p in self.parameters()):
            return
        with torch.no_grad():
            for cfg in self.tier_collection.hashed_configs():
                assert cfg.init_fn is not None
                cfg.init_fn(self.embedding_bags[cfg.name].weight)
            for name, w in self.entity_weights.items():
                w.fill_(self.tier_collection._init_weight[name])
        for p in self.projections.values():
            identity_init(cast(nn.Linear, p))

    def parameter_bytes(self) -> int:
        """Bytes of the module's state: tier tables, MEmCom scalars, projections, remap."""
        return sum(t.bytes.parameters for t in self.tables)

    def optimizer_bytes(self) -> int:
        """Bytes of the sparse optimizer's state the budget counts (0 if it counts none)."""
        return sum(t.bytes.optimizer for t in self.tables)

    def cost(self) -> Dict[str, Dict[str, Any]]:
        """The shared report plus tiers and bytes per table; ``total`` has the budget."""
        return budgeted_cost(self.tables, self.budget_limit, self.budget.optimizer)


def _without_tier_copies(module: nn.Module, state: Dict[str, Any], prefix: str, _meta: Any) -> None:
    """State-dict hook: the tier tables once, at this module's own paths."""
    for key in [k for k in state if k.startswith(f"{prefix}_tiers.")]:
        del state[key]


def _with_tier_copies(module: BudgetedEmbeddingBagCollection, state: Dict[str, Any], prefix: str, *_args: Any) -> None:
    """Load pre-hook: the tier collection loads the same tensors its adopted modules do."""
    module._load_prefix = prefix
    for key in [k for k in state if k.startswith((f"{prefix}embedding_bags.", f"{prefix}entity_weights."))]:
        state[f"{prefix}_tiers.{key[len(prefix) :]}"] = state[key]


def _report_tier_keys_once(module: BudgetedEmbeddingBagCollection, keys: Any) -> None:
    """Load post-hook: a missing or unexpected tier key named once, at this module's path."""
    copies = f"{module._load_prefix}_tiers."
    for names in (keys.missing_keys, keys.unexpected_keys):
        names[:] = [k for k in names if not k.startswith(copies)]


# The settings of MEmCom tiers' per-entity scalars a budgeted collection takes.
SCALAR_PARAMS = ("init_weight", "scalar_lr", "scalar_lr_scale", "scalar_eps")


def scalar_params(scalars: Mapping[str, Any]) -> Dict[str, Any]:
    """The scalar settings of MEmCom tiers, checked by ``MEmComConfig`` (errors name the key)."""
    unknown = sorted(set(scalars) - set(SCALAR_PARAMS))
    if unknown:
        raise ValueError(f"budgeted scalars: unknown key {unknown[0]!r} (known: {list(SCALAR_PARAMS)})")
    MEmComConfig(num_hash_rows=1, **scalars)
    return dict(scalars)


@dataclasses.dataclass
class BudgetedConfig:
    """Params of ``compress()``'s "budgeted" method: one for all budgeted tables of a
    collection (the budget is the collection's); None leaves a setting to its default.

    Args:
        allocation: a file of ``memcom budget search`` or ``heuristic`` (None: the heuristic).
        budget_bytes / budget_ratio / optimizer: the budget (default: the one the allocation file
            records); a set ``optimizer`` must be the training's sparse optimizer (sharding checks).
        tail / sizes: the heuristic's options (``torchrec_memcom.methods.budgeted.budgeted_collection``).
        frequencies: per table or per feature the count of each id (as
            ``BudgetedEmbeddingBagCollection`` takes them), or a data folder (default: the folder
            the allocation was made on).
        init_weight, scalar_lr, scalar_lr_scale, scalar_eps: the MEmCom tail's scalar settings.

    Example::

        CompressionSpec(params=BudgetedConfig(budget_ratio=16, frequencies="runs/data", tail=True))
    """

    allocation: Optional[str] = None
    budget_bytes: Optional[int] = None
    budget_ratio: Optional[float] = None
    optimizer: Optional[str] = None
    tail: bool = False
    sizes: Optional[List[int]] = None
    frequencies: Any = None
    init_weight: Optional[float] = None
    scalar_lr: Optional[float] = None
    scalar_lr_scale: Optional[float] = None
    scalar_eps: Optional[float] = None

    def __post_init__(self) -> None:
        if self.budget_bytes is not None or self.budget_ratio is not None:
            Budget(self.budget_bytes, self.budget_ratio)
        scalar_params(self.given(SCALAR_PARAMS))

    def given(self, keys: Sequence[str]) -> Dict[str, Any]:
        """The settings among ``keys`` that are set (not None)."""
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def collection_params(params: Mapping[str, Union[BudgetedConfig, Mapping[str, Any]]]) -> Dict[str, Any]:
    """The parameters all budgeted tables of a collection share (the budget is the
    collection's), as a dict of the settings given."""
    configs = [p if isinstance(p, BudgetedConfig) else BudgetedConfig(**p) for p in params.values()]
    given = [c.given([f.name for f in dataclasses.fields(BudgetedConfig)]) for c in configs]
    distinct = {json.dumps(g, sort_keys=True, default=str) for g in given}
    if len(distinct) > 1:
        raise ValueError(
            "budgeted tables share one budget and allocation: give their params once, as the "
            "compression spec's default params, not per table"
        )
    return next(iter(given), {})
