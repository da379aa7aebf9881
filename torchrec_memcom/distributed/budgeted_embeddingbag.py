"""Sharded budgeted collection and its sharder.

The tier tables are sharded exactly as a MEmCom collection's: the common wrapper
(``compressed_embeddingbag.py``) holds the sharded MEmCom collection the MEmCom sharder makes of
the module's tier collection (stock FBGEMM lookups, stock input and output distribution, MEmCom
tiers' scalars sharded with their rows). Around it: ``input_dist`` first splits every bag of
feature ``f`` into bags of ``f@tier<j>`` holding rows of tier ``j`` (the rank buffers are
replicated on every rank); after ``output_dist`` a callback on the awaitable projects each tier's
pooled vector to the model dim and sums the tiers. The projections are dense parameters that
DMP's DDP averages, like a data-parallel table. A budget that counts optimizer state must count
the optimizer the tier tables train with (``apply_optimizer_in_backward``'s or the sharder's
fused one): sharding checks it.
"""

from typing import Dict, List, Optional, Set, Type

import torch
from torch import nn
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, ShardedEmbeddingModule
from torchrec.distributed.types import ParameterSharding, ShardingEnv, get_tensor_size_bytes
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.distributed.collection_sharder import fused_optimizer
from torchrec_memcom.distributed.compressed_embeddingbag import ShardedCompressedCollection
from torchrec_memcom.distributed.memcom_embeddingbag import (
    MEmComContext,
    MEmComEmbeddingBagCollectionSharder,
)
from torchrec_memcom.modules.budget_bytes import check_training_optimizer
from torchrec_memcom.modules.budgeted_embedding_bag import (
    BudgetedEmbeddingBagCollection,
    BudgetedTable,
    RankBuffers,
    combine_tiers,
    identity_init,
    split_by_tier,
)
from torchrec_memcom.modules.collection_checks import check_ids, check_unweighted
from torchrec_memcom.modules.memcom_embedding_bag import MEmComTable


class ShardedBudgetedEmbeddingBagCollection(ShardedCompressedCollection[MEmComContext]):
    """Sharded ``BudgetedEmbeddingBagCollection``: sharded tier tables + replicated projections.

    DMP builds it (through ``BudgetedEmbeddingBagCollectionSharder``); it is not built by hand.

    Args:
        module: the unsharded collection.
        table_name_to_parameter_sharding: the plan of its tier tables (``T@tier<j>``).
        tier_sharder: the MEmCom sharder that shards the tier tables.
        env, device, module_fqn: as for TorchRec's sharded modules.

    Example::

        sharders = [BudgetedEmbeddingBagCollectionSharder(), *get_default_sharders()]
        plan = memcom_planner(topology, batch_size=512).collective_plan(model, sharders, pg)
        dmp = DistributedModelParallel(model, plan=plan, sharders=sharders)
        dmp.module.ebc  # this class, where model.ebc was a BudgetedEmbeddingBagCollection
    """

    def __init__(
        self,
        module: BudgetedEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        tier_sharder: MEmComEmbeddingBagCollectionSharder,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        if module.budget.optimizer is not None:
            for bag in module.embedding_bags.values():
                check_training_optimizer(
                    module.budget.optimizer, fused_optimizer(bag.weight, tier_sharder.fused_params)
                )
        tiers = tier_sharder.shard(module.tier_collection, table_name_to_parameter_sharding, env, device, module_fqn)
        super().__init__(tiers, module.cost(), tier_sharder.qcomm_codecs_registry)
        device = device or torch.device("cpu")
        self._budgeted: List[BudgetedTable] = list(module.tables)
        self._user_feature_tables = {f: t for t in self._budgeted for f in t.feature_names}
        self._user_num_embeddings = {f: t.num_embeddings for f, t in self._user_feature_tables.items()}
        self.projections = nn.ModuleDict()
        for name, weight in module.projections.named_parameters():
            table = name.split(".")[0]
            projection = self.projections[table] = nn.Linear(
                weight.shape[1], weight.shape[0], bias=False, device=device
            )
            with torch.no_grad():
                if weight.is_meta:
                    identity_init(projection)
                else:
                    projection.weight.copy_(weight)
        self.remap = RankBuffers(module.ranks(), device)

    def reset_parameters(self) -> None:
        """Tier tables and scalars as the MEmCom collection's, projections ``[I; 0]``."""
        super().reset_parameters()
        for p in self.projections.children():
            if isinstance(p, nn.Linear):
                identity_init(p)

    def transform_input(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """User ids -> per-tier rows (then the MEmCom tier tables' input distribution)."""
        check_unweighted(features, "budgeted")
        check_ids(features, self._user_num_embeddings)
        return split_by_tier(features, self._user_feature_tables, self.remap.as_dict())

    def transform_output(self, ctx: MEmComContext, output: KeyedTensor) -> KeyedTensor:
        """Each tier's pooled vector projected to the model dim, the tiers summed."""
        return combine_tiers(self._budgeted, self.projections, output.to_dict())

    @property
    def dense_parameters(self) -> Set[str]:
        """The projections, left to DMP's DDP."""
        return {f"projections.{name}" for name, _ in self.projections.named_parameters()}

    @property
    def unsharded_module_type(self) -> Type[BudgetedEmbeddingBagCollection]:
        return BudgetedEmbeddingBagCollection

    @property
    def tables(self) -> List[MEmComTable]:
        """The tier tables."""
        return self._embedding_module.tables


class BudgetedEmbeddingBagCollectionSharder(MEmComEmbeddingBagCollectionSharder):
    """Shards ``BudgetedEmbeddingBagCollection``: its shardable tables are the tiers ``T@tier<j>``
    (plan them by those names); pass it to DMP/the planner with the stock sharders.

    Args:
        fused_params, qcomm_codecs_registry, column_wise: as ``MEmComEmbeddingBagCollectionSharder``'s
            (the MEmCom tiers' scalars follow the tier tables' fused optimizer).

    Example::

        sharders = [BudgetedEmbeddingBagCollectionSharder(fused_params=fused_params), *get_default_sharders()]
        plan = memcom_planner(topology, batch_size).collective_plan(model, sharders, pg)
        model = DistributedModelParallel(model, plan=plan, sharders=sharders)
    """

    unsharded: Type[nn.Module] = BudgetedEmbeddingBagCollection
    sharded: Type[ShardedEmbeddingModule] = ShardedBudgetedEmbeddingBagCollection

    def held_sharder(self) -> BaseEmbeddingSharder:
        """The MEmCom sharder, for the tier collection the sharded module holds."""
        return MEmComEmbeddingBagCollectionSharder(
            fused_params=self.fused_params,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            column_wise=self._column_wise,
        )

    def replicated_bytes(self, module: BudgetedEmbeddingBagCollection, parameter_multiplier: float) -> int:
        """Bytes every rank holds whatever the plan (the planner's hook, ``memcom_planner``): the
        id ranks (remap buffers) and the projections, dense parameters counted
        ``parameter_multiplier`` times (with their gradients and optimizer state)."""
        ranks = sum(get_tensor_size_bytes(b) for b in module.remap.buffers())
        return round(
            ranks + parameter_multiplier * sum(get_tensor_size_bytes(p) for p in module.projections.parameters())
        )
