"""`compress(model, spec)`: swap every EmbeddingBagCollection of a model for compressed ones.

Methods register in ``torchrec_memcom.registry`` (from ``torchrec_memcom/methods/``); each
builds a collection from the user's own ``EmbeddingBagConfig``s plus per-table configs, and
names the sharder DMP needs for it.
"""

import dataclasses
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple, cast

import torch
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.fp_embeddingbag import FeatureProcessedEmbeddingBagCollectionSharder
from torchrec.distributed.fused_embeddingbag import FusedEmbeddingBagCollectionSharder
from torchrec.distributed.mc_embedding import ManagedCollisionEmbeddingCollectionSharder
from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

import torchrec_memcom.methods  # noqa: F401  (registers every method)
from torchrec_memcom.distributed.mixed_embeddingbag import MixedEmbeddingBagCollectionSharder
from torchrec_memcom.modules.hash_embedding_bag import HashEmbeddingBagCollection
from torchrec_memcom.modules.memcom_config import MEmComConfig
from torchrec_memcom.modules.memcom_embedding_bag import scalar_rule
from torchrec_memcom.modules.mixed_embedding_bag import MixedEmbeddingBagCollection
from torchrec_memcom.registry import NONE, get_method, method_names, method_of_config, methods

# The method that hosts the plain tables of a mixed collection (a hash collection hashing none).
PLAIN_HOST = "hash"


@dataclasses.dataclass
class TableCompression:
    """Method and parameters of one table.

    Args:
        method: the method's name (``none`` leaves the table as it is).
        params: a dict, or the method's config object (``MEmComConfig``, ``HashConfig``,
            ``QRConfig``, ``BudgetedConfig``), which then names the method; held as a dict.

    Example::

        TableCompression("hash", {"ratio": 4})
        TableCompression(params=HashConfig(ratio=4))  # the same: method "hash"
    """

    method: str = "none"
    params: Any = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method, self.params = _method_params(self.method, self.params, "params")


def _method_params(method: str, params: Any, where: str) -> Tuple[str, Dict[str, Any]]:
    """``(method, params as a dict)``; a config object names its method (and must agree)."""
    if isinstance(params, dict):
        return method, params
    found = method_of_config(params)
    if found is None:
        raise ValueError(
            f"{where}: expected a dict or one of {sorted(m.config.__name__ for m in methods())}, got {params!r}"
        )
    owner = found.name
    if method not in (NONE, owner):
        raise ValueError(f"{where}: a {type(params).__name__} is method {owner!r}, not {method!r}")
    return owner, dataclasses.asdict(params)


def _choice(value: Any, where: str) -> TableCompression:
    """A per-table override: a TableCompression, a method's config object, or a mapping."""
    if isinstance(value, TableCompression):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"method", "params"})
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown key (known: ['method', 'params'])")
        return TableCompression(**value)
    return TableCompression(params=value)


@dataclasses.dataclass
class CompressionSpec:
    """Which method compresses which table; checked when built (method names, params names and
    values), so a typo fails here, not when ``compress()`` builds the tables.

    Args:
        method / params: the default for every table (params: a dict, or the method's config
            object, which then names the method).
        min_rows: tables with fewer rows stay uncompressed.
        tables: per-table overrides by table name (``TableCompression``, a config object, or a dict).

    Example::

        CompressionSpec(params=MEmComConfig(ratio=16), min_rows=10_000,
                        tables={"t_cat_3": HashConfig(ratio=4), "t_cat_9": TableCompression("none")})
    """

    method: str = "none"
    params: Any = dataclasses.field(default_factory=dict)
    min_rows: int = 0
    tables: Dict[str, TableCompression] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method, self.params = _method_params(self.method, self.params, "compression.params")
        self.tables = {name: _choice(t, f"compression.tables.{name}") for name, t in self.tables.items()}
        for where, method in [("method", self.method)] + [
            (f"tables.{name}.method", t.method) for name, t in self.tables.items()
        ]:
            if method not in method_names(with_none=True):
                raise ValueError(
                    f"compression {where}: unknown method {method!r}; known: {[NONE, *sorted(method_names())]}"
                )
        check_spec(self)

    def for_table(self, config: EmbeddingBagConfig) -> TableCompression:
        if config.name in self.tables:
            return self.tables[config.name]
        if config.num_embeddings < self.min_rows:
            return TableCompression()
        return TableCompression(self.method, dict(self.params))


def _check_tables(spec: CompressionSpec, tables: Iterable[str]) -> None:
    """Per-table overrides must name tables that exist (a typo would silently do nothing)."""
    unknown = set(spec.tables) - set(tables)
    if unknown:
        raise ValueError(f"compression names unknown tables: {sorted(unknown)}")


