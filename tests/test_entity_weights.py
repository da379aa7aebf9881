"""ShardedEntityWeights on its own, on 2 gloo processes: column-wise replicas of the scalars get
the same in-backward update on every holder, also when a holder has no lookups (it joins the
replicas' gradient sync with nothing to add)."""

from typing import Dict

import torch
import torch.distributed as dist
from dist_utils import run_multiprocess
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.types import ShardingType

from torchrec_memcom.distributed.entity_weights import ShardedEntityWeights
from torchrec_memcom.distributed.scalar_layout import RowBlock, TableLayout
from torchrec_memcom.modules.memcom_config import ScalarRule
from torchrec_memcom.modules.memcom_embedding_bag import MEmComTable

N, M, LR, EPS = 100, 30, 0.1, 1e-8


def _replicated(adagrad: bool) -> Dict[str, TableLayout]:
    """One column-wise table whose scalars both ranks hold."""
    table = MEmComTable("t0", N, 8, M, "mod", True)
    optimizer = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD if adagrad else EmbOptimType.EXACT_SGD}
    block = RowBlock(0, M, (0, 1), ("cpu", "cpu"))
    return {"t0": TableLayout(table, ShardingType.COLUMN_WISE.value, [block], optimizer, ScalarRule(adagrad, LR, EPS))}


def _replicas_update_without_lookups(rank: int, world_size: int) -> None:
    for adagrad in (False, True):
        weights = ShardedEntityWeights(_replicated(adagrad), rank, world_size, torch.device("cpu"), dist.group.WORLD)
        weights.load_table("t0", torch.ones(N))
        assert weights.needs_anchor
        # rank 0 looks up entry 3 twice and 7 once, each with gradient 2; rank 1 looks up nothing
        indices = [torch.tensor([3, 7, 3])] if rank == 0 else []
        anchor, scalars = weights.lookup_fused(indices, [1.0] * len(indices))
        (0 * anchor + sum((2 * s).sum() for s in scalars)).backward()
        grad = torch.zeros(N)
        grad[3], grad[7] = 4.0, 2.0
        step = grad / (grad.abs() + EPS) if adagrad else grad
        got = weights.storage["t0"].detach()[:N]
        torch.testing.assert_close(got, torch.ones(N) - LR * step, msg=f"adagrad={adagrad}, rank {rank}")
        replicas = [torch.empty(N) for _ in range(world_size)]
        dist.all_gather(replicas, got.clone())
        assert torch.equal(replicas[0], replicas[1]), f"adagrad={adagrad}: replicas differ"


def test_replicas_update_on_a_rank_without_lookups() -> None:
    run_multiprocess(_replicas_update_without_lookups, 2)
