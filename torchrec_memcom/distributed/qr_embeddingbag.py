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
from torchrec.distributed.embedding import EmbeddingCollectionContext, EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.distributed.compressed_embeddingbag import ShardedCompressedCollection
from torchrec_memcom.modules.collection_checks import check_ids, check_unweighted
from torchrec_memcom.modules.qr_embedding_bag import QREmbeddingBagCollection, QRLayout, QRTable


def _lookup_view(module: QREmbeddingBagCollection) -> EmbeddingCollection:
    """A stock EC over the module's own lookup tables, for the stock sharder."""
    view = EmbeddingCollection(module.layout.lookup_configs(), device=torch.device("meta"))
    view.embeddings = module.embeddings
    view._device = module.device  # as stock_views.stock_view: the stock module copies values by it
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


class ShardedQREmbeddingBagCollection(ShardedCompressedCollection[EmbeddingCollectionContext]):
    """Sharded ``QREmbeddingBagCollection``: split ids, the stock sharded EC, join and pool.

    DMP builds it (through ``QREmbeddingBagCollectionSharder``); it is not built by hand.

    Args:
        module: the unsharded collection.
        table_name_to_parameter_sharding: the plan of its lookup tables (``T@q``, ``T@r``, ``T``).
        ec_sharder: the stock sharder that shards the lookup tables.
        env, device, module_fqn: as for TorchRec's sharded modules.

    Example::

        sharders = [QREmbeddingBagCollectionSharder(), *get_default_sharders()]
        plan = memcom_planner(topology, batch_size=512).collective_plan(model, sharders, pg)
        dmp = DistributedModelParallel(model, plan=plan, sharders=sharders)
        dmp.module.ebc  # this class, where model.ebc was a QREmbeddingBagCollection
    """

    def __init__(
        self,
        module: QREmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        ec_sharder: EmbeddingCollectionSharder,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        _check_kernels(module, table_name_to_parameter_sharding, device)
        # The stock EC copies the module's values in (on every device but meta).
        embedding_module = ec_sharder.shard(
            _lookup_view(module), table_name_to_parameter_sharding, env, device, module_fqn
        )
        super().__init__(embedding_module, module.layout.cost(), ec_sharder.qcomm_codecs_registry)
        self._layout: QRLayout = module.layout

    def transform_input(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Each compressed feature ``f`` -> ``f@q``, ``f@r``."""
        check_unweighted(features, "QR")
        if features.variable_stride_per_key():
            raise ValueError("QR collections take one batch size for all features (no VBE)")
        check_ids(features, self._layout.num_embeddings)
        return self._layout.split(features)

    def transform_output(self, ctx: EmbeddingCollectionContext, output: Any) -> KeyedTensor:
        """The per-id embeddings of ``f@q`` and ``f@r`` (a dict of JaggedTensors) joined, pooled."""
        embeddings: Dict[str, JaggedTensor] = output
        return self._layout.combine(embeddings)

    @property
    def unsharded_module_type(self) -> Type[QREmbeddingBagCollection]:
        return QREmbeddingBagCollection

    @property
    def tables(self) -> List[QRTable]:
        return self._layout.tables


class QREmbeddingBagCollectionSharder(EmbeddingCollectionSharder):
    """Shards ``QREmbeddingBagCollection``; plans name its lookup tables ``T@q``, ``T@r``, ``T``.

    Sharding types are the stock EC sharder's: table-, row-, column-wise, and data-parallel
    except on CPU (see the module docstring). Column-wise needs one column split for all the
    collection's column-wise tables (a stock EC rule).

    Args:
        fused_params, qcomm_codecs_registry, use_index_dedup: as for TorchRec's EC sharder.

    Example::

        sharders = [QREmbeddingBagCollectionSharder(fused_params=fused_params), *get_default_sharders()]
        model = DistributedModelParallel(model, plan=plan, sharders=sharders)
    """

    def shard(
        self,
        module: QREmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedQREmbeddingBagCollection:
        held = EmbeddingCollectionSharder(
            fused_params=self.fused_params,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            use_index_dedup=self._use_index_dedup,  # the stock EC sharder keeps its argument only there
        )
        return ShardedQREmbeddingBagCollection(module, params, held, env, device, module_fqn)

    def shardable_parameters(self, module: QREmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        return {name.split(".")[0]: weight for name, weight in module.embeddings.named_parameters()}

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            return [t for t in types if t != ShardingType.DATA_PARALLEL.value]
        return types

    @property
    def module_type(self) -> Type[QREmbeddingBagCollection]:
        return QREmbeddingBagCollection

    @property
    def sharded_module_type(self) -> Type[ShardedQREmbeddingBagCollection]:
        return ShardedQREmbeddingBagCollection
