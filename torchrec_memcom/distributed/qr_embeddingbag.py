"""Sharded quotient-remainder collection and its sharder.

QR's product is per id, before pooling, so pooled (TBE bag) lookups cannot give it. The lookups
are a stock ShardedEmbeddingCollection (unpooled, FBGEMM's table-batched kernels, any sharding
type the stock EC sharder has: table-, row-, column-wise, data-parallel) over the ``T@q``,
``T@r`` and uncompressed tables; state dict keys ``embeddings.<table>.weight``. Around it:
``input_dist`` splits each feature ``f`` into ``f@q``/``f@r`` before the stock input
distribution, and ``output_dist`` joins and pools the per-id embeddings after the stock output
distribution. The cost: per-id embeddings, not pooled ones, cross the output all-to-all.

On CPU the lookups need the fused kernel: FBGEMM's CPU dense kernel (fbgemm-gpu-cpu 1.8.0) pools
even when asked for unpooled lookups, which breaks data-parallel (dense only) and
``compute_kernel="dense"`` for the stock EmbeddingCollection too; the sharder refuses them there.
"""

from typing import Any, Dict, List, Optional, Type

import torch
from torch import nn
from torchrec.distributed.embedding import (
    EmbeddingCollectionContext,
    EmbeddingCollectionSharder,
    ShardedEmbeddingCollection,
)
from torchrec.distributed.embedding_types import EmbeddingComputeKernel, KJTList
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.modules.collection_checks import check_ids, check_unweighted
from torchrec_memcom.modules.qr_embedding_bag import QREmbeddingBagCollection, QRLayout, QRTable


def _lookup_view(module: QREmbeddingBagCollection) -> EmbeddingCollection:
    """A stock EC over the module's own lookup tables, for the stock sharder."""
    view = EmbeddingCollection(module.layout.lookup_configs(), device=torch.device("meta"))
    view.embeddings = module.embeddings
    view._device = module.device
    return view


def _check_kernels(
    module: QREmbeddingBagCollection, params: Dict[str, ParameterSharding], device: Optional[torch.device]
) -> None:
    """Refuse the dense kernel on CPU, where FBGEMM pools what should be per-id lookups."""
    if device is not None and device.type != "cpu":
        return
    dense = sorted(
        name for name in module.embeddings if params[name].compute_kernel == EmbeddingComputeKernel.DENSE.value
    )
    if dense:
        raise ValueError(
            f"QR lookup tables {dense}: on CPU they need the fused compute kernel (FBGEMM's CPU "
            f"dense kernel pools per-id lookups), so neither data_parallel nor "
            f"compute_kernel='dense' there"
        )


class ShardedQREmbeddingBagCollection(ShardedEmbeddingCollection):
    """Sharded ``QREmbeddingBagCollection``: split ids, stock sharded EC, join and pool."""

    def __init__(
        self,
        module: QREmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        use_index_dedup: bool = False,
        module_fqn: Optional[str] = None,
    ) -> None:
        _check_kernels(module, table_name_to_parameter_sharding, device)
        # The stock EC copies the module's values in (on every device but meta).
        super().__init__(
            _lookup_view(module),
            table_name_to_parameter_sharding,
            env,
            fused_params=fused_params,
            device=device,
            qcomm_codecs_registry=qcomm_codecs_registry,
            use_index_dedup=use_index_dedup,
            module_fqn=module_fqn,
        )
        self._layout: QRLayout = module.layout

    def input_dist(self, ctx: EmbeddingCollectionContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        """Each compressed feature ``f`` -> ``f@q``, ``f@r``, then the stock input distribution."""
        check_unweighted(features, "QR")
        if features.variable_stride_per_key():
            raise ValueError("QR collections take one batch size for all features (no VBE)")
        with torch.no_grad():
            check_ids(features, self._layout.num_embeddings)
            split = self._layout.split(features)
        return super().input_dist(ctx, split)

    def output_dist(self, ctx: EmbeddingCollectionContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        awaitable = super().output_dist(ctx, output)
        awaitable.callbacks.append(self._layout.combine)
        return awaitable

    def compute_and_output_dist(self, ctx: EmbeddingCollectionContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        awaitable = super().compute_and_output_dist(ctx, input)
        awaitable.callbacks.append(self._layout.combine)
        return awaitable

    def cost(self) -> Dict[str, Dict[str, float]]:
        """Same report as the unsharded module (global sizes)."""
        return self._layout.cost()

    @property
    def tables(self) -> List[QRTable]:
        return self._layout.tables


class QREmbeddingBagCollectionSharder(EmbeddingCollectionSharder):
    """Shards ``QREmbeddingBagCollection``; plans name its lookup tables ``T@q``, ``T@r``, ``T``.

    Sharding types are the stock EC sharder's: table-, row-, column-wise, and data-parallel
    except on CPU (see the module docstring). Column-wise needs one column split for all the
    collection's column-wise tables (a stock EC rule).
    """

    def shard(
        self,
        module: QREmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedQREmbeddingBagCollection:
        return ShardedQREmbeddingBagCollection(
            module,
            params,
            env,
            fused_params=self.fused_params,
            device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            use_index_dedup=self._use_index_dedup,
            module_fqn=module_fqn,
        )

    def shardable_parameters(self, module: QREmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        return {name: emb.weight for name, emb in module.embeddings.items()}

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types.remove(ShardingType.DATA_PARALLEL.value)
        return types

    @property
    def module_type(self) -> Type[QREmbeddingBagCollection]:
        return QREmbeddingBagCollection

    @property
    def sharded_module_type(self) -> Type[ShardedQREmbeddingBagCollection]:
        return ShardedQREmbeddingBagCollection
