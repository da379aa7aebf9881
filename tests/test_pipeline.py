"""fx tracing and TorchRec's sparse-dist train pipeline with our collections.

Every collection (and the mixed one, and a compress()ed DLRM) traces, with ``torchrec.fx`` and
with the tracer the train pipeline uses, to a module giving the eager outputs. Under DMP the
pipeline pipelines every sharded collection of ours (its log says none "will NOT be pipelined"),
and N pipelined steps equal N plain steps from the same state on the same batches. Sharded
mixed collections equal the unsharded ones under forced plans mixing all sharding types, and a
DCP save loads into another plan, in ``test_composition.py`` (which shards them with the mixed
sharder compress() returns); here: that they keep the unsharded names.
"""

import logging
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torchrec
from conftest import random_kjt
from dist_utils import run_multiprocess
from sharded_utils import Wrapper
from test_composition import FUSED_PARAMS, PLAN_A, SPECS, _dmp, tables
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.tracing import Tracer as PipelineTracer
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_memcom import compress
from torchrec_memcom.distributed.mixed_embeddingbag import (
    MixedEmbeddingBagCollectionSharder,
    ShardedMixedEmbeddingBagCollection,
)
from torchrec_memcom.distributed.planner import memcom_planner
from torchrec_memcom.distributed.state import load_full_state_dict
from torchrec_memcom.modules.mixed_embedding_bag import MixedEmbeddingBagCollection
from torchrec_memcom.modules.qr_embedding_bag import QRConfig, qr_collection

DENSE, BATCH, STEPS, LR = 4, 8, 3, 0.1
TRACERS: Dict[str, Callable[[nn.Module], nn.Module]] = {
    "torchrec.fx": torchrec.fx.symbolic_trace,
    "pipeline": lambda m: torch.fx.GraphModule(m, PipelineTracer().trace(m)),
}
PIPELINE_LOGGER = "torchrec.distributed.train_pipeline"


def _collection(spec: str) -> nn.Module:
    torch.manual_seed(0)
    model, _ = compress(Wrapper(EmbeddingBagCollection(tables())), SPECS[spec]())
    with torch.no_grad():  # scalars and projections away from their init (1, [I; 0])
        for name, p in model.named_parameters():
            if "entity_weights" in name or "projections" in name:
                p.uniform_(0.5, 1.5)
    return model


def _dlrm(spec: str, device: torch.device = torch.device("cpu")) -> Tuple[DLRMTrain, List[Any]]:
    torch.manual_seed(0)
    dlrm = DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables(), device=device),
        dense_in_features=DENSE,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
        dense_device=device,
    )
    return compress(DLRMTrain(dlrm), SPECS[spec](), FUSED_PARAMS)


def _batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        dense_features=torch.randn(BATCH, DENSE, generator=g),
        sparse_features=random_kjt(tables(), BATCH, seed=seed),
        labels=torch.randint(0, 2, (BATCH,), generator=g).float(),
    )


@pytest.mark.parametrize("tracer", sorted(TRACERS))
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_collections_trace_to_their_eager_outputs(spec: str, tracer: str) -> None:
    """Each collection compress() builds (mixed ones too), and a DLRM holding it, traced."""
    kjt = random_kjt(tables(), 6, seed=1)
    model = _collection(spec)
    traced, eager = TRACERS[tracer](model)(kjt), model(kjt)
    assert sorted(traced) == sorted(eager)
    for f in eager:
        torch.testing.assert_close(traced[f], eager[f], rtol=0, atol=0)

    dlrm = _dlrm(spec)[0].model
    batch = _batch(2)
    args = (batch.dense_features, batch.sparse_features)
    torch.testing.assert_close(TRACERS[tracer](dlrm)(*args), dlrm(*args), rtol=0, atol=0)


@pytest.mark.parametrize("tracer", sorted(TRACERS))
def test_qr_collection_of_several_dims_traces(tracer: str) -> None:
    configs = [t for t in tables() if t.name != "t3"]
    configs[1] = torchrec.EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=400, feature_names=["f1"])
    model = Wrapper(qr_collection(configs, QRConfig(num_collisions=8)))
    assert isinstance(model.ebc, MixedEmbeddingBagCollection)
    kjt = random_kjt(configs, 5, seed=4)
    traced, eager = TRACERS[tracer](model)(kjt), model(kjt)
    for f in eager:
        torch.testing.assert_close(traced[f], eager[f], rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["memcom", "budgeted+qr"])
