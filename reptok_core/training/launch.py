"""Running THE training loop (training/loop.py) under plain `python` or `torchrun`, without Ray.

`train` joins the process group torchrun describes (if any), picks the device (cuda:LOCAL_RANK,
else CPU), keeps checkpoints under `out` (local or s3://, resumed on a re-run), appends rank 0's
metrics to `<metrics_dir>/metrics.jsonl` (sample grids as PNGs beside it) and calls the loop.
Experiments and benchmarks train through it, with the stages' real tasks and losses:

    from reptok_core.formats.images import ImageBatches
    from reptok_core.stages.tokenizer import TokenizerTask
    from reptok_core.training.launch import train
    batches = ImageBatches("data/train", loop.batch_size, loop.seed, loop.shuffle_buffer)
    train(lambda device: TokenizerTask(model_cfg, device), loop, optim, out="runs/t1", batches=batches,
          export=lambda state: export_tokenizer(state, model_cfg, "runs/t1/export"))

Run the same command again to resume; `torchrun --nproc-per-node N script.py` shards with FSDP2.
A task with its own `epoch_batches` (stage 2's GeneratorTask) needs no `batches`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from reptok_core import storage
from reptok_core.training.checkpoints import FolderCheckpoints
from reptok_core.training.distributed import init_from_env, world
from reptok_core.training.loop import BatchSource, LoopConfig, Task, run
from reptok_core.training.optim import OptimConfig


class JsonLinesMetrics:
    """Metrics as JSON lines `{"step": s, ...}` in `folder/metrics.jsonl` (appended: a resumed
    run continues the file), sample grids as `folder/<key>_<step>.png`. Local folders only."""

    def __init__(self, folder: str):
        if storage.is_s3(folder):
            raise ValueError(f"metrics folder {folder!r}: JsonLinesMetrics writes local files only")
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.path = os.path.join(folder, "metrics.jsonl")

    def metrics(self, values: dict[str, float], step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")

    def image(self, image: np.ndarray, key: str, step: int) -> None:
        from PIL import Image

        Image.fromarray(image).save(os.path.join(self.folder, f"{key}_{step:08d}.png"))


def train(
    make_task: Callable[[torch.device], Task],
    loop: LoopConfig,
    optim: OptimConfig,
    *,
    out: str,
    batches: BatchSource | None = None,
    eval_batch: dict[str, Any] | None = None,
    export: Callable[[dict[str, torch.Tensor]], None] | None = None,
    metrics_dir: str = "",
    keep: int = 2,
) -> None:
    """The loop with the Ray-free seams. out: the run's folder (local or s3://): checkpoints
    `checkpoint_XXXXXXXX` (the newest `keep`) and the fault drill's marker. metrics_dir: where
    metrics.jsonl goes ('' = `out`, which must then be local)."""
    device = init_from_env()
    rank = world()[0]
    if rank == 0 and not storage.is_s3(out):
        os.makedirs(out, exist_ok=True)
    run(
        make_task,
        loop,
        optim,
        device=device,
        checkpoints=FolderCheckpoints(out, keep),
        metrics=JsonLinesMetrics(metrics_dir or out),
        batches=batches,
        eval_batch=eval_batch,
        export=export,
        run_dir=out,
    )
