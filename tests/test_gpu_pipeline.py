"""The GPU-under-Ray run's helpers (benchmarks/gpu_pipeline.py, cluster/gpu_bundle.py): what
they read out of the stages' logs and the benchmarks' JSON, and the bundle's pinning rule."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "cluster"))

import gpu_bundle  # noqa: E402
import gpu_pipeline as gp  # noqa: E402

TRAIN_LOG = """[train] starting; world 1, device cuda:0, precision bf16, step captured as a CUDA graph
[train] step 20/60 total 1.2000 | 900.0 img/s | ETA 10s
[train] step 40/60 total 1.1000 | 30000.0 img/s | ETA 5s
[train] step 60/60 total 1.0000 | 31000.0 img/s | ETA 0s
[train] CUDA graph: 57 of 60 steps replayed
"""


def test_steady_rate_skips_the_compiling_windows():
    assert gp.steady_rate(TRAIN_LOG, skip=1) == 30500.0
    assert gp.steady_rate(TRAIN_LOG, skip=0) == 30000.0
    assert gp.steady_rate("no progress lines") is None


def test_best_rate_is_the_fastest_window_after_compilation():
    assert gp.best_rate(TRAIN_LOG, skip=1) == 31000.0
    assert gp.best_rate("") is None


def test_grep_reads_the_step_mode_and_graph_replays():
    assert gp.grep(TRAIN_LOG, r"precision \w+, step ([^\n]+)") == "captured as a CUDA graph"
    assert gp.grep(TRAIN_LOG, r"CUDA graph: ([^\n]+)") == "57 of 60 steps replayed"


def test_encode_rate_is_rows_over_busy_seconds():
    log = (
        "[encode] part 1/2 part-00000-ab: 512 rows in 2.0s | 200.0 img/s | ETA 2s\n"
        "[encode] part 2/2 part-00001-ab: 512 rows in 0.5s | 400.0 img/s | ETA 0s\n"
    )
    assert gp.encode_rate(log) == pytest.approx(1024 / 2.5, abs=0.1)
    assert gp.encode_rate("") is None


def test_bench_value_matches_rows(tmp_path):
    path = tmp_path / "b.json"
    runs = [{"batch": 1, "p50_s": 0.2, "images_per_s": 5.0}, {"batch": 16, "images_per_s": 25.0}]
    path.write_text(json.dumps({"runs": runs}))
    assert gp.bench_value(str(path), "images_per_s", batch=16) == 25.0
    assert gp.bench_value(str(path), "p50_s", batch=1) == 0.2
    assert gp.bench_value(str(path), "p50_s", batch=16) is None


def test_overhead_table_gives_ratios_only_for_complete_pairs():
    table = gp.overhead_table({"paper_tokenizer_img_s": 400.0, "bare_stage1_img_s": 425.0})
    assert "| 400.0 | 425.0 | 94.1% |" in table
    assert "| - | - | - |" in table  # the pairs not measured


def test_percentile():
    assert gp.percentile([3.0, 1.0, 2.0], 0.99) == 3.0
    assert gp.percentile([1.0], 0.5) == 1.0


def test_bundle_requirements_must_be_pinned(tmp_path):
    req = tmp_path / "r.txt"
    req.write_text("# comment\nray==2.60.0  # why\n\nfastapi\n")
    with pytest.raises(SystemExit, match="fastapi"):
        gpu_bundle.requirements(str(req))
    req.write_text("ray==2.60.0  # why\n")
    assert gpu_bundle.requirements(str(req)) == ["ray==2.60.0"]


def test_shipped_bundle_list_pins_the_projects_ray():
    reqs = gpu_bundle.requirements(os.path.join(ROOT, "cluster", "gpu_bundle.txt"))
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        line = [ln for ln in f if '"ray[' in ln][0]
    version = line.split("==")[1].split('"')[0]
    assert f"ray=={version}" in reqs
