"""The stage-1 and stage-2 step benchmarks run the product's step on CPU (`--tiny`): every run
spec ends "ok" with a positive rate, and one past the time budget is recorded as skipped.
Their figures come from the GPU (benchmarks/NOTES.md); this only keeps the scripts working."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(("script", "rate"), [("bench_stage1", "images_per_s"),
                                              ("bench_stage2", "samples_per_s")])  # fmt: skip
def test_step_benchmark_runs_on_cpu(tmp_path, script, rate):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--tiny", "--device", "cpu",
           "--runs", "eager:4", "--steps", "2", "--warmup", "1", "--flops-batch", "2",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["runs"]
    assert row["status"] == "ok", row
    assert row[rate] > 0 and row["step_s"] > 0


def test_runs_past_the_time_budget_are_skipped(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_stage2.py"), "--tiny", "--device",
           "cpu", "--runs", "eager:4,eager:8", "--steps", "2", "--warmup", "1",
           "--flops-batch", "2", "--time-budget", "1e-9", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["status"] for r in runs] == ["skipped (time budget)"] * 2
