"""Smoke run of benchmarks/budget.py: end to end on tiny data, a well-formed record whose methods
all hold their budget, written to a temporary folder, never over docs/ (no timing assertions)."""

import importlib.util
import json
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import REPO

SPEC = importlib.util.spec_from_file_location("budget_benchmark", REPO / "benchmarks" / "budget.py")
assert SPEC is not None and SPEC.loader is not None
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_budget_benchmark_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = {p: p.stat().st_mtime_ns for p in (REPO / "docs").glob("budget_*")}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where --smoke's defaults go
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--smoke"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert {p: p.stat().st_mtime_ns for p in (REPO / "docs").glob("budget_*")} == docs
    (out,) = tmp_path.glob("budget_smoke_*")
    assert (out / "budget_smoke.png").stat().st_size > 0
    record = json.loads((out / "budget_smoke.json").read_text())
    assert record["smoke"] and set(record["results"]) == {"synthetic"}
    result = record["results"]["synthetic"]
    assert result["seeds"] == [0] and result["sizes"] == list(bench.LADDER)
    assert result["uncompressed"]["bytes"] == result["uncompressed_bytes"]
    assert set(result["budgets"]) == {f"uniform dim {d}" for d in bench.UNIFORM_DIMS}
    for level, budget in result["budgets"].items():
        methods = budget["methods"]
        assert set(methods) == {level, "MEmCom", "budgeted heuristic", "budgeted heuristic + tail", "budgeted searched"}
        assert methods[level]["bytes"] == budget["budget_bytes"]  # the budget is what uniform tables cost
        for method, m in methods.items():
            assert m["within_budget"] and 0 <= m["remap_bytes"] < m["bytes"] <= budget["budget_bytes"], method
            assert len(m["auc"]) == 1 and 0.0 <= m["auc_mean"] <= 1.0 and m["logloss_mean"] > 0, method
        search = budget["search"]
        assert len(search["labels"]) == 3 and search["best_val_auc"] == max(x["val_auc"] for x in search["labels"])
        dims = {tier[1] for tiers in budget["searched_allocation"].values() for tier in tiers}
        assert dims <= set(bench.LADDER)
