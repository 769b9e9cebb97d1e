"""The SSL ablation (experiments/ssl_ablation.py) runs the product's loop with the real tasks,
under plain python without Ray or MLflow: a tiny DINO pretraining stopped and resumed, and one
arm (stage 1 -> tokens -> stage 2 -> samples) for a few CPU steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def _ablation(out: Path, *args: str) -> str:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(ROOT / "experiments" / "ssl_ablation.py"), "--out", str(out)]
    proc = subprocess.run([*cmd, "--limit", "64", *args], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ssl")  # one Fashion-MNIST 32-px cache for both tests


def test_pretrain_stops_resumes_and_exports(out):
    args = ["pretrain", "--preset", "configs/pretrain/tiny.yaml", "--steps", "4", "--batch", "8",
            "--log-every", "2", "--eval-every", "2", "--knn-bank", "32", "--knn-queries", "16",
            "--set", "model.encoder.arch.depth=1"]  # fmt: skip
    _ablation(out, *args, "loop.stop_at_step=2")
    run = out / "dino"
    assert not (run / "export").exists() and (run / "checkpoint_00000002").is_dir()
    assert "resuming at step 2" in _ablation(out, *args)
    meta = json.loads((run / "export" / "encoder.json").read_text())
    assert meta["step"] == 4 and 0 <= meta["knn_accuracy"] <= 1
    # an override of one nested key keeps the preset's other keys of that section
    assert meta["encoder"]["arch"]["depth"] == 1 and meta["encoder"]["arch"]["embed_dim"] == 32
    assert meta["encoder"]["img_size"] == 16
    rows = _metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/knn_acc" in r] == [0, 2, 4]  # the init's k-NN first
    assert [r["step"] for r in rows if "dino" in r] == [2, 4]


def test_one_arm_through_the_product_loop(out):
    args = ["arm", "--arm", "b_random", "--tok-steps", "2", "--tok-batch", "4", "--gen-steps",
            "2", "--gen-batch", "8", "--samples", "8", "--decode-steps", "2"]  # fmt: skip
    _ablation(out, *args)
    arm = out / "b_random"
    for stage, loss in (("stage1", "cos"), ("stage2", "flow")):
        assert [r["step"] for r in _metrics(arm / stage / "metrics.jsonl") if loss in r] == [2]
    result = json.loads((out / "arm_b_random.json").read_text())
    assert result["settings"]["tok_steps"] == 2 and 0 <= result["token_knn"] <= 1
    assert (out / "grid_b_random.png").is_file()
    assert "[train]" not in _ablation(out, *args)  # done: a re-run trains nothing
