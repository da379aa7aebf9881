"""`memcom bench`: the method sweep through the training app on the user's data; finished arms are
kept, so a longer sweep trains only what is new; the same JSON, table and plot as benchmarks/quality.py."""

import json
from pathlib import Path

import pytest
import yaml

from torchrec_memcom.cli import main


def test_bench_sweeps_keeps_finished_arms_and_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from torchrec_memcom.data import synthesize

    data = tmp_path / "data"
    synthesize(6000, data, seed=0, max_cardinality=2000, progress=False)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"dense_arch_layer_sizes": [16], "over_arch_layer_sizes": [16, 1]},
                "embeddings": {"dim": 8},
                "optimizer": {"sparse": {"type": "rowwise_adagrad", "lr": 0.1}, "dense": {"lr": 0.1}},
                "train": {"batch_size": 128, "steps": 4, "run_dir": str(tmp_path / "unused")},
            }
        )
    )
    out = tmp_path / "bench"
    args = [
        "bench",
        "--config",
        str(config),
        "--data",
        str(data),
        "--out",
        str(out),
        "--methods",
        "memcom",
        "--min-rows",
        "100",
        "--nproc",
        "1",
    ]
    assert main([*args, "--ratios", "4"]) == 0
    result = json.loads((out / "bench.json").read_text())
    cells = result["datasets"]["data"]["methods"]
    assert set(cells) == {"none", "memcom"} and set(cells["memcom"]) == {"4"}
    trained = json.loads((out / "arms" / "memcom_4_s0" / "run" / "results.json").read_text())
    assert cells["memcom"]["4"]["auc"]["mean"] == trained["auc"] and trained["step"] == 4
    assert cells["memcom"]["4"]["delta_auc_vs_none"]["mean"] == pytest.approx(
        trained["auc"] - cells["none"]["1"]["auc"]["mean"]
    )
    assert (out / "bench.png").stat().st_size > 0 and "| memcom | 4x |" in capsys.readouterr().out
    stamp = (out / "arms" / "memcom_4_s0" / "run" / "results.json").stat().st_mtime_ns
    assert main([*args, "--ratios", "4", "1000"]) == 0  # 1000x is unreachable: recorded, not trained
    text = capsys.readouterr().out
    assert "none_1_s0: finished before, kept" in text and "memcom_4_s0: finished before, kept" in text
    assert (out / "arms" / "memcom_4_s0" / "run" / "results.json").stat().st_mtime_ns == stamp
    cells = json.loads((out / "bench.json").read_text())["datasets"]["data"]["methods"]
    assert cells["memcom"]["1000"]["reachable"] is False and not (out / "arms" / "memcom_1000_s0").exists()


def test_torchx_bench_component_runs_memcom_bench() -> None:
    """The component's command line is `memcom bench` with the same options."""
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
    import memcom_torchx

    from torchrec_memcom import bench

    app = memcom_torchx.bench("c.yaml", "data", "out", methods="hash memcom", ratios="4 8", seeds="0 1", nproc=4)
    (role,) = app.roles
    assert role.args[:3] == ["-m", "torchrec_memcom.cli", "bench"]
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    args = parser.parse_args(role.args[2:])
    assert (args.config, args.data, args.out, args.methods, args.ratios, args.seeds, args.nproc) == (
        "c.yaml",
        "data",
        "out",
        ["hash", "memcom"],
        [4.0, 8.0],
        [0, 1],
        4,
    )