def compress_collection(
    ebc: EmbeddingBagCollection, spec: CompressionSpec, where: str = "the collection", whole_model: bool = False
) -> Tuple[nn.Module, List[str]]:
    """The compressed replacement of one EBC (``ebc`` itself if no table is compressed) and
    the methods it uses. Uncompressed tables keep their ``nn.EmbeddingBag`` (weights, device,
    dtype and any optimizer attached to them); compressed ones start from their method's init.
    ``whole_model``: ``spec`` covers other collections too (``compress()`` checks its table
    names against all of them)."""
    configs = ebc.embedding_bag_configs()
    if not whole_model:
        _check_tables(spec, [c.name for c in configs])
    choices = {cfg.name: spec.for_table(cfg) for cfg in configs}
    used = {c.method for c in choices.values()} - {NONE}
    if not used:
        return ebc, []
    if type(ebc) is not EmbeddingBagCollection:
        raise ValueError(
            f"{where} is a {type(ebc).__name__}, a subclass of EmbeddingBagCollection: compressing it "
            f"would replace it with a collection without its own code (as DMP's stock sharder, "
            f"which shards the exact type only, would not shard it); leave its tables "
            f"uncompressed (TableCompression('none')) or compress a plain EmbeddingBagCollection"
        )
    if ebc.is_weighted():
        raise ValueError(
            f"a weighted EmbeddingBagCollection (per-sample weights) cannot be compressed with "
            f"{sorted(used)}: compressed collections pool unweighted bags"
        )
    host = next(iter(used)) if len(used) == 1 else None
    plain = NONE if host is None or not get_method(host).holds_plain_tables else host
    groups: Dict[str, List[EmbeddingBagConfig]] = {}
    params: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for cfg in configs:
        choice = choices[cfg.name]
        group = plain if choice.method == NONE else choice.method
        groups.setdefault(group, []).append(cfg)
        if choice.method != NONE:
            params.setdefault(group, {})[cfg.name] = choice.params
    parts = [
        # The plain tables of a mixed collection: a hash collection that hashes none of them,
        # a stock EBC but for its sharder, which corrects TorchRec's row-wise MEAN divisor
        # (stock_views.row_sharded_columns). On meta: its tables are the user's, adopted below.
        HashEmbeddingBagCollection(tables, {}, device=torch.device("meta"))
        if method == NONE
        else _build(method, tables, params.get(method, {}), ebc.device)
        for method, tables in groups.items()
    ]
    for part, method in zip(parts, groups):
        _adopt_plain_tables(part, ebc, [c.name for c in groups[method] if choices[c.name].method == NONE])
        if method == NONE:
            part._device = ebc.device
    module = parts[0] if len(parts) == 1 else MixedEmbeddingBagCollection(parts)
    return module, list(dict.fromkeys(PLAIN_HOST if m == NONE else m for m in groups))


def _build(
    method: str, tables: List[EmbeddingBagConfig], params: Dict[str, Dict[str, Any]], device: torch.device
) -> nn.Module:
    """``method``'s collection of ``tables``, each table's params made its config object."""
    m = get_method(method)
    return m.build(tables, {name: m.config(**p) for name, p in params.items()}, device)


def _adopt_plain_tables(part: nn.Module, ebc: EmbeddingBagCollection, names: List[str]) -> None:
    """Give ``part`` the user's own ``nn.EmbeddingBag`` of each uncompressed table in ``names``
    (MEmCom and hash collections hold them as ``embedding_bags[name]``)."""
    for name in names:
        cast(nn.ModuleDict, part.embedding_bags)[name] = ebc.embedding_bags[name]


# A parameter of a table: `embedding_bags.T.weight`, `entity_weights.T@tier0`, `embeddings.T@q.weight`
# (QR), inside any collection; budgeted tables' `projections.*` are dense and match nothing.
_TABLE_PARAMETER = re.compile(r"(?:^|\.)(?:embedding_bags|entity_weights|embeddings)\.([^.@]+)")


def table_parameters(module: nn.Module) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
    """The sparse parameters of each user table inside a (compressed) collection, by table name."""
    out: Dict[str, List[Tuple[str, nn.Parameter]]] = {}
    for name, p in module.named_parameters():
        match = _TABLE_PARAMETER.search(name)
        if match:
            out.setdefault(match.group(1), []).append((name, p))
    return out


