"""`MEmComEmbeddingBagCollection`: an EmbeddingBagCollection whose tables are MEmCom-compressed."""

import dataclasses
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    get_embedding_names_by_table,
)
from torchrec.optim import SGD as TorchRecSGD, Adagrad as TorchRecAdagrad, RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.modules.collection_checks import (
    check_input,
    feature_sizes,
    table_specs,
    with_rows,
)
from torchrec_memcom.modules.compressed_collection import CompressedCollection
from torchrec_memcom.modules.hashing import slots
from torchrec_memcom.modules.memcom_config import MEmComConfig, ScalarRule, compression_ratio

# fx-traced models keep these data-reading calls as single nodes (TorchRec wraps its own alike)
torch.fx.wrap("check_input")
torch.fx.wrap("slots")


@dataclasses.dataclass(frozen=True)
class MEmComTable:
    """What one table became: ``m`` shared rows (``m == n`` and no scalars if uncompressed).

    Args:
        name: the table's name.
        num_embeddings: ``n``, its ids (and per-entity scalars, if compressed).
        embedding_dim: ``d``.
        hash_rows: ``m``, the shared rows.
        hash: "mod" or "mix" (``MEmComConfig.hash``).
        compressed: whether it is MEmCom-compressed.

    Example::

        t = MEmComTable("t0", num_embeddings=1000, embedding_dim=16, hash_rows=100, hash="mod", compressed=True)
        t.num_parameters  # 100 * 16 + 1000
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    hash_rows: int
    hash: str
    compressed: bool

    @property
    def num_parameters(self) -> int:
        return self.hash_rows * self.embedding_dim + (self.num_embeddings if self.compressed else 0)

    @property
    def ratio(self) -> float:
        if not self.compressed:
            return 1.0
        return compression_ratio(self.num_embeddings, self.embedding_dim, self.hash_rows)

    @property
    def num_slot_blocks(self) -> int:
        """``K = ceil(n / m)``: slot ``s`` is ``k * m + row`` with ``k < K``."""
        return -(-self.num_embeddings // self.hash_rows)


# Optimizer classes whose rule the per-entity scalars take (one scalar per row: row-wise Adagrad
# is Adagrad), and whether that rule is Adagrad.
SCALAR_OPTIMIZERS = {
    torch.optim.SGD: False,
    TorchRecSGD: False,
    torch.optim.Adagrad: True,
    TorchRecAdagrad: True,
    RowWiseAdagrad: True,
}
# Options the scalars' update does not implement, with the value that makes them no-ops: a table
# configured otherwise is refused rather than its scalars trained differently from its rows.
NEUTRAL_OPTIONS = {
    "weight_decay": 0.0,
    "momentum": 0.0,
    "lr_decay": 0.0,
    "initial_accumulator_value": 0.0,
    "nesterov": False,
    "maximize": False,
    "dampening": 0.0,
}


class EntityWeights(nn.ParameterDict):
    """The per-entity scalars of each compressed table: ``(n, 1)`` parameters, one row per entity,
    so that row-wise optimizers (TorchRec's ``RowWiseAdagrad`` over a model's sparse parameters)
    take them as they take table rows; the state dict shows each as ``(n,)``, indexed by slot.

    Args:
        scalars: the initial ``(n,)`` scalars of each table, by table name.

    Example::

        weights = EntityWeights({"t0": torch.ones(1000)})
        weights["t0"].shape        # (1000, 1)
        weights.flat("t0").shape   # (1000,)
        weights.state_dict()["t0"].shape  # (1000,)
    """

    def __init__(self, scalars: Dict[str, torch.Tensor]) -> None:
        super().__init__({name: nn.Parameter(w.reshape(-1, 1)) for name, w in scalars.items()})
        self.register_state_dict_post_hook(_flatten_scalars)
        self.register_load_state_dict_pre_hook(_column_scalars)

    def flat(self, name: str) -> torch.Tensor:
        """Table ``name``'s scalars as an ``(n,)`` view."""
        return self[name].view(-1)


def _flatten_scalars(module: nn.Module, state: Dict[str, Any], prefix: str, _meta: Any) -> None:
    for name in module._parameters:
        if prefix + name in state:
            state[prefix + name] = state[prefix + name].view(-1)


def _column_scalars(_module: nn.Module, state: Dict[str, Any], prefix: str, *_args: Any) -> None:
    for key, value in list(state.items()):
        if key.startswith(prefix) and "." not in key[len(prefix) :] and value.dim() == 1:
            state[key] = value.reshape(-1, 1)


