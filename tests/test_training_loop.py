"""THE training loop (reptok_core/training/loop.py) under plain python, with no Ray or MLflow:
stop at a step, resume from the folder checkpoints, and end exactly where an uninterrupted run
ends. Stage 1's tiny tokenizer on the 16-px Fashion-MNIST images Parquet, a few CPU steps."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from reptok_core.config import from_dict, read_yaml
from reptok_core.formats.images import ImageBatches, heldout_batch
from reptok_core.models.tokenizer import TokenizerConfig
from reptok_core.stages.tokenizer import TokenizerTask
from reptok_core.training.checkpoints import FolderCheckpoints
from reptok_core.training.launch import train
from reptok_core.training.loop import LoopConfig
from reptok_core.training.optim import OptimConfig

# 112 training rows in batches of 16: 7 batches an epoch, so 10 steps cross into epoch 1.
LOOP = dict(steps=10, batch_size=16, log_every=2, checkpoint_every=4, eval_every=0, eval_images=4)
LOOP.update(sample_steps=2, shuffle_buffer=16)


@pytest.fixture(autouse=True)
def no_ray_no_mlflow(monkeypatch):
    """Any import of ray or mlflow from here on fails."""
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)


def _train(out: str, data, eval_batch=None, metrics_dir: str = "", **loop) -> dict:
    """One run of the loop (resuming whatever `out` holds); the exported EMA weights."""
    preset = read_yaml("configs/tokenizer/tiny.yaml")
    model = from_dict(TokenizerConfig, preset["model"])
    cfg = LoopConfig(**{**LOOP, **loop})
    exported = {}
    train(
        lambda device: TokenizerTask(model, device),
        cfg,
        from_dict(OptimConfig, preset["optim"]),
        out=out,
        batches=ImageBatches(str(data), cfg.batch_size, cfg.seed, cfg.shuffle_buffer),
        eval_batch=eval_batch,
        export=exported.update,
        metrics_dir=metrics_dir,
    )
    return exported


def _checkpoints(out: str) -> list[str]:
    return [c.rsplit("/", 1)[-1] for c in FolderCheckpoints(out).complete()]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stop_resume_matches_an_uninterrupted_run(fashion_parquet, tmp_path):
    data = fashion_parquet / "train"
    eval_batch = heldout_batch(str(fashion_parquet / "val"), 4)
    whole = _train(str(tmp_path / "whole"), data, eval_batch)

    parts = str(tmp_path / "parts")
    assert _train(parts, data, eval_batch, stop_at_step=6) == {}  # stopped: no export
    assert _checkpoints(parts) == ["checkpoint_00000004", "checkpoint_00000006"]
    _same(whole, _train(parts, data, eval_batch))

    assert _checkpoints(parts) == ["checkpoint_00000008", "checkpoint_00000010"]  # newest two
    state = json.loads(
        (tmp_path / "parts" / "checkpoint_00000010" / "trainer_state.json").read_text()
    )
    assert state == {"step": 10, "epoch": 1, "batch_in_epoch": 3}
    metrics = [json.loads(line) for line in open(tmp_path / "parts" / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "flow" in m] == [2, 4, 6, 8, 10]
    assert [m["step"] for m in metrics if "resumed_from_step" in m] == [6]
    assert [m["step"] for m in metrics if "eval/psnr" in m] == [6, 10]
    assert (tmp_path / "parts" / "samples_00000010.png").is_file()


def test_folder_checkpoints_on_s3(fashion_parquet, s3_bucket, tmp_path):
    data = fashion_parquet / "train"
    short = dict(steps=4, checkpoint_every=2)
    whole = _train(str(tmp_path / "whole"), data, **short)
    out = f"{s3_bucket}/run"
    assert _train(out, data, metrics_dir=str(tmp_path / "m"), stop_at_step=2, **short) == {}
    assert _checkpoints(out) == ["checkpoint_00000002"]
    _same(whole, _train(out, data, metrics_dir=str(tmp_path / "m"), **short))
    assert _checkpoints(out) == ["checkpoint_00000002", "checkpoint_00000004"]


def test_time_budget_stops_on_a_log_step_and_resumes(fashion_parquet, tmp_path):
    data, out = fashion_parquet / "train", str(tmp_path / "run")
    short = dict(steps=4, checkpoint_every=4)
    assert _train(out, data, max_minutes=1e-9, **short) == {}  # spent at once: stops at step 2
    assert _checkpoints(out) == ["checkpoint_00000002"]
    _same(_train(str(tmp_path / "whole"), data, **short), _train(out, data, **short))


TORCHRUN_SCRIPT = """
import sys, torch
from reptok_core.config import from_dict, read_yaml
from reptok_core.formats.images import ImageBatches
from reptok_core.models.tokenizer import TokenizerConfig
from reptok_core.stages.tokenizer import TokenizerTask
from reptok_core.training.launch import train
from reptok_core.training.loop import LoopConfig
from reptok_core.training.optim import OptimConfig

out, data, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
preset = read_yaml("configs/tokenizer/tiny.yaml")
model = from_dict(TokenizerConfig, preset["model"])
loop = LoopConfig(steps=6, batch_size=8, log_every=2, checkpoint_every=2, eval_every=0,
                  stop_at_step=stop, shuffle_buffer=16)
train(lambda device: TokenizerTask(model, device), loop, from_dict(OptimConfig, preset["optim"]),
      out=out, batches=ImageBatches(data, loop.batch_size, loop.seed, loop.shuffle_buffer),
      export=lambda state: torch.save(state, out + "/final.pt"))
"""


@pytest.mark.slow
def test_torchrun_two_processes_stop_resume(fashion_parquet, tmp_path):
    """FSDP over gloo in two processes: the shared checkpoint folder, and replicated parameters
    (the tiny preset's random frozen encoder) initialised alike on both ranks, so a resumed run
    ends bit for bit where an uninterrupted one does."""
    import os
    import subprocess

    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out: str, stop: int) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        cmd += [str(script), out, str(fashion_parquet / "train"), str(stop)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    torchrun(whole, 0)
    torchrun(parts, 3)
    assert _checkpoints(parts) == ["checkpoint_00000002", "checkpoint_00000003"]
    torchrun(parts, 0)
    _same(torch.load(f"{whole}/final.pt"), torch.load(f"{parts}/final.pt"))
