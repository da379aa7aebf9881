"""Sharded MEmCom collection and its sharder.

The shared tables are a stock weighted ShardedEmbeddingBagCollection on FBGEMM's table-batched
kernels (so the state dict key stays ``embedding_bags.T.weight``). Around it:
``input_dist`` turns entity ids into (shared row, slot block ``k``) before the stock input
distribution, carrying ``k + 1`` as the KJT weight; ``compute`` swaps it for the trainable
per-entity scalar (after ``input_dist``, which runs under ``no_grad``) and runs the stock lookup,
whose SUM-pooled per-sample-weight gradient trains the scalars. The ``+ 1`` makes the weight a
plain table travels with (``k = 0``) its pooling weight 1: the stock row-wise MEAN divisor is
the sum of the KJT weights of a bag, which must then be its length.
"""

from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
)
from torchrec.distributed.utils import append_prefix
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.distributed.collection_sharder import CollectionSharder
from torchrec_memcom.distributed.entity_weights import ShardedEntityWeights
from torchrec_memcom.distributed.scalar_layout import COLUMN_SHARDED, SUPPORTED_SHARDING_TYPES, table_layout
from torchrec_memcom.distributed.state import copy_full_tensor
from torchrec_memcom.distributed.stock_views import (
    LayoutCache,
    correct_mean_divisor,
    kjt_with,
    repeat_per_key,
    stock_view,
)
from torchrec_memcom.modules.collection_checks import check_ids
from torchrec_memcom.modules.hashing import mix_constants, mix_slots
from torchrec_memcom.modules.memcom_embedding_bag import MEmComEmbeddingBagCollection, MEmComTable

# input_dist's per-value constants of a layout: n - 1, m, and the "mix" features' positions and
# per-value (n, mask, shift, mul1, mul2), if any
_Remap = Tuple[torch.Tensor, torch.Tensor, Optional[Tuple[torch.Tensor, List[torch.Tensor]]]]


def _feature_requires_grad(
    _module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], mask: torch.Tensor
) -> Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]]:
    """Forward pre-hook of a table-batched module: pass ``mask`` as its ``feature_requires_grad``."""
    if kwargs.get("per_sample_weights") is None or kwargs.get("feature_requires_grad") is not None:
        return None
    return args, {**kwargs, "feature_requires_grad": mask}


def _add_anchor(kt: KeyedTensor, anchor: torch.Tensor) -> KeyedTensor:
    kt._values.add_(0.0 * anchor)
    return kt


class ShardedMEmComEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """Sharded ``MEmComEmbeddingBagCollection``: stock sharded shared tables + sharded scalars."""

    def __init__(
        self,
        module: MEmComEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__(
            stock_view(module.hashed_configs(), module.embedding_bags, module.device, is_weighted=True),
            table_name_to_parameter_sharding,
            env,
            fused_params=fused_params,
            device=device,
            qcomm_codecs_registry=qcomm_codecs_registry,
            module_fqn=module_fqn,
        )
        device = device or torch.device("cpu")
        self._tables: Dict[str, MEmComTable] = {t.name: t for t in module.tables}
        self._feature_table: Dict[str, MEmComTable] = {
            f: self._tables[cfg.name] for cfg in module.embedding_bag_configs() for f in cfg.feature_names
        }
        self._num_embeddings = {f: t.num_embeddings for f, t in self._feature_table.items()}
        self._init_weight = module._init_weight
        table_fused_params = self._table_fused_params()
        layouts = {
            t.name: table_layout(
                t,
                table_name_to_parameter_sharding[t.name],
                env.world_size,
                device,
                table_fused_params.get(t.name),
                module.scalar_configs[t.name],
            )
            for t in module.tables
            if t.compressed
        }
        self.entity_weights = ShardedEntityWeights(layouts, env.rank, env.world_size, device, env.process_group)
        # Per lookup: (start, rows) of each feature's scalars ((0, 0): none), whether a feature
        # has scalars, and whether any is data-parallel (see _scalars).
        self._lookup_addresses: List[Tuple[List[Tuple[int, int]], List[bool], bool]] = []
        for lookup in self._lookups:
            names = [
                table.name if self._tables[table.name].compressed else None
                for config in _unwrap(lookup).grouped_configs
                for table in config.embedding_tables
                for _ in table.feature_names
            ]
            addresses = [self.entity_weights.address(n) for n in names]
            self._lookup_addresses.append(
                ([a[:2] for a in addresses], [n is not None for n in names], any(a[2] for a in addresses))
            )
        self._scales = [float(getattr(_unwrap(lookup), "_scale_gradient_factor", 1)) for lookup in self._lookups]
        # per-value constants of input_dist's remap and of each lookup's scalars, per KJT layout
        self._remaps = LayoutCache()
        self._scalar_layouts = LayoutCache()
        self._skip_plain_gradients()
        self._optim = CombinedOptimizer([("", self._optim), ("", self.entity_weights.fused_optimizer)])
        if module.device.type == "meta":
            self._reset_scalars()
        else:
            self._copy_from(module)

    def _skip_plain_gradients(self) -> None:
        """Have FBGEMM skip the per-sample-weight gradient of plain tables' features.

        Their weights are ones, but FBGEMM's backward computes a dot product per id for every
        feature of a table-batched module unless told which need it: on CPU the largest cost of
        MEmCom's step (docs/benchmarks.md, hot path). Reads TorchRec's private ``_emb_modules``:
        it has no public list of a lookup's kernels.
        """
        for lookup in self._lookups:
            lookup = _unwrap(lookup)
            for config, module in zip(lookup.grouped_configs, getattr(lookup, "_emb_modules", [])):
                tbe = getattr(module, "emb_module", None)
                if not isinstance(tbe, SplitTableBatchedEmbeddingBagsCodegen):
                    continue
                needs = [self._tables[t.name].compressed for t in config.embedding_tables for _ in t.feature_names]
                if not all(needs):
                    mask = torch.tensor(needs, dtype=torch.int32, device=tbe.D_offsets.device)
                    tbe.register_forward_pre_hook(partial(_feature_requires_grad, mask=mask), with_kwargs=True)

    def _table_fused_params(self) -> Dict[str, Dict[str, Any]]:
        """The fused optimizer params the stock sharding resolved for every table."""
        return {
            info.embedding_config.name: dict(info.fused_params or {})
            for infos in self.sharding_type_to_sharding_infos.values()
            for info in infos
        }

    @torch.no_grad()
    def _copy_from(self, module: MEmComEmbeddingBagCollection) -> None:
        """Start from the unsharded module's values (stock sharding does so only off the CPU)."""
        state = self.state_dict()
        for name, bag in module.embedding_bags.items():
            copy_full_tensor(state[f"embedding_bags.{name}.weight"], bag.weight.detach())
        for name in module.entity_weights:
            self.entity_weights.load_table(name, module.entity_weights.flat(name).detach())

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "entity_weights" in self._modules:  # the stock __init__ calls this before it exists
            self._reset_scalars()

    @torch.no_grad()
    def _reset_scalars(self) -> None:
        for name, w in self.entity_weights.storage.items():
            w.detach().fill_(self._init_weight[name])

    # ---- forward ------------------------------------------------------------------------------

    def _remap(self, keys: List[str], lengths: List[int], device: torch.device) -> _Remap:
        """Per value of this layout: ``n - 1`` and the shared rows ``m`` of its table (``m = n``
        for plain tables: row = id, k = 0); and, if some features hash with "mix", their
        values' positions and per-value ``n`` and ``mix_constants``."""

        def build() -> _Remap:
            tables = [self._feature_table[k] for k in keys]
            last = repeat_per_key([t.num_embeddings - 1 for t in tables], lengths, device)
            m = repeat_per_key([t.hash_rows if t.compressed else t.num_embeddings for t in tables], lengths, device)
            mixed = [t.compressed and t.hash == "mix" for t in tables]
            if not any(mixed):
                return last, m, None
            positions = torch.nonzero(repeat_per_key([int(x) for x in mixed], lengths, device)).view(-1)
            own = [(t, n) for t, n, x in zip(tables, lengths, mixed) if x]
            per_table = [(t.num_embeddings, *mix_constants(t.num_embeddings)) for t, _ in own]
            consts = [repeat_per_key(list(c), [n for _, n in own], device) for c in zip(*per_table)]
            return last, m, (positions, consts)

        return self._remaps.get((tuple(keys), tuple(lengths)), build)

    def input_dist(
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        """Entity ids -> shared rows, with the slot block ``k`` plus 1 as weight, then stock dist."""
        if features.weights_or_none() is not None:
            raise ValueError("MEmCom inputs carry no weights: the per-entity scalars are its own")
        with torch.no_grad():
            slot = features.values()
            last, m, mix = self._remap(features.keys(), features.length_per_key(), slot.device)
            # one pass and one sync: an id outside [0, n) makes id or n - 1 - id negative
            if slot.numel() and bool(torch.bitwise_or(last - slot, slot).min() < 0):
                check_ids(features, self._num_embeddings)  # raises, naming the feature
            if mix is not None:  # all "mix" features in one pass
                positions, consts = mix
                mixed = mix_slots(slot.index_select(0, positions), *consts)
                slot = slot.index_copy(0, positions, mixed.to(slot.dtype))
            k = torch.div(slot, m, rounding_mode="floor")
            rows = slot - k * m  # slot mod m, without a second division
            blocks = k.add_(1).to(torch.float32)
        awaitable = super().input_dist(ctx, kjt_with(features, rows, blocks))
        correct_mean_divisor(self, ctx)
        return awaitable

    def _scalar_layout(
        self, g: int, lengths: List[int], device: torch.device
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Per value of lookup ``g``'s KJT: ``start - rows`` and ``rows`` of its scalars (the
        weight carries ``k + 1``), and the positions of the values that have scalars (None: all)."""

        def build() -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
            addresses, compressed, _ = self._lookup_addresses[g]
            base = repeat_per_key([start - rows for start, rows in addresses], lengths, device)
            rows = repeat_per_key([rows for _, rows in addresses], lengths, device)
            if all(compressed):
                return base, rows, None
            mask = repeat_per_key([int(c) for c in compressed], lengths, device)
            return base, rows, torch.nonzero(mask).view(-1)

        return self._scalar_layouts.get((g, tuple(lengths)), build)

    def _scalars(self, dist_input: KJTList) -> Tuple[KJTList, Optional[torch.Tensor]]:
        """Replace each KJT's ``k + 1`` weights by the per-entity scalars (1 for plain tables)."""
        out: List[Optional[torch.Tensor]] = [None] * len(dist_input)
        fused, fused_at, scales = [], [], []
        for g, (kjt, (_, compressed, dense)) in enumerate(zip(dist_input, self._lookup_addresses)):
            if not any(compressed):
                out[g] = torch.ones_like(kjt.weights())
                continue
            base, rows, positions = self._scalar_layout(g, kjt.length_per_key(), kjt.values().device)
            idx = kjt.weights().long().mul_(rows).add_(base).add_(kjt.values())
            if positions is not None:  # plain tables have no scalars: their weight is 1
                idx = idx.index_select(0, positions)
            if dense:
                out[g] = self._place(self.entity_weights.lookup_dense(idx), positions, kjt)
            else:
                fused.append((idx, positions))
                fused_at.append(g)
                scales.append(self._scales[g])
        anchor = None
        if fused or self.entity_weights.needs_anchor:
            anchor, scalars = self.entity_weights.lookup_fused([idx for idx, _ in fused], scales)
            for g, w, (_, positions) in zip(fused_at, scalars, fused):
                out[g] = self._place(w, positions, dist_input[g])
        weighted = KJTList([kjt_with(kjt, kjt.values(), w) for kjt, w in zip(dist_input, out)])
        return weighted, anchor if self.entity_weights.needs_anchor else None

    @staticmethod
    def _place(scalars: torch.Tensor, positions: Optional[torch.Tensor], kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Per-value weights: the scalars at ``positions`` (all if None), 1 elsewhere."""
        if positions is None:
            return scalars
        return torch.ones_like(kjt.weights()).index_copy(0, positions, scalars)

    def compute(self, ctx: EmbeddingBagCollectionContext, dist_input: KJTList) -> List[torch.Tensor]:
        weighted, anchor = self._scalars(dist_input)
        ctx.memcom_anchor = anchor
        return super().compute(ctx, weighted)

    def output_dist(self, ctx: EmbeddingBagCollectionContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        awaitable = super().output_dist(ctx, output)
        anchor = getattr(ctx, "memcom_anchor", None)
        if anchor is not None:
            awaitable.callbacks.append(partial(_add_anchor, anchor=anchor))
        return awaitable

    def compute_and_output_dist(self, ctx: EmbeddingBagCollectionContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        weighted, anchor = self._scalars(input)
        awaitable = super().compute_and_output_dist(ctx, weighted)
        if anchor is not None:
            awaitable.callbacks.append(partial(_add_anchor, anchor=anchor))
        return awaitable

    # ---- what the rest of TorchRec asks of a sharded module -----------------------------------

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        """All but data-parallel scalars, which DMP's DDP trains like the DP tables' rows."""
        for name, _ in self.named_parameters():
            if name != "entity_weights.dense":
                yield append_prefix(prefix, name)

    def cost(self) -> Dict[str, Dict[str, float]]:
        """Same report as the unsharded module (global sizes)."""
        return MEmComEmbeddingBagCollection.cost(self)

    @property
    def tables(self) -> List[MEmComTable]:
        return list(self._tables.values())


def _unwrap(lookup: nn.Module) -> nn.Module:
    while isinstance(lookup, nn.parallel.DistributedDataParallel):
        lookup = lookup.module
    return lookup


class MEmComEmbeddingBagCollectionSharder(CollectionSharder):
    """Shards ``MEmComEmbeddingBagCollection``; pass it to DMP/the planner with the stock ones.

    ``column_wise``: offer column-wise and table-column-wise to the planner. Off by default:
    every rank holding a column shard keeps a replica of the table's per-entity scalars, which
    the scalars' sharding exists to avoid. A hand-written plan may use them either way.
    """

    unsharded = MEmComEmbeddingBagCollection
    sharded = ShardedMEmComEmbeddingBagCollection

    def __init__(self, *args: Any, column_wise: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._column_wise = column_wise

    def sharding_types(self, compute_device_type: str) -> List[str]:
        """Row-wise too on CPU (MEmCom routes slots by shared row); column-wise only if asked."""
        return [t for t in SUPPORTED_SHARDING_TYPES if self._column_wise or t not in COLUMN_SHARDED]
