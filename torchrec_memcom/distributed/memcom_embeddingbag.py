"""Sharded MEmCom collection and its sharder.

The shared tables are a stock weighted ShardedEmbeddingBagCollection on FBGEMM's table-batched
kernels, held by the common wrapper (``compressed_embeddingbag.py``; state dict key
``embedding_bags.T.weight``). Around it: ``input_dist`` turns entity ids into (shared row, slot
block ``k``) before the stock input distribution, carrying ``k + 1`` as the KJT weight;
``compute`` swaps it for the trainable per-entity scalar (after ``input_dist``, which runs under
``no_grad``) and runs the stock lookup, whose SUM-pooled per-sample-weight gradient trains the
scalars. The ``+ 1`` makes the weight a plain table travels with (``k = 0``) its pooling weight
1: the stock row-wise MEAN divisor is the sum of the KJT weights of a bag, which must then be its
length.
"""

import dataclasses
from functools import partial
from typing import Any, Dict, List, Optional, Set, Tuple, Type

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torchrec.distributed.embedding_types import KJTList, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionContext, EmbeddingBagCollectionSharder
from torchrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.distributed.collection_sharder import CollectionSharder
from torchrec_memcom.distributed.compressed_embeddingbag import ShardedCompressedCollection
from torchrec_memcom.distributed.entity_weights import ShardedEntityWeights
from torchrec_memcom.distributed.scalar_layout import (
    COLUMN_SHARDED,
    FUSED_KERNELS,
    SUPPORTED_SHARDING_TYPES,
    table_layout,
)
from torchrec_memcom.distributed.stock_views import kjt_with, repeat_per_key, shard_view
from torchrec_memcom.modules.collection_checks import check_ids
from torchrec_memcom.modules.hashing import mix_constants, mix_slots
from torchrec_memcom.modules.layout_cache import LayoutCache
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


@dataclasses.dataclass
class MEmComContext(EmbeddingBagCollectionContext):
    """The stock context plus this batch's anchor of the scalars' update (column-wise replicas),
    which ``transform_output`` adds to the output so that backward reaches every replica's sync.

    Args:
        anchor: the anchor of ``lookup_fused`` (None: no replicas to sync); the stock
            ``EmbeddingBagCollectionContext``'s fields besides.
    """

    anchor: Optional[torch.Tensor] = None


