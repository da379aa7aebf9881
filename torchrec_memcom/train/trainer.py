"""The distributed training job: one process per rank (torchrun / torchx start them).

DMP shards the (compressed) DLRM with the TorchRec planner, TorchRec's sparse-dist pipeline
trains it, evaluation reports AUC and log loss, and DCP checkpoints make it resumable. The job
stops with an error on a diverged loss or on ids beyond a table, and on SIGTERM / SIGINT saves
a checkpoint (when configured) and stops with a ``Stopped`` that names it.
"""

import json
import logging
import math
import os
import resource
import signal
import sys
import time
import warnings
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist
from torchmetrics.classification import BinaryAUROC
from torchrec.distributed.comm import get_local_rank, get_local_size
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from torchrec_memcom.data import CriteoParquetLoader, load_manifest, synthesize
from torchrec_memcom.data.manifest import features_of
from torchrec_memcom.data.torchrec_npy import TorchRecNpyLoader, describe as describe_npy
from torchrec_memcom.distributed.planner import memcom_planner
from torchrec_memcom.train.checkpoint import (
    CONFIG,
    DATA,
    PROGRESS,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_record,
    save_checkpoint,
)
from torchrec_memcom.train.config import RunConfig, as_dict, check_features
from torchrec_memcom.train.model import build_model, embedding_bytes, table_configs

DENSE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}
# Config keys a resume may change without --allow-changes: where things are (the data itself
# is compared by its manifest)
PATH_KEYS = ("train.run_dir", "train.checkpoint_dir", "data.path")
# Divergence (docs/training.md): A, a non-finite loss, checked every CHECK_EVERY steps and before
# every evaluation and save; B, past the first CHECK_EVERY steps (the warm-up), the mean training
# loss of a window of at least CHECK_EVERY steps above loss_limit(its base rate): each fails the run
CHECK_EVERY = 50
LOSS_FLOOR = 1.0
# FBGEMM warns for data-parallel tables that "an autograd kernel was not registered" for its
# dense TBE op; their gradients match the unsharded tables' (tests/test_lifecycle.py)
FBGEMM_AUTOGRAD_WARNING = r".*an autograd kernel was not registered to the Autograd key"


class DivergedError(RuntimeError):
    """The training loss became non-finite or stayed far above the base rate's; names the step."""


class DataError(ValueError):
    """A batch holds an id outside its table; names the split, the feature and the bound."""


class Stopped(Exception):
    """The job was stopped by a signal; ``code`` is the exit status (128 + the signal)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _init_distributed() -> torch.device:
    """Join the job's process group (gloo on CPU, nccl on GPU); a lone process makes its own."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{get_local_rank()}")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def _topology(device: torch.device) -> Topology:
    """This machine as the planner sees it: per-rank device memory from the hardware."""
    world, local = dist.get_world_size(), get_local_size()
    if device.type == "cuda":
        hbm = torch.cuda.get_device_properties(device).total_memory
        return Topology(world_size=world, local_world_size=local, compute_device="cuda", hbm_cap=hbm)
    ddr = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // local
    return Topology(world_size=world, local_world_size=local, compute_device="cpu", ddr_cap=ddr)


# Logits of the first rows of each rank's first eval batch, recorded with every evaluation so
# that `memcom export` can check against the sharded model as trained (export.PROBE).
PROBE_ROWS = 64


class Evaluator:
    """AUC (torchmetrics, synced over ranks) and log loss of a split, every row scored once;
    ``probe``: the logits of the first ``PROBE_ROWS`` rows of this rank's first batch.

    The loader (``drop_last=False``, unshuffled) pads the ranks' parts to equal size with the
    split's first rows, at the end of the last ranks' parts: each rank scores only its first
    ``rows`` rows.

    Args:
        device: where the metrics accumulate (the model's device).

    Example::

        evaluator = Evaluator(device)
        evaluator.run(pipeline, iter(eval_loader), rows)  # {"auc", "logloss", "eval_rows"}; collective
    """

    def __init__(self, device: torch.device) -> None:
        self.auroc = BinaryAUROC().to(device)
        self.device = device
        self.probe = torch.zeros(0, device=device)

    def run(self, pipeline: TrainPipelineSparseDist, batches: Iterator[Any], rows: int) -> Dict[str, Any]:
        self.auroc.reset()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, examples
        seen = 0
        pipeline._model.eval()  # private: the pipeline's model (its public API has no eval switch)
        with torch.no_grad():
            while True:
                try:
                    _, logits, labels = pipeline.progress(batches)
                except StopIteration:
                    break
                if seen == 0:
                    self.probe = logits.view(-1)[:PROBE_ROWS].detach().float()
                keep = max(0, min(labels.numel(), rows - seen))
                seen += labels.numel()
                logits, labels = logits.view(-1)[:keep], labels.view(-1)[:keep]
                self.auroc.update(torch.sigmoid(logits), labels.int())
                totals[0] += torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, labels.float(), reduction="sum"
                )
                totals[1] += keep
        pipeline._model.train()
        dist.all_reduce(totals)
        return {
            "auc": _finite(float(self.auroc.compute())),
            "logloss": _finite(float(totals[0] / totals[1])),
            "eval_rows": int(totals[1]),
        }


