"""The distributed training job: one process per rank (torchrun / torchx start them).

DMP shards the (compressed) DLRM with the TorchRec planner, TorchRec's sparse-dist pipeline
trains it, evaluation reports AUC and log loss, and DCP checkpoints make it resumable.
"""

import json
import os
import resource
import time
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch
import torch.distributed as dist
from torchmetrics.classification import BinaryAUROC
from torchrec.distributed.comm import get_local_rank, get_local_size
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from torchrec_memcom.data import CriteoParquetLoader, load_manifest, synthesize
from torchrec_memcom.data.manifest import features_of
from torchrec_memcom.distributed.planner import memcom_planner
from torchrec_memcom.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from torchrec_memcom.train.config import RunConfig, as_dict, check_features
from torchrec_memcom.train.model import build_model, embedding_bytes, table_configs

DENSE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}


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


class Evaluator:
    """AUC (torchmetrics, synced over ranks) and log loss of a split."""

    def __init__(self, device: torch.device) -> None:
        self.auroc = BinaryAUROC().to(device)
        self.device = device

    def run(self, pipeline: TrainPipelineSparseDist, batches: Iterator[Any]) -> Dict[str, float]:
        self.auroc.reset()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, examples
        pipeline._model.eval()
        with torch.no_grad():
            while True:
                try:
                    _, logits, labels = pipeline.progress(batches)
                except StopIteration:
                    break
                self.auroc.update(torch.sigmoid(logits), labels.int())
                totals[0] += torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, labels.float(), reduction="sum"
                )
                totals[1] += labels.numel()
        pipeline._model.train()
        dist.all_reduce(totals)
        return {"auc": float(self.auroc.compute()), "logloss": float(totals[0] / totals[1])}


def train(config: RunConfig) -> Dict[str, Any]:
    """Run the job on this rank; rank 0 writes ``run_dir/results.json``. Returns the results."""
    device = _init_distributed()
    try:
        results = _train(config, device)
        # every rank's collectives are done before any rank tears its group down and exits
        dist.barrier()
        return results
    finally:
        dist.destroy_process_group()


def _prepare_data(config: RunConfig) -> Dict[str, Any]:
    """The manifest of ``data.path``; synthesized there first (by rank 0) when asked and absent."""
    path = Path(config.data.path)
    if config.data.synthetic is not None and dist.get_rank() == 0 and not (path / "manifest.json").exists():
        s = config.data.synthetic
        synthesize(s.rows, path, seed=s.seed, max_cardinality=s.max_cardinality)
    dist.barrier()
    return load_manifest(path)