def carry_optimizers(old: EmbeddingBagCollection, new: nn.Module) -> None:
    """Attach to ``new``'s parameters of each table the optimizer ``apply_optimizer_in_backward``
    attached to that table's weight in ``old`` (the per-entity scalars take the table's rule);
    refuse, naming the fix, what cannot be carried."""
    params = table_parameters(new)
    for name, bag in old.embedding_bags.items():
        weight = bag.weight
        classes = getattr(weight, "_optimizer_classes", [])
        if not classes:
            continue
        if len(classes) > 1:
            raise ValueError(
                f"table {name!r} has {len(classes)} optimizers applied in backward; compress() carries "
                f"one (TorchRec fuses only the first): apply one, or apply them after compress()"
            )
        if any(re.search(r"(?:^|\.)entity_weights\.", n) for n, _ in params[name]):
            # refuse now what the scalars cannot follow (options, optimizer kinds)
            scalar_rule(name, weight._in_backward_optimizers[0], MEmComConfig(num_hash_rows=1))
        # an uncompressed table keeps the user's own weight, which already carries its optimizer
        fresh = [p for _, p in params[name] if not getattr(p, "_optimizer_classes", None)]
        if fresh:
            apply_optimizer_in_backward(classes[0], fresh, weight._optimizer_kwargs[0])


def stock_sharders(fused_params: Optional[Dict[str, Any]]) -> List[ModuleSharder]:
    """TorchRec's default sharders, the training ones built with ``fused_params``
    (``get_default_sharders()`` builds them without)."""
    if fused_params is None:
        return get_default_sharders()
    fp = dict(fused_params)
    training: List[ModuleSharder] = [
        EmbeddingBagCollectionSharder(fused_params=fp),
        FeatureProcessedEmbeddingBagCollectionSharder(ebc_sharder=EmbeddingBagCollectionSharder(fused_params=fp)),
        EmbeddingCollectionSharder(fused_params=fp),
        FusedEmbeddingBagCollectionSharder(fused_params=fp),
        ManagedCollisionEmbeddingBagCollectionSharder(
            ebc_sharder=EmbeddingBagCollectionSharder(fused_params=fp), fused_params=fp
        ),
        ManagedCollisionEmbeddingCollectionSharder(
            ec_sharder=EmbeddingCollectionSharder(fused_params=fp), fused_params=fp
        ),
    ]
    built = {s.module_type for s in training}
    return training + [s for s in get_default_sharders() if s.module_type not in built]  # inference ones


def compress(
    model: nn.Module, spec: CompressionSpec, fused_params: Optional[Dict[str, Any]] = None
) -> Tuple[nn.Module, List[ModuleSharder]]:
    """Replace each ``EmbeddingBagCollection`` inside ``model`` (in place) as ``spec`` says.

    An optimizer attached to a table's weight with ``apply_optimizer_in_backward`` is attached
    to its new parameters (shared tables and per-entity scalars; not budgeted tables' dense
    projections). Returns the model and the sharders DMP needs: ours for the methods used, plus
    TorchRec's stock ones (DMP picks sharders by exact module type), all with ``fused_params``.
    """
    if isinstance(model, EmbeddingBagCollection):
        raise ValueError("compress() swaps collections inside a model; wrap a bare EBC first")
    ebcs = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    _check_tables(spec, [c.name for ebc in ebcs for c in ebc.embedding_bag_configs()])
    used: List[str] = []
    mixed: List[str] = []  # the methods of mixed collections' children
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, EmbeddingBagCollection):
                new, found = compress_collection(child, spec, ".".join(filter(None, [path, name])), whole_model=True)
                carry_optimizers(child, new)
                setattr(parent, name, new)
                used += [m for m in found if m not in used]
                if isinstance(new, MixedEmbeddingBagCollection):
                    mixed += [m for m in found if m not in mixed]
    sharders: List[ModuleSharder] = [get_method(m).sharder(fused_params) for m in used]
    if mixed:
        # shards a mixed collection as one module (which the train pipeline pipelines), each
        # child by the sharder above of its type
        children = [s for m, s in zip(used, sharders) if m in mixed]
        sharders.append(MixedEmbeddingBagCollectionSharder(children, fused_params=fused_params))
    return model, sharders + stock_sharders(fused_params)


def check_spec(spec: CompressionSpec, key: str = "compression") -> None:
    """Reject now, naming the key (``key.params.ratoi``), params a method would only reject when
    it builds its tables, inside every rank of a job: unknown names, and the values the
    method's config refuses (budgeted: the names, the budget and the scalar settings; its files
    are read when it builds). ``CompressionSpec`` runs it when built."""
    if spec.min_rows < 0:
        raise ValueError(f"{key}.min_rows: must be >= 0, got {spec.min_rows}")
    choices = [(key, TableCompression(spec.method, spec.params))]
    choices += [(f"{key}.tables.{name}", t) for name, t in spec.tables.items()]
    for where, choice in choices:
        if choice.method == NONE:
            if choice.params:
                raise ValueError(f"{where}.params: method none takes no params, got {choice.params}")
            continue
        config = get_method(choice.method).config
        known = [f.name for f in dataclasses.fields(config)]
        unknown = sorted(set(choice.params) - set(known))
        if unknown:
            raise ValueError(f"{where}.params.{unknown[0]}: unknown key (known: {known})")
        try:
            config(**choice.params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}.params: {e}") from None