def scalar_rule(table: str, optimizer: torch.optim.Optimizer, spec: MEmComConfig) -> ScalarRule:
    """The update of a table's scalars given ``optimizer``, the table's: SGD or Adagrad at the
    lr and eps ``spec`` resolves; other optimizers, or options the update lacks, are refused."""
    adagrad = SCALAR_OPTIMIZERS.get(type(optimizer))
    if adagrad is None:
        raise ValueError(
            f"table {table!r}: MEmCom per-entity scalars follow the table's optimizer, which must be "
            f"SGD, Adagrad or RowWiseAdagrad; got {type(optimizer).__name__} (attach one of those "
            f"with apply_optimizer_in_backward)"
        )
    group = optimizer.param_groups[0]
    odd = {k: group[k] for k, v in NEUTRAL_OPTIONS.items() if k in group and group[k] != v}
    if odd:
        raise ValueError(
            f"table {table!r}: the update of MEmCom per-entity scalars implements plain SGD/Adagrad "
            f"(lr, eps) only; unsupported optimizer options {odd}"
        )
    return spec.scalar_rule(adagrad, float(group["lr"]), float(group.get("eps", 1e-10)))


def scalar_optimizer(
    table: str, optimizer: torch.optim.Optimizer, spec: MEmComConfig, scalars: nn.Parameter
) -> torch.optim.Optimizer:
    """The in-backward optimizer of a table's scalars that follows ``optimizer``, the table's."""
    rule = scalar_rule(table, optimizer, spec)
    if rule.adagrad:
        return torch.optim.Adagrad([scalars], lr=rule.lr, eps=rule.eps)
    return torch.optim.SGD([scalars], lr=rule.lr)


def plan_tables(
    tables: List[EmbeddingBagConfig], compression: Union[MEmComConfig, Dict[str, MEmComConfig]]
) -> List[MEmComTable]:
    """Resolve the compression spec into per-table shapes (errors name the table)."""
    feature_sizes(tables)  # each feature reads one table
    specs = table_specs(tables, compression)
    out = []
    for t in tables:
        spec = specs[t.name]
        compressed = spec is not None and spec.compresses(t.num_embeddings)
        if compressed and t.pooling != PoolingType.SUM:
            raise ValueError(
                f"table {t.name!r}: MEmCom tables pool with SUM (FBGEMM gives wrong per-sample-"
                f"weight gradients under MEAN); got pooling {t.pooling.name}"
            )
        out.append(
            MEmComTable(
                name=t.name,
                num_embeddings=t.num_embeddings,
                embedding_dim=t.embedding_dim,
                hash_rows=spec.hash_rows(t.num_embeddings, t.embedding_dim, t.name)
                if spec is not None and compressed
                else t.num_embeddings,
                hash=spec.hash if spec is not None and compressed else "mod",
                compressed=compressed,
            )
        )
    return out


