"""THE training loop (reptok_core/training/loop.py) inside a Ray Train worker: its seams on Ray.

Checkpoints go through Ray Train (ray.train.report / get_checkpoint, kept in run.storage and
restored after a worker-group restart), rank 0's metrics and sample grids to the stage's MLflow
run, and stages 0 and 1 read their images from the Ray Dataset shard "train".
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from reptok_core.training import loop as core_loop
from reptok_core.training.checkpoints import checkpoint_name
from reptok_core.training.distributed import world


class RayCheckpoints:
    """Checkpoints reported to Ray Train (it keeps them and hands the newest back on restart)."""

    @contextlib.contextmanager
    def saving(self, step: int) -> Iterator[str]:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            yield tmp
            ray.train.report(
                {"step": step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpoint_name(step),
            )

    @contextlib.contextmanager
    def latest(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as folder:
            yield folder


class MlflowMetrics:
    """Rank 0's metrics and grids into the MLflow run the driver created (never a second run)."""

    def __init__(self, tracking_uri: str, run_id: str):
        import mlflow

        self.mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        batch = [self.mlflow.entities.Metric(k, float(v), ts, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def image(self, image: np.ndarray, key: str, step: int) -> None:
        self.client.log_image(self.run_id, image, key=key, step=step)


class DatasetShard:
    """This worker's shard of the Ray Dataset "train", shuffled locally by (seed, epoch, rank)."""

    def __init__(self, batch_size: int, shuffle_buffer: int, seed: int):
        import ray.train

        self.shard = ray.train.get_dataset_shard("train")
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        return self.shard.iter_torch_batches(
            batch_size=self.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            local_shuffle_seed=self.seed + 1000 * epoch + world()[0],
        )


def device() -> torch.device:
    if torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def run_worker(
    make_task: Callable[[torch.device], Any],
    cfg: Any,
    *,
    run_id: str,
    tracking_uri: str,
    run_dir: str,
    eval_batch: dict[str, Any] | None,
    export: Callable[[dict[str, torch.Tensor]], None],
    from_dataset: bool,
) -> None:
    """The body of TorchTrainer's train_loop_per_worker. `cfg` is the stage's config (its `loop`
    and `optim` sections); from_dataset: batches from the Dataset shard, else the task's own."""
    loop = cfg.loop
    core_loop.run(
        make_task,
        loop,
        cfg.optim,
        device=device(),
        checkpoints=RayCheckpoints(),
        metrics=MlflowMetrics(tracking_uri, run_id),
        batches=DatasetShard(loop.batch_size, loop.shuffle_buffer, loop.seed)
        if from_dataset
        else None,
        eval_batch=eval_batch,
        export=export,
        run_dir=run_dir,
        checkpoint_meta={"mlflow_run_id": run_id},
    )
