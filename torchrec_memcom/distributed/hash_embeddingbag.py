"""Sharded hashing-trick collection and its sharder.

The hashed tables are a stock ShardedEmbeddingBagCollection on FBGEMM's table-batched kernels
(state dict key ``embedding_bags.T.weight``, any stock sharding type, fused optimizers), held by
the common wrapper (``compressed_embeddingbag.py``). ``input_dist`` turns ids into rows
``h(i) mod m`` before the stock input distribution; nothing else differs from a stock EBC of
``m``-row tables.
"""

from typing import Dict, List, Optional, Tuple, Type

import torch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionContext, EmbeddingBagCollectionSharder
from torchrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_memcom.distributed.collection_sharder import CollectionSharder
from torchrec_memcom.distributed.compressed_embeddingbag import ShardedCompressedCollection
from torchrec_memcom.distributed.stock_views import kjt_with, shard_view
from torchrec_memcom.modules.collection_checks import check_ids, check_unweighted
from torchrec_memcom.modules.hash_embedding_bag import HashEmbeddingBagCollection, HashTable
from torchrec_memcom.modules.layout_cache import LayoutCache


class ShardedHashEmbeddingBagCollection(ShardedCompressedCollection[EmbeddingBagCollectionContext]):
    """Sharded ``HashEmbeddingBagCollection``: ids hashed in ``input_dist``, then the stock EBC.

    DMP builds it (through ``HashEmbeddingBagCollectionSharder``); it is not built by hand.

    Args:
        module: the unsharded collection.
        table_name_to_parameter_sharding: the plan of its tables.
        ebc_sharder: the stock sharder that shards the hashed tables.
        env, device, module_fqn: as for TorchRec's sharded modules.

    Example::

        sharders = [HashEmbeddingBagCollectionSharder(), *get_default_sharders()]
        plan = memcom_planner(topology, batch_size=512).collective_plan(model, sharders, pg)
        dmp = DistributedModelParallel(model, plan=plan, sharders=sharders)
        dmp.module.ebc  # this class, where model.ebc was a HashEmbeddingBagCollection
    """

    def __init__(
        self,
        module: HashEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        ebc_sharder: EmbeddingBagCollectionSharder,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        plan = table_name_to_parameter_sharding
        embedding_module = shard_view(module, False, ebc_sharder, plan, env, device, module_fqn)
        super().__init__(embedding_module, module.cost(), ebc_sharder.qcomm_codecs_registry)
        self._hash_tables = module.tables
        self._feature_table: Dict[str, HashTable] = {
            f: t for cfg, t in zip(module.embedding_bag_configs(), module.tables) for f in cfg.feature_names
        }
        self._num_embeddings = {f: t.num_embeddings for f, t in self._feature_table.items()}
        self._moduli = LayoutCache()

    def _modulus(self, keys: List[str], device: torch.device) -> Tuple[torch.Tensor, List[int]]:
        """``m`` per feature of this key order (``n`` for plain tables, where ``i mod n = i``),
        and the positions of features hashed with "mix"."""

        def build() -> Tuple[torch.Tensor, List[int]]:
            tables = [self._feature_table[k] for k in keys]
            mixed = [i for i, t in enumerate(tables) if t.compressed and t.hash == "mix"]
            return torch.tensor([t.hash_rows for t in tables], device=device), mixed

        return self._moduli.get(tuple(keys), build)

    def transform_input(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Ids -> hashed rows (``HashTable.rows``, for all features at once)."""
        check_unweighted(features, "hash")
        check_ids(features, self._num_embeddings)
        ids = features.values()
        modulus, mixed = self._modulus(features.keys(), ids.device)
        lengths = features.length_per_key()
        if mixed:
            parts = list(ids.split(lengths))
            for i in mixed:
                parts[i] = self._feature_table[features.keys()[i]].rows(parts[i])
            ids = torch.cat(parts)
        rows = ids % torch.repeat_interleave(modulus, torch.tensor(lengths, device=ids.device))
        return kjt_with(features, rows, None)

    @property
    def unsharded_module_type(self) -> Type[HashEmbeddingBagCollection]:
        return HashEmbeddingBagCollection

    @property
    def tables(self) -> List[HashTable]:
        return self._hash_tables


class HashEmbeddingBagCollectionSharder(CollectionSharder):
    """Shards ``HashEmbeddingBagCollection``; pass it to DMP/the planner with the stock ones.

    Args:
        fused_params, qcomm_codecs_registry: as for TorchRec's EBC sharder.

    Example::

        sharders = [HashEmbeddingBagCollectionSharder(fused_params=fused_params), *get_default_sharders()]
        model = DistributedModelParallel(model, plan=plan, sharders=sharders)
    """

    unsharded = HashEmbeddingBagCollection
    sharded = ShardedHashEmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> List[str]:
        """The stock types, plus row-wise on CPU (the stock sharder offers it only on CUDA)."""
        types = super().sharding_types(compute_device_type)
        return types if ShardingType.ROW_WISE.value in types else types + [ShardingType.ROW_WISE.value]