class ShardedMEmComEmbeddingBagCollection(ShardedCompressedCollection[MEmComContext]):
    """Sharded ``MEmComEmbeddingBagCollection``: the stock sharded EBC of its shared tables
    (weighted) plus its per-entity scalars, sharded with their rows.

    DMP builds it (through ``MEmComEmbeddingBagCollectionSharder``); it is not built by hand.

    Args:
        module: the unsharded collection.
        table_name_to_parameter_sharding: the plan of its tables.
        ebc_sharder: the stock sharder that shards the shared tables.
        env, device, module_fqn: as for TorchRec's sharded modules.

    Example::

        sharders = [MEmComEmbeddingBagCollectionSharder(), *get_default_sharders()]
        plan = memcom_planner(topology, batch_size=512).collective_plan(model, sharders, pg)
        dmp = DistributedModelParallel(model, plan=plan, sharders=sharders)
        dmp.module.ebc  # this class, where model.ebc was a MEmComEmbeddingBagCollection
    """

    def __init__(
        self,
        module: MEmComEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        ebc_sharder: EmbeddingBagCollectionSharder,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        plan = table_name_to_parameter_sharding
        embedding_module = shard_view(module, True, ebc_sharder, plan, env, device, module_fqn)
        super().__init__(embedding_module, module.cost(), ebc_sharder.qcomm_codecs_registry)
        device = device or torch.device("cpu")
        self._tables: Dict[str, MEmComTable] = {t.name: t for t in module.tables}
        self._feature_table: Dict[str, MEmComTable] = {
            f: self._tables[cfg.name] for cfg in module.embedding_bag_configs() for f in cfg.feature_names
        }
        self._num_embeddings = {f: t.num_embeddings for f, t in self._feature_table.items()}
        self._init_weight = module._init_weight
        fused_params = {
            info.embedding_config.name: dict(info.fused_params or {})
            for infos in embedding_module.sharding_type_to_sharding_infos.values()
            for info in infos
        }
        layouts = {
            t.name: table_layout(
                t,
                table_name_to_parameter_sharding[t.name],
                env.world_size,
                device,
                fused_params.get(t.name),
                module.scalar_configs[t.name],
            )
            for t in module.tables
            if t.compressed
        }
        self.entity_weights = ShardedEntityWeights(layouts, env.rank, env.world_size, device, env.process_group)
        self.add_fused_optimizer(self.entity_weights.fused_optimizer)
        # Per lookup: (start, rows) of each feature's scalars ((0, 0): none), whether a feature
        # has scalars, and whether any is data-parallel (see transform_dist_input). A lookup's features in
        # its KJT's order: its `grouped_configs` (TorchRec lists them nowhere public).
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
        # the factor TorchRec scales each lookup's per-sample-weight gradient by (private: its
        # rule, world size unless data-parallel or gradient division is off, is nowhere public)
        self._scales = [float(getattr(_unwrap(lookup), "_scale_gradient_factor", 1)) for lookup in self._lookups]
        # per-value constants of input_dist's remap and of each lookup's scalars, per KJT layout
        self._remaps = LayoutCache()
        self._scalar_layouts = LayoutCache()
        self._skip_plain_gradients()
        if module.device.type == "meta":
            self._reset_scalars()
        else:  # start from the unsharded module's values
            for name in module.entity_weights:
                self.entity_weights.load_table(name, module.entity_weights.flat(name).detach())

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

    def create_context(self) -> MEmComContext:
        return MEmComContext()

    def reset_parameters(self) -> None:
        """Shared rows by their configs' ``init_fn``, per-entity scalars to ``init_weight``."""
        super().reset_parameters()
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

    def transform_input(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Entity ids -> shared rows, with the slot block ``k`` plus 1 as weight."""
        if features.weights_or_none() is not None:
            raise ValueError("MEmCom inputs carry no weights: the per-entity scalars are its own")
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
        return kjt_with(features, rows, k.add_(1).to(torch.float32))

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

    def transform_dist_input(self, ctx: MEmComContext, dist_input: KJTList) -> KJTList:
        """Replace each KJT's ``k + 1`` weights by the per-entity scalars (1 for plain tables);
        with column-wise replicas, keep the anchor in ``ctx`` for ``transform_output``."""
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
        ctx.anchor = anchor if self.entity_weights.needs_anchor else None
        return KJTList([kjt_with(kjt, kjt.values(), w) for kjt, w in zip(dist_input, out)])

    @staticmethod
    def _place(scalars: torch.Tensor, positions: Optional[torch.Tensor], kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Per-value weights: the scalars at ``positions`` (all if None), 1 elsewhere."""
        if positions is None:
            return scalars
        return torch.ones_like(kjt.weights()).index_copy(0, positions, scalars)

    def transform_output(self, ctx: MEmComContext, output: KeyedTensor) -> KeyedTensor:
        """``+ 0 * anchor``: backward reaches the replicas' sync on every rank (see lookup_fused)."""
        if ctx.anchor is not None:
            output.values().add_(0.0 * ctx.anchor)
        return output

    @property
    def dense_parameters(self) -> Set[str]:
        """Data-parallel scalars, which DMP's DDP trains like the DP tables' rows."""
        return {"entity_weights.dense"}

    @property
    def unsharded_module_type(self) -> Type[MEmComEmbeddingBagCollection]:
        return MEmComEmbeddingBagCollection

    @property
    def tables(self) -> List[MEmComTable]:
        return list(self._tables.values())


def _unwrap(lookup: nn.Module) -> Any:
    """A lookup out of the DDP TorchRec wraps data-parallel ones in (typed Any: TorchRec types
    its lookups as plain modules, whose attributes mypy cannot see)."""
    while isinstance(lookup, nn.parallel.DistributedDataParallel):
        lookup = lookup.module
    return lookup


class MEmComEmbeddingBagCollectionSharder(CollectionSharder):
    """Shards ``MEmComEmbeddingBagCollection``; pass it to DMP/the planner with the stock ones.

    Args:
        fused_params: as for TorchRec's EBC sharder (the tables' fused optimizer; the scalars
            follow it, see ``MEmComConfig``'s scalar settings).
        qcomm_codecs_registry: as for TorchRec's EBC sharder.
        column_wise: offer column-wise and table-column-wise to the planner. Off by default:
            every rank holding a column shard keeps a replica of the table's per-entity
            scalars, which the scalars' sharding exists to avoid. A hand-written plan may use
            them either way.

    Example::

        sharders = [MEmComEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD}), *get_default_sharders()]
        plan = EmbeddingShardingPlanner(topology).collective_plan(model, sharders, pg)
        model = DistributedModelParallel(model, plan=plan, sharders=sharders)
    """

    unsharded: Type[nn.Module] = MEmComEmbeddingBagCollection
    sharded: Type[ShardedEmbeddingModule] = ShardedMEmComEmbeddingBagCollection

    def __init__(self, *args: Any, column_wise: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._column_wise = column_wise

    def sharding_types(self, compute_device_type: str) -> List[str]:
        """Row-wise too on CPU (MEmCom routes slots by shared row); column-wise only if asked."""
        return [t for t in SUPPORTED_SHARDING_TYPES if self._column_wise or t not in COLUMN_SHARDED]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        """The stock kernels the scalars' in-backward update runs with: fused ones for
        model-parallel tables (no key-value or virtual tables), dense for data-parallel."""
        kernels = super().compute_kernels(sharding_type, compute_device_type)
        return [k for k in kernels if k in FUSED_KERNELS or sharding_type == ShardingType.DATA_PARALLEL.value]
