"""Sharded budgeted collection and its sharder.

The tier tables are sharded exactly as a MEmCom collection's (a ``ShardedMEmComEmbeddingBagCollection``
over the module's tier collection: stock FBGEMM lookups, stock input and output distribution,
MEmCom tiers' scalars sharded with their rows). Around it: ``input_dist`` first splits every
bag of feature ``f`` into bags of ``f@tier<j>`` holding rows of tier ``j`` (the rank buffers are
replicated on every rank); after ``output_dist`` a callback on the awaitable projects each tier's
pooled vector to the model dim and sums the tiers. The projections are dense parameters that
DMP's DDP averages, like a data-parallel table. A budget that counts optimizer state must count
the optimizer the tier tables train with (``apply_optimizer_in_backward``'s or the sharder's
fused one): sharding checks it.
"""

from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionContext
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    get_tensor_size_bytes,
)
from torchrec.distributed.utils import append_prefix
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.distributed.collection_sharder import fused_optimizer
from torchrec_memcom.distributed.memcom_embeddingbag import (
    MEmComEmbeddingBagCollectionSharder,
    ShardedMEmComEmbeddingBagCollection,
)
from torchrec_memcom.modules.budget_bytes import check_training_optimizer
from torchrec_memcom.modules.budgeted_embedding_bag import (
    BudgetedEmbeddingBagCollection,
    BudgetedTable,
    RankBuffers,
    budgeted_cost,
    combine_tiers,
    identity_init,
    split_by_tier,
)
from torchrec_memcom.modules.collection_checks import check_ids, check_unweighted


class ShardedBudgetedEmbeddingBagCollection(ShardedMEmComEmbeddingBagCollection):
    """Sharded ``BudgetedEmbeddingBagCollection``: sharded tier tables + replicated projections."""

    def __init__(
        self,
        module: BudgetedEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        if module.budget.optimizer is not None:
            for bag in module.embedding_bags.values():
                check_training_optimizer(module.budget.optimizer, fused_optimizer(bag.weight, fused_params))
        super().__init__(
            module.tier_collection,
            table_name_to_parameter_sharding,
            env,
            fused_params=fused_params,
            device=device,
            qcomm_codecs_registry=qcomm_codecs_registry,
            module_fqn=module_fqn,
        )
        device = device or torch.device("cpu")
        self._budgeted: List[BudgetedTable] = list(module.tables)
        self._user_feature_tables = {f: t for t in self._budgeted for f in t.feature_names}
        self._user_num_embeddings = {f: t.num_embeddings for f, t in self._user_feature_tables.items()}
        self._budget_limit = module.budget_limit
        self._budget_optimizer = module.budget.optimizer
        self.projections = nn.ModuleDict(
            {
                name: nn.Linear(p.in_features, p.out_features, bias=False, device=device)
                for name, p in module.projections.items()
            }
        )
        with torch.no_grad():
            for name, p in self.projections.items():
                source = module.projections[name].weight
                if source.is_meta:
                    identity_init(p)
                else:
                    p.weight.copy_(source)
        self.remap = RankBuffers(module.ranks(), device)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "projections" in self._modules:  # the stock __init__ calls this before it exists
            for p in self.projections.values():
                identity_init(p)

    # ---- forward ------------------------------------------------------------------------------

    def input_dist(
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        """User ids -> per-tier rows, then the MEmCom tier tables' input distribution."""
        with torch.no_grad():
            check_unweighted(features, "budgeted")
            check_ids(features, self._user_num_embeddings)
            tiered = split_by_tier(features, self._user_feature_tables, self.remap.as_dict())
        return super().input_dist(ctx, tiered)

    def _combine(self, kt: KeyedTensor) -> KeyedTensor:
        return combine_tiers(self._budgeted, self.projections, kt.to_dict())

    def output_dist(self, ctx: EmbeddingBagCollectionContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        awaitable = super().output_dist(ctx, output)
        awaitable.callbacks.append(self._combine)
        return awaitable

    def compute_and_output_dist(self, ctx: EmbeddingBagCollectionContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        awaitable = super().compute_and_output_dist(ctx, input)
        awaitable.callbacks.append(self._combine)
        return awaitable

    # ---- what the rest of TorchRec asks of a sharded module -----------------------------------

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        """The tier tables' and scalars' names; the projections are left to DMP's DDP."""
        for name in super().sharded_parameter_names():
            if not name.startswith("projections."):
                yield append_prefix(prefix, name)

    def cost(self) -> Dict[str, Dict[str, Any]]:
        """Same report as the unsharded module (global sizes)."""
        return budgeted_cost(self._budgeted, self._budget_limit, self._budget_optimizer)

    @property
    def budgeted_tables(self) -> List[BudgetedTable]:
        return list(self._budgeted)


class BudgetedEmbeddingBagCollectionSharder(MEmComEmbeddingBagCollectionSharder):
    """Shards ``BudgetedEmbeddingBagCollection``: its shardable tables are the tiers ``T@tier<j>``
    (plan them by those names); pass it to DMP/the planner with the stock sharders."""

    unsharded = BudgetedEmbeddingBagCollection
    sharded = ShardedBudgetedEmbeddingBagCollection

    def replicated_bytes(self, module: BudgetedEmbeddingBagCollection, parameter_multiplier: float) -> int:
        """Bytes every rank holds whatever the plan (the planner's hook, ``memcom_planner``): the
        id ranks (remap buffers) and the projections, dense parameters counted
        ``parameter_multiplier`` times (with their gradients and optimizer state)."""
        ranks = sum(get_tensor_size_bytes(b) for b in module.remap.buffers())
        return round(
            ranks + parameter_multiplier * sum(get_tensor_size_bytes(p) for p in module.projections.parameters())
        )