class MEmComEmbeddingBagCollection(CompressedCollection):
    """EmbeddingBagCollection with MEmCom tables: ``e_i = U[h(i)] * w[i]``, bags pooled with SUM.

    Built from the user's own ``EmbeddingBagConfig``s plus a ``MEmComConfig`` (one for all tables,
    or a dict by table name; tables left out, or smaller than ``min_rows``, stay uncompressed).
    State dict: ``embedding_bags.T.weight`` (``m x d``) and ``entity_weights.T`` (``n``, indexed
    by slot; for ``hash="mod"`` the slot of id ``i`` is ``i``).

    Args:
        tables: the user's ``EmbeddingBagConfig``s (compressed ones pool with SUM).
        compression: one ``MEmComConfig`` for all tables, or a dict of them by table name.
        device: where the tables are made (default: the CPU; ``meta`` for DMP to place them).

    Example::

        tables = [EmbeddingBagConfig(name="t0", embedding_dim=16, num_embeddings=10_000, feature_names=["f0"])]
        ebc = MEmComEmbeddingBagCollection(tables, MEmComConfig(ratio=8))
        ebc(kjt)["f0"]             # [B, 16] pooled embeddings
        ebc.cost()["t0"]["m"]      # 625 shared rows: 10_000 * 16 / (625 * 16 + 10_000) = 8
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        compression: Union[MEmComConfig, Dict[str, MEmComConfig]],
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self._embedding_bag_configs = tables
        self._compression = compression
        self.tables: List[MEmComTable] = plan_tables(tables, compression)
        specs = table_specs(tables, compression)
        # per compressed table: its init and the settings of its scalars' optimizer
        self.scalar_configs: Dict[str, MEmComConfig] = {}
        for t in self.tables:
            spec = specs[t.name]
            if t.compressed and spec is not None:
                self.scalar_configs[t.name] = spec
        self._init_weight = {name: spec.init_weight for name, spec in self.scalar_configs.items()}
        # The shared tables, as a stock weighted EBC would hold them: `embedding_bags.T.weight`.
        self.embedding_bags = EmbeddingBagCollection(
            self.hashed_configs(), is_weighted=True, device=device
        ).embedding_bags
        device = device or next(iter(self.embedding_bags.parameters())).device
        self._device = torch.device(device)
        self.entity_weights = EntityWeights(
            {
                t.name: torch.full((t.num_embeddings,), self._init_weight[t.name], device=device)
                for t in self.tables
                if t.compressed
            }
        )
        self._embedding_names = [n for names in get_embedding_names_by_table(tables) for n in names]
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        self._num_embeddings = feature_sizes(tables)

    def scalar_tables(self) -> List[MEmComTable]:
        """The tables with per-entity scalars (the compressed ones)."""
        return [t for t in self.tables if t.compressed]

    def hashed_configs(self) -> List[EmbeddingBagConfig]:
        """The configs of the shared tables (``m`` rows) as a stock EBC would take them."""
        return [
            with_rows(cfg, t.hash_rows) if t.compressed else cfg
            for cfg, t in zip(self._embedding_bag_configs, self.tables)
        ]

    def adopt_table_optimizers(self) -> None:
        """Scalars given in-backward optimizers (``apply_optimizer_in_backward`` over the model's
        sparse parameters, TorchRec's pattern) take their table's rule instead, as sharded.

        Their hook steps whatever ``_in_backward_optimizers`` holds, so swapping its entries is
        enough; a RowWiseAdagrad on the 1-D scalars would fail, and an lr other than the
        resolved one would train them differently from the sharded module. Reads parameters
        through ``named_parameters``, which fx tracing leaves real (attributes become proxies),
        so a traced forward adopts them too, at trace time.
        """
        weights = dict(self.embedding_bags.named_parameters())
        for name, w in self.entity_weights.named_parameters():
            attached = getattr(w, "_in_backward_optimizers", None)
            if not attached or getattr(w, "_memcom_rule", None) is attached[0]:
                continue
            table = getattr(weights[f"{name}.weight"], "_in_backward_optimizers", None)
            rule = scalar_optimizer(name, (table or attached)[0], self.scalar_configs[name], w)
            attached[:] = [rule]
            w._optimizer_classes[:] = [type(rule)]  # type: ignore[attr-defined]
            w._optimizer_kwargs[:] = [{k: rule.defaults[k] for k in ("lr", "eps") if k in rule.defaults}]  # type: ignore[attr-defined]
            w._memcom_rule = rule  # type: ignore[attr-defined]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.adopt_table_optimizers()
        check_input(features, "MEmCom", self._num_embeddings)
        feature_dict = features.to_dict()
        pooled = []
        for cfg, t in zip(self._embedding_bag_configs, self.tables):
            bag = self.embedding_bags[t.name]
            for feature in cfg.feature_names:
                f = feature_dict[feature]
                ids, weights = f.values(), None
                if t.compressed:
                    s = slots(ids, t.num_embeddings, t.hash)
                    # in the table's dtype (fp16 tables: F.embedding_bag takes one dtype)
                    weights = self.entity_weights.flat(t.name)[s].to(bag.weight.dtype)
                    ids = s % t.hash_rows
                pooled.append(
                    F.embedding_bag(
                        ids,
                        bag.weight,
                        f.offsets(),
                        mode=bag.mode,
                        per_sample_weights=weights,
                        include_last_offset=True,
                    ).float()
                )
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=self._dims,
            values=torch.cat(pooled, dim=1),
        )

    def reset_parameters(self) -> None:
        """Shared rows by each config's ``init_fn`` (TorchRec's default recomputed for ``m`` rows
        unless the user gave one); per-entity scalars to ``init_weight``."""
        if self._device.type == "meta":
            return
        with torch.no_grad():
            for cfg in self.hashed_configs():
                assert cfg.init_fn is not None
                cfg.init_fn(self.embedding_bags[cfg.name].weight)
            for name, w in self.entity_weights.items():
                w.fill_(self._init_weight[name])