def _finite(x: float) -> Optional[float]:
    """``x``, or None (JSON null) when it is NaN or infinite (e.g. the AUC of a one-class split)."""
    return x if math.isfinite(x) else None


def _checked(batches: Iterable[Any], bounds: Dict[str, int], where: str) -> Iterator[Any]:
    """``batches``, refusing one with an id outside ``[0, bounds[feature])``: stock FBGEMM tables
    would map it to row 0 and only log it."""
    for i, batch in enumerate(batches):
        kjt = batch.sparse_features
        for key, values in zip(kjt.keys(), kjt.values().split(kjt.length_per_key())):
            if values.numel() and (int(values.max()) >= bounds[key] or int(values.min()) < 0):
                bad = int(values.max()) if int(values.max()) >= bounds[key] else int(values.min())
                raise DataError(
                    f"{where}, batch {i}: feature {key} has id {bad}, outside its table t_{key} of "
                    f"num_embeddings {bounds[key]} (ids must be in [0, {bounds[key]}))"
                )
        yield batch


def _diff(old: Any, new: Any, key: str = "") -> List[str]:
    """Where two JSON values differ, as ``key: old -> new`` lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(set(old) | set(new), key=str)
            for d in _diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{key}.{k}" if key else str(k))
        ]
    return [] if old == new else [f"{key}: {json.dumps(old)[:60]} -> {json.dumps(new)[:60]}"]


def _base_rate_loss(p: float) -> float:
    """Log loss of always predicting the base rate ``p`` (its binary entropy, in nats)."""
    p = min(max(p, 1e-7), 1 - 1e-7)
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def loss_limit(base_rate: float) -> float:
    """The mean training loss above which a window counts as diverging: twice the loss of
    predicting the base rate, and at least LOSS_FLOOR nats (an untrained DLRM starts near ln 2)."""
    return max(2 * _base_rate_loss(base_rate), LOSS_FLOOR)


def plan_table(plan: ShardingPlan, table_bytes: Dict[str, int]) -> str:
    """The sharding plan, one line per sharded parameter: type, kernel, ranks and its table's bytes."""
    rows = [("module", "parameter", "sharding", "kernel", "ranks", "bytes")]
    for module, params in plan.plan.items():
        for name, ps in params.items():
            table = next((t for t in table_bytes if name == t or name.startswith(f"{t}.")), None)
            rows.append(
                (
                    module or "(root)",
                    name,
                    ps.sharding_type,
                    ps.compute_kernel,
                    ",".join(map(str, ps.ranks or [])) or "all",
                    f"{table_bytes[table]:,}" if table else "-",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    )


def train(config: RunConfig, allow_changes: bool = False) -> Dict[str, Any]:
    """Run the job on this rank; rank 0 writes ``run_dir/results.json``. Returns the results.

    Joins the process group torchrun set up (or the caller's, if one is up). ``allow_changes``
    resumes a checkpoint trained with another config or data (by default refused, naming what
    differs). Raises ``Stopped`` after SIGTERM / SIGINT (with a checkpoint saved when
    ``train.checkpoint_dir`` is set), ``DivergedError``, ``DataError``, ``CheckpointError`` or
    ``ValueError`` (bad data or resume)."""
    own_group = not dist.is_initialized()
    device = (
        _init_distributed()
        if own_group
        else (torch.device(f"cuda:{get_local_rank()}") if torch.cuda.is_available() else torch.device("cpu"))
    )
    received: List[int] = []

    def request_stop(signum: int, _: Any) -> None:  # a second signal ends the rank at once
        received.append(signum)
        signal.signal(signum, signal.SIG_DFL)

    handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with warnings.catch_warnings():
            if dist.get_rank() != 0:  # the ranks' warnings and logged warnings are rank 0's: say them once
                warnings.simplefilter("ignore")
                logging.disable(logging.WARNING)
            warnings.filterwarnings("ignore", FBGEMM_AUTOGRAD_WARNING)
            results = _train(config, device, allow_changes, received)
        # every rank's collectives are done before any rank tears its group down and exits
        dist.barrier()
        return results
    finally:
        logging.disable(logging.NOTSET)
        for s, h in handlers.items():
            signal.signal(s, h)
        if own_group:
            dist.destroy_process_group()


def _prepare_data(config: RunConfig) -> Dict[str, Any]:
    """The manifest of ``data.path``; synthesized there first (by rank 0) when asked and absent.
    For TorchRec npy files, their description (the files checked)."""
    path = Path(config.data.path)
    if config.data.format == "torchrec_npy":
        if config.embeddings.num_embeddings == "from_data":
            raise ValueError(
                f"{path}: data.format torchrec_npy holds raw ids: set embeddings.num_embeddings "
                "(26 sizes; ids are hashed modulo them, as TorchRec's DLRM example does)"
            )
        return describe_npy(path)
    if config.data.synthetic is not None and dist.get_rank() == 0 and not (path / "manifest.json").exists():
        s = config.data.synthetic
        synthesize(s.rows, path, seed=s.seed, max_cardinality=s.max_cardinality)
    dist.barrier()
    return load_manifest(path)


def _check_sizes(config: RunConfig, manifest: Dict[str, Any], sizes: List[int], features: List[str]) -> None:
    """Refuse tables smaller than the data's id space (its manifest's ``num_embeddings``)."""
    for i, (feature, n) in enumerate(zip(features, sizes)):
        # data read modulo the table size (TorchRec's npy days) records no id space
        space = manifest.get("features", {}).get(feature, {}).get("num_embeddings", 0)
        if n < space:
            raise DataError(
                f"embeddings.num_embeddings[{i}]: table t_{feature} has {n} rows, but feature {feature} "
                f"of {config.data.path} has ids up to {space - 1} (its manifest's num_embeddings); "
                f"give at least {space}, or num_embeddings: from_data"
            )


def _check_resume(
    path: Path, config: RunConfig, manifest: Dict[str, Any], world: int, allow_changes: bool
) -> Dict[str, Any]:
    """The progress of checkpoint ``path``, after refusing another world size, and another
    config (but for its paths) or data unless ``allow_changes``."""
    progress = read_record(path, PROGRESS)
    if progress["world_size"] != world:
        raise CheckpointError(
            f"{path} was written by {progress['world_size']} ranks, this job has "
            f"{world}: resume with the same world size (see docs/training.md)"
        )
    if allow_changes:
        return progress
    saved, current = read_record(path, CONFIG), as_dict(config)
    for key in PATH_KEYS:
        section, name = key.split(".")
        saved.get(section, {}).pop(name, None), current[section].pop(name, None)
    differences = [f"config {d}" for d in _diff(saved, current)]
    differences += [f"data manifest {d}" for d in _diff(read_record(path, DATA), manifest)]
    if differences:
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        raise CheckpointError(
            f"{path} was trained with another config or data: {'; '.join(differences[:3])}{more}. "
            f"Use another train.checkpoint_dir, or pass --allow-changes to resume with the change"
        )
    return progress


def _train(config: RunConfig, device: torch.device, allow_changes: bool, received: List[int]) -> Dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config.train
    torch.manual_seed(cfg.seed)
    manifest = _prepare_data(config)
    features = features_of(manifest)
    check_features(config, features.sparse, f"{config.data.path}'s")
    given = config.embeddings.num_embeddings  # a list, or "from_data"
    sizes: List[int] = (
        [manifest["features"][f]["num_embeddings"] for f in features.sparse] if isinstance(given, str) else given
    )
    _check_sizes(config, manifest, list(sizes), list(features.sparse))
    id_limits = dict(zip(features.sparse, sizes))
    # stop requests and divergence checks agree over a CPU group, without a device sync
    control = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    checkpoints = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    resumed = checkpoints and latest_checkpoint(checkpoints)
    saved_progress = _check_resume(resumed, config, manifest, world, allow_changes) if resumed else None

    model, sharders = build_model(config, list(sizes), device, features)
    configs = table_configs(config.embeddings.dim, list(sizes), features.sparse)
    bytes_per_table = embedding_bytes(model.model.sparse_arch.embedding_bag_collection, [t.name for t in configs])
    uncompressed = {t.name: t.num_embeddings * t.embedding_dim * 4 for t in configs}
    planner = memcom_planner(_topology(device), batch_size=cfg.batch_size)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=device,
        plan=plan,
        sharders=sharders,
    )
    dense = config.optimizer.dense
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: DENSE_OPTIMIZERS[dense.type](params, lr=dense.lr),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_optimizer])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)

    def loader(split: str, shuffle: bool) -> Any:
        if config.data.format == "torchrec_npy":
            return TorchRecNpyLoader(
                config.data.path,
                split,
                cfg.batch_size,
                rank=rank,
                world_size=world,
                num_embeddings=list(sizes),
                seed=cfg.seed,
                shuffle=shuffle,
                drop_last=True,
            )
        return CriteoParquetLoader(
            config.data.path,
            split,
            cfg.batch_size,
            rank=rank,
            world_size=world,
            seed=cfg.seed,
            shuffle=shuffle,
            drop_last=shuffle,  # evaluation reads every row
            # a GPU step leaves the CPU (and the GIL) to the prefetch thread; a CPU step competes
            # with it for both, and measured slower with it (docs/data.md)
            prefetch=2 if device.type != "cpu" else 0,
            pin_memory=device.type != "cpu",
        )

    try:
        train_data, eval_data = loader(config.data.train_split, True), loader(config.data.eval_split, False)
    except ValueError as e:
        raise ValueError(f"{config.data.path}: {e} (train.batch_size={cfg.batch_size})") from None
    total_steps = cfg.steps or cfg.epochs * len(train_data)
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        print(plan_table(plan, bytes_per_table), flush=True)
        where = f"checkpoints: {checkpoints}" + (
            f" (every {cfg.checkpoint_every} steps and at the end)" if cfg.checkpoint_every else " (at the end)"
        )
        print(f"results: {run_dir / 'results.json'}; " + (where if checkpoints else "no checkpoints"), flush=True)
    # The position, every rank's training loss sum since the last evaluation and the
    # evaluations so far (the same on every rank): all a resumed run needs to continue the
    # uninterrupted run's metrics exactly. Saved as a JSON record beside the shards.
    progress: Dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "world_size": world,
        "loss_sums": [],
        "history": [],
        "probe": {},
    }
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # this rank's, since the last evaluation
    history: List[Dict[str, Any]] = []

    if resumed:
        optimizer.init_state()
        loaded = {"model": dmp.state_dict(), "optimizer": optimizer.state_dict()}
        load_checkpoint(resumed, loaded)
        dmp.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        assert saved_progress is not None  # read when resumed
        progress.update(saved_progress)
        loss_sum.copy_(torch.tensor(progress["loss_sums"][rank], dtype=torch.float64))
        history = progress["history"]
        if progress["step"] > total_steps:
            raise CheckpointError(f"{resumed} is at step {progress['step']}, past this run's {total_steps} steps")
        if rank == 0:
            print(f"resumed from {resumed} at step {progress['step']}", flush=True)

    if history and history[-1]["step"] == total_steps:  # resumed a finished run: nothing to do
        if rank == 0:
            print(f"the run finished at step {total_steps}; results in {run_dir / 'results.json'}", flush=True)
            _write_results(run_dir, config, history, world)
        return _final(history)
    evaluator = Evaluator(device)
    examples, train_seconds = 0, 0.0
    total_bytes, full_bytes = sum(bytes_per_table.values()), sum(uncompressed.values())
    saved_step = progress["step"] if resumed else None
    # divergence window: loss sum, label sum, examples, steps; first non-finite step (-1: none)
    window = torch.zeros(4, dtype=torch.float64, device=device)
    first_bad = torch.full((1,), -1.0, dtype=torch.float64, device=device)

    lrs = f"optimizer.sparse.lr={config.optimizer.sparse.lr}, optimizer.dense.lr={config.optimizer.dense.lr}"

    def too_high(what: str, loss: float, base: float) -> None:
        """Rule B: past the warm-up, a mean loss above loss_limit(base) stops the run."""
        limit = loss_limit(base)
        if progress["step"] > CHECK_EVERY and loss > limit:
            raise DivergedError(
                f"training diverged by step {progress['step']}: the {what} is {loss:.3f}, "
                f"above {limit:.3f} (the larger of twice the {_base_rate_loss(base):.3f} of predicting the base "
                f"rate {base:.3f}, and {LOSS_FLOOR}); likely cause: a learning rate too high ({lrs})"
            )

    def check_divergence() -> None:
        stats = torch.cat([window, first_bad]).cpu()
        stats[4] = stats[4] if stats[4] >= 0 else math.inf
        sums, bad = stats[:4].clone(), stats[4:].clone()
        dist.all_reduce(sums, group=control)
        dist.all_reduce(bad, op=dist.ReduceOp.MIN, group=control)
        if math.isfinite(bad):  # rule A
            raise DivergedError(
                f"training diverged at step {int(bad)}: the loss is not finite; likely cause: a learning "
                f"rate too high for this model ({lrs}); the last checkpoint holds finite weights"
            )
        steps = int(sums[3]) // world
        if steps < CHECK_EVERY:  # short windows add up to the next check
            return
        window.zero_()
        first = progress["step"] - steps + 1
        too_high(
            f"mean training loss over steps {first}-{progress['step']}",
            float(sums[0] / (steps * world)),
            float(sums[1] / sums[2]),
        )

    def evaluate() -> None:
        sums = loss_sum.clone()
        dist.all_reduce(sums)
        train_loss = float(sums[0] / sums[1]) if sums[1] else None
        loss_sum.zero_()
        slowest = torch.tensor([train_seconds], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # the same on every rank, like the history
        seconds = float(slowest)
        limit = cfg.eval_batches or len(eval_data)
        eval_data.set_epoch(0)
        if isinstance(eval_data, TorchRecNpyLoader):  # TorchRec's reader splits rows without padding
            mine = sys.maxsize
        else:
            mine = max(0, min(eval_data.rows_per_rank, eval_data.num_rows - rank * eval_data.rows_per_rank))
        batches = _checked(
            islice(iter(eval_data), limit), id_limits, f"{config.data.path} split {config.data.eval_split!r}"
        )
        metrics = evaluator.run(pipeline, batches, mine)
        probes = [torch.zeros_like(evaluator.probe) for _ in range(world)]
        dist.all_gather(probes, evaluator.probe)  # every rank's eval batches are of one size
        progress["probe"] = {
            "step": progress["step"],
            "batch_size": cfg.batch_size,
            "logits": [p.tolist() for p in probes],
        }
        record = {
            "step": progress["step"],
            **metrics,
            "train_loss": train_loss,
            "examples_per_s": examples / seconds if seconds else None,
            "embedding_bytes": total_bytes,
            "embedding_bytes_per_table": bytes_per_table,
            "uncompressed_embedding_bytes": full_bytes,
            "compression_ratio": full_bytes / total_bytes,
            "peak_memory_bytes": _peak_memory(device),
        }
        history.append(record)
        if rank == 0:
            print(
                json.dumps(_json_safe({k: v for k, v in record.items() if k != "embedding_bytes_per_table"})),
                flush=True,
            )
            _write_results(run_dir, config, history, world)

    def save() -> None:
        nonlocal saved_step
        if checkpoints and saved_step != progress["step"]:
            sums = [torch.zeros_like(loss_sum) for _ in range(world)]
            dist.all_gather(sums, loss_sum)
            progress.update(loss_sums=[s.tolist() for s in sums], history=history)
            state = {"model": dmp.state_dict(), "optimizer": optimizer.state_dict()}
            save_checkpoint(checkpoints, progress["step"], state, as_dict(config), {PROGRESS: progress, DATA: manifest})
            saved_step = progress["step"]

    def stop_requested() -> bool:
        flag = torch.tensor([received[0] if received else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
        return bool(flag)

    stopped = False
    bar = tqdm(total=total_steps, initial=progress["step"], disable=rank != 0, unit="step", dynamic_ncols=True)
    while progress["step"] < total_steps and not stopped:
        train_data.set_epoch(progress["epoch"])
        where = f"{config.data.path} split {config.data.train_split!r} epoch {progress['epoch']}"
        batches = _checked(islice(iter(train_data), progress["batch"], None), id_limits, where)
        while progress["step"] < total_steps and progress["batch"] < len(train_data):
            # Train up to the next evaluation, checkpoint, end of epoch or end of run, so that
            # the pipeline has drained whenever we evaluate or save.
            bounds = [total_steps, progress["step"] + len(train_data) - progress["batch"]]
            for every in (cfg.eval_every, cfg.checkpoint_every):
                if every:
                    bounds.append((progress["step"] // every + 1) * every)
            todo = min(bounds) - progress["step"]
            start, done = time.perf_counter(), 0
            segment = islice(batches, todo)
            while True:
                if stop_requested():  # every rank stops after the same step
                    stopped = True
                    break
                try:
                    loss, _, labels = pipeline.progress(segment)
                except StopIteration:
                    break
                loss = loss.detach().double()
                loss_sum[0] += loss
                loss_sum[1] += 1
                window += torch.stack(
                    [loss, labels.double().sum(), labels.new_tensor(labels.numel()).double(), loss.new_ones(())]
                )
                step = progress["step"] + done + 1
                torch.where(torch.isfinite(loss) | (first_bad >= 0), first_bad, loss.new_tensor(step), out=first_bad)
                done += 1
                bar.update(1)
                if (progress["step"] + done) % CHECK_EVERY == 0:
                    progress["step"] += done
                    progress["batch"] += done
                    train_seconds += time.perf_counter() - start
                    examples += done * cfg.batch_size * world
                    start, done = time.perf_counter(), 0
                    check_divergence()
            train_seconds += time.perf_counter() - start
            examples += done * cfg.batch_size * world
            progress["step"] += done
            progress["batch"] += done
            if progress["batch"] >= len(train_data):
                progress["epoch"] += 1
                progress["batch"] = 0
            check_divergence()  # never evaluate or save a model with a non-finite loss
            if stopped or progress["step"] == total_steps:  # evaluated and saved once, below
                break
            if cfg.eval_every and progress["step"] % cfg.eval_every == 0:
                evaluate()
            if cfg.checkpoint_every and progress["step"] % cfg.checkpoint_every == 0:
                save()
            if progress["batch"] == 0:
                break
    bar.close()
    if stopped:
        save()
        name = signal.Signals(received[0] if received else signal.SIGTERM).name
        what = (
            f"saved {checkpoints / ('step_%d' % progress['step'])}: run the same command to resume"
            if checkpoints
            else "no train.checkpoint_dir, nothing saved"
        )
        code = 128 + (received[0] if received else signal.SIGTERM)
        raise Stopped(f"stopped by {name} at step {progress['step']} of {total_steps}; {what}", code)
    evaluate()  # before the last save, so that the last checkpoint holds the final evaluation
    if rank == 0:
        print(_bytes_table(bytes_per_table, uncompressed), flush=True)
    save()
    return _final(history)


def _peak_memory(device: torch.device) -> int:
    """Peak memory of the busiest rank: GPU memory allocated on GPU, resident set on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    value = torch.tensor([peak], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value)


def _bytes_table(actual: Dict[str, int], uncompressed: Dict[str, int]) -> str:
    """Embedding parameter bytes per table and in total, against the uncompressed tables."""
    lines = [f"{'table':<10}{'bytes':>14}{'uncompressed':>14}{'ratio':>8}"]
    rows = [(name, size, uncompressed[name]) for name, size in actual.items()]
    for name, size, full in rows + [("total", sum(actual.values()), sum(uncompressed.values()))]:
        lines.append(f"{name:<10}{size:>14,}{full:>14,}{full / size:>7.1f}x")
    return "\n".join(lines)


def _final(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {**history[-1], "evaluations": history}


def _write_results(run_dir: Path, config: RunConfig, history: List[Dict[str, Any]], world: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {**_final(history), "world_size": world, "config": as_dict(config)}
    tmp = run_dir / "results.json.tmp"
    tmp.write_text(json.dumps(_json_safe(results), indent=2, default=str, allow_nan=False))
    os.replace(tmp, run_dir / "results.json")


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None, so that results files are valid JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return _finite(value) if isinstance(value, float) else value
