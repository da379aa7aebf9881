"""Sharded hashing-trick collection and its sharder.

The hashed tables are a stock ShardedEmbeddingBagCollection on FBGEMM's table-batched kernels
(state dict key ``embedding_bags.T.weight``, any stock sharding type, fused optimizers).
``input_dist`` turns ids into rows ``h(i) mod m`` before the stock input distribution; nothing
else differs from a stock EBC of ``m``-row tables.
"""

from typing import Any, Dict, List, Optional, Tuple

import torch
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import (
    Awaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_memcom.distributed.collection_sharder import CollectionSharder
from torchrec_memcom.distributed.state import copy_full_tensor
from torchrec_memcom.distributed.stock_views import correct_mean_divisor, kjt_with, stock_view
from torchrec_memcom.modules.collection_checks import check_ids, check_unweighted
from torchrec_memcom.modules.hash_embedding_bag import HashEmbeddingBagCollection, HashTable


class ShardedHashEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """Sharded ``HashEmbeddingBagCollection``: ids hashed in ``input_dist``, then stock EBC."""

    def __init__(
        self,
        module: HashEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__(
            stock_view(module.hashed_configs(), module.embedding_bags, module.device, is_weighted=False),
            table_name_to_parameter_sharding,
            env,
            fused_params=fused_params,
            device=device,
            qcomm_codecs_registry=qcomm_codecs_registry,
            module_fqn=module_fqn,
        )
        self._hash_tables = module.tables
        self._feature_table: Dict[str, HashTable] = {
            f: t for cfg, t in zip(module.embedding_bag_configs(), module.tables) for f in cfg.feature_names
        }
        self._num_embeddings = {f: t.num_embeddings for f, t in self._feature_table.items()}
        self._moduli: Dict[Tuple[str, ...], Tuple[torch.Tensor, List[int]]] = {}
        if module.device.type != "meta":
            self._copy_from(module)

    @torch.no_grad()
    def _copy_from(self, module: HashEmbeddingBagCollection) -> None:
        """Start from the unsharded module's values (stock sharding does so only off the CPU)."""
        state = self.state_dict()
        for name, bag in module.embedding_bags.items():
            copy_full_tensor(state[f"embedding_bags.{name}.weight"], bag.weight.detach())

    def _modulus(self, keys: List[str], device: torch.device) -> Tuple[torch.Tensor, List[int]]:
        """``m`` per feature of this key order (``n`` for plain tables, where ``i mod n = i``),
        and the positions of features hashed with "mix"."""
        key = tuple(keys)
        if key not in self._moduli:
            tables = [self._feature_table[k] for k in keys]
            mixed = [i for i, t in enumerate(tables) if t.compressed and t.hash == "mix"]
            self._moduli[key] = (torch.tensor([t.hash_rows for t in tables], device=device), mixed)
        return self._moduli[key]

    def input_dist(
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        """Ids -> hashed rows (``HashTable.rows``, for all features at once), then stock dist."""
        check_unweighted(features, "hash")
        with torch.no_grad():
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
        awaitable = super().input_dist(ctx, kjt_with(features, rows, None))
        correct_mean_divisor(self, ctx)
        return awaitable

    def cost(self) -> Dict[str, Dict[str, float]]:
        """Same report as the unsharded module (global sizes)."""
        return HashEmbeddingBagCollection.cost(self)

    @property
    def tables(self) -> List[HashTable]:
        return self._hash_tables


class HashEmbeddingBagCollectionSharder(CollectionSharder):
    """Shards ``HashEmbeddingBagCollection``; pass it to DMP/the planner with the stock ones."""

    unsharded = HashEmbeddingBagCollection
    sharded = ShardedHashEmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> List[str]:
        """The stock types, plus row-wise on CPU (the stock sharder offers it only on CUDA)."""
        types = super().sharding_types(compute_device_type)
        return types if ShardingType.ROW_WISE.value in types else types + [ShardingType.ROW_WISE.value]