def test_traced_models_still_check_their_input(spec: str) -> None:
    """The input checks are kept in the graph (fx-wrapped), not traced away."""
    traced = torchrec.fx.symbolic_trace(_collection(spec))
    kjt = random_kjt(tables(), 3, seed=1)
    bad = torchrec.KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values() + 1000, lengths=kjt.lengths())
    with pytest.raises(ValueError, match=r"feature 'f\d': id \d+ is outside"):
        traced(bad)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _sharded(
    spec: str, state: Dict[str, torch.Tensor], sharders: List[Any], plan: Any
) -> Tuple[DistributedModelParallel, CombinedOptimizer]:
    model, _ = _dlrm(spec, torch.device("meta"))
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        plan=plan,
        sharders=sharders,
        device=torch.device("cpu"),
    )
    load_full_state_dict(dmp, state)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.SGD(p, lr=LR)
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def _local(value: Any) -> List[torch.Tensor]:
    if isinstance(value, ShardedTensor):
        return [s.tensor for s in value.local_shards()]
    return [value]


def _pipelined_equals_plain(rank: int, world: int, specs: List[str]) -> None:
    records = _Records()
    logger = logging.getLogger(PIPELINE_LOGGER)
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    batches = [_batch(seed=10 * step + rank) for step in range(STEPS)]
    for spec in specs:
        ref, sharders = _dlrm(spec)
        state = ref.state_dict()
        plan = memcom_planner(Topology(world_size=world, compute_device="cpu"), batch_size=BATCH).collective_plan(
            ref, sharders, dist.group.WORLD
        )
        ebc = ref.model.sparse_arch.embedding_bag_collection
        path = "model.sparse_arch.embedding_bag_collection"
        if isinstance(ebc, MixedEmbeddingBagCollection):  # one plan for all its children's tables
            assert not [p for p in plan.plan if p.startswith(path + ".")], (spec, list(plan.plan))

        plain, plain_opt = _sharded(spec, state, sharders, plan)
        plain_losses = []
        for batch in batches:
            plain_opt.zero_grad()
            loss, _ = plain(batch)
            loss.backward()
            plain_opt.step()
            plain_losses.append(float(loss))

        records.messages.clear()
        piped, piped_opt = _sharded(spec, state, sharders, plan)
        pipeline = TrainPipelineSparseDist(piped, piped_opt, torch.device("cpu"), execute_all_batches=True)
        it = iter(batches)
        piped_losses = [float(pipeline.progress(it)[0]) for _ in batches]

        assert not [m for m in records.messages if "will NOT be pipelined" in m], (spec, records.messages)
        assert f"Module '{path}' will be pipelined" in records.messages, (spec, records.messages)
        torch.testing.assert_close(piped_losses, plain_losses, msg=lambda m: f"{spec}: losses: {m}")  # noqa: B023  (assert_close calls msg at once)
        mine, theirs = piped.state_dict(), plain.state_dict()
        assert sorted(mine) == sorted(theirs)
        for key in theirs:
            for a, b in zip(_local(mine[key]), _local(theirs[key])):
                torch.testing.assert_close(a, b, msg=lambda m: f"{spec}: {key}: {m}")  # noqa: B023  (assert_close calls msg at once)


@pytest.mark.slow
def test_pipeline_pipelines_every_method() -> None:
    run_multiprocess(_pipelined_equals_plain, 2, ["qr", "memcom", "hash", "budgeted", "memcom+hash"])


def _names_stay_unsharded(rank: int, world: int) -> None:
    """The mixed collection sharded as one module has the names its children had when DMP
    sharded each on its own (the unsharded module's keys): checkpoints and optimizer setups of
    those keep working."""
    from test_composition import _build, _plan

    for spec in ["budgeted+qr"]:
        ref, _ = _build(spec, torch.device("cpu"))
        mixed = _dmp(spec, PLAN_A)
        assert isinstance(mixed.module.ebc, ShardedMixedEmbeddingBagCollection)
        model, sharders = _build(spec, torch.device("meta"))
        sharders = [s for s in sharders if not isinstance(s, MixedEmbeddingBagCollectionSharder)]
        apart = DistributedModelParallel(
            model,
            env=ShardingEnv.from_process_group(dist.group.WORLD),
            plan=_plan(model, sharders, PLAN_A),
            sharders=sharders,
            device=torch.device("cpu"),
        )
        assert sorted(mixed.state_dict()) == sorted(apart.state_dict()) == sorted(ref.state_dict())
        assert [n for n, _ in mixed.named_parameters()] == [n for n, _ in apart.named_parameters()]
        assert sorted(DistributedModelParallel._sharded_parameter_names(mixed.module)) == sorted(
            DistributedModelParallel._sharded_parameter_names(apart.module)
        )
        assert sorted(mixed.fused_optimizer.params) == sorted(apart.fused_optimizer.params)
        assert sorted(mixed.fused_optimizer.state_dict()["state"]) == sorted(
            apart.fused_optimizer.state_dict()["state"]
        )


def _mixed(rank: int, world: int) -> None:
    _pipelined_equals_plain(rank, world, ["budgeted+qr"])
    _names_stay_unsharded(rank, world)


def test_mixed_collection_is_pipelined_equals_plain_training_and_keeps_its_names() -> None:
    """Budgeted, QR and plain tables (a mixed collection of three children); one launch."""
    run_multiprocess(_mixed, 2)