def _train(config: RunConfig, device: torch.device) -> Dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config.train
    torch.manual_seed(cfg.seed)
    manifest = _prepare_data(config)
    features = features_of(manifest)
    check_features(config, features.sparse, f"{config.data.path}'s")
    sizes = config.embeddings.num_embeddings
    if sizes == "from_data":
        sizes = [manifest["features"][f]["num_embeddings"] for f in features.sparse]

    model, sharders = build_model(config, list(sizes), device, features)
    configs = table_configs(config.embeddings.dim, list(sizes), features.sparse)
    bytes_per_table = embedding_bytes(model.model.sparse_arch.embedding_bag_collection, [t.name for t in configs])
    uncompressed = {t.name: t.num_embeddings * t.embedding_dim * 4 for t in configs}
    planner = memcom_planner(_topology(device), batch_size=cfg.batch_size)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=device,
        plan=plan, sharders=sharders,
    )
    dense = config.optimizer.dense
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: DENSE_OPTIMIZERS[dense.type](params, lr=dense.lr),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_optimizer])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)

    def loader(split: str, shuffle: bool) -> CriteoParquetLoader:
        return CriteoParquetLoader(
            config.data.path, split, cfg.batch_size, rank=rank, world_size=world,
            seed=cfg.seed, shuffle=shuffle, drop_last=True,
            # a GPU step leaves the CPU (and the GIL) to the prefetch thread; a CPU step competes
            # with it for both, and measured slower with it (docs/data.md)
            prefetch=2 if device.type != "cpu" else 0,
        )

    train_data, eval_data = loader(config.data.train_split, True), loader(config.data.eval_split, False)
    for data, split in ((train_data, config.data.train_split), (eval_data, config.data.eval_split)):
        if len(data) == 0:
            raise ValueError(
                f"{config.data.path}: split {split!r} has fewer rows than one batch on each of "
                f"{world} ranks (train.batch_size={cfg.batch_size})"
            )
    total_steps = cfg.steps or cfg.epochs * len(train_data)
    # The position and, as JSON (one value each, the same on every rank), every rank's training
    # loss sum since the last evaluation and the evaluations so far: all a resumed run needs to
    # continue the uninterrupted run's metrics exactly.
    progress: Dict[str, Any] = {
        "step": 0, "epoch": 0, "batch": 0, "world_size": world, "loss_sums": "[]", "history": "[]",
    }
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # this rank's, since the last evaluation
    history: List[Dict[str, Any]] = []

    checkpoints = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None

    def state() -> Dict[str, Any]:
        sums = [torch.zeros_like(loss_sum) for _ in range(world)]
        dist.all_gather(sums, loss_sum)
        progress.update(loss_sums=json.dumps([s.tolist() for s in sums]), history=json.dumps(history))
        return {"model": dmp.state_dict(), "optimizer": optimizer.state_dict(), "progress": dict(progress)}

    resumed = checkpoints and latest_checkpoint(checkpoints)
    if resumed:
        saved = {"progress": dict(progress)}
        load_checkpoint(resumed, saved)
        if saved["progress"]["world_size"] != world:
            raise ValueError(
                f"{resumed} was written by {saved['progress']['world_size']} ranks, this job has "
                f"{world}: resume with the same world size (see docs/training.md)"
            )
        optimizer.init_state()
        loaded = state()
        load_checkpoint(resumed, loaded)
        dmp.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        progress.update(loaded["progress"])
        loss_sum.copy_(torch.tensor(json.loads(progress["loss_sums"])[rank], dtype=torch.float64))
        history = json.loads(progress["history"])
        if progress["step"] > total_steps:
            raise ValueError(f"{resumed} is at step {progress['step']}, past this run's {total_steps} steps")
        if rank == 0:
            print(f"resumed from {resumed} at step {progress['step']}", flush=True)

    run_dir = Path(cfg.run_dir)
    if history and history[-1]["step"] == total_steps:  # resumed a finished run: nothing to do
        if rank == 0:
            print(f"the run finished at step {total_steps}; results in {run_dir / 'results.json'}", flush=True)
            _write_results(run_dir, config, history, world)
        return _final(history)
    evaluator = Evaluator(device)
    examples, train_seconds = 0, 0.0
    total_bytes, full_bytes = sum(bytes_per_table.values()), sum(uncompressed.values())

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
        metrics = evaluator.run(pipeline, islice(iter(eval_data), limit))
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
            print(json.dumps({k: v for k, v in record.items() if k != "embedding_bytes_per_table"}), flush=True)
            _write_results(run_dir, config, history, world)

    def save() -> None:
        if checkpoints:
            save_checkpoint(checkpoints, progress["step"], state(), as_dict(config))

    bar = tqdm(total=total_steps, initial=progress["step"], disable=rank != 0, unit="step", dynamic_ncols=True)
    while progress["step"] < total_steps:
        train_data.set_epoch(progress["epoch"])
        batches = islice(iter(train_data), progress["batch"], None)
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
                try:
                    loss, _, _ = pipeline.progress(segment)
                except StopIteration:
                    break
                loss_sum[0] += loss.detach().double()
                loss_sum[1] += 1
                done += 1
                bar.update(1)
            train_seconds += time.perf_counter() - start
            examples += done * cfg.batch_size * world
            progress["step"] += done
            progress["batch"] += done
            if progress["batch"] >= len(train_data):
                progress["epoch"] += 1
                progress["batch"] = 0
            if progress["step"] == total_steps:  # evaluated and saved once, below
                break
            if cfg.eval_every and progress["step"] % cfg.eval_every == 0:
                evaluate()
            if cfg.checkpoint_every and progress["step"] % cfg.checkpoint_every == 0:
                save()
            if progress["batch"] == 0:
                break
    bar.close()
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
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, run_dir / "results.json")
