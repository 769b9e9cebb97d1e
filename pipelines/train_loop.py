"""The Ray Train worker loop shared by stage 1 and stage 2 (never copied per stage).

A *task* (reptok_core.stages.tokenizer.TokenizerTask, reptok_core.stages.generator...) supplies the
model and what a batch means; this loop supplies everything around it: FSDP2, optimizer and
EMA, sharded checkpoints with resume, data position, MLflow logging from rank 0, evaluation,
sample grids, progress, and the final consolidated export of the EMA weights. A task may define
`after_step(step)` for work after each optimiser step (stage 0's teacher EMA).

Data reaches the loop either as the Ray Dataset shard "train" (streamed, the default) or, with
`local_batches=True`, from the task itself: `task.epoch_batches(epoch, batch_size, seed)` yields
this rank's batches of one epoch from data the task holds in memory or streams itself (stage 2's
token set). Either way an epoch's batch order must depend only on (seed, epoch, rank), so resume
can skip batches.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reptok_core import storage
from reptok_core.config import Switch, opt
from reptok_core.device import Precision, resolve_precision
from reptok_core.training import cuda_graph_step
from reptok_core.training.distributed import (
    full_state_dict,
    is_distributed,
    load_sharded,
    save_sharded,
    world,
)
from reptok_core.training.optim import (
    EMA,
    OptimConfig,
    build_optimizer,
    lr_at,
    train_step,
)

TRAINER_STATE = "trainer_state.json"


@dataclass
class LoopConfig:
    steps: int = opt(1000, "total optimisation steps")
    batch_size: int = opt(32, "batch size per worker")
    precision: Precision = opt(
        Precision.AUTO, "bf16 autocast, fp32, or auto (bf16 on a GPU that has it, fp32 elsewhere)"
    )
    compile: bool = opt(False, "torch.compile each transformer block (GPU)")
    cuda_graph: Switch = opt(
        Switch.AUTO,
        "capture the training step as a CUDA graph: auto (when there is one CUDA worker and "
        "the task allows it: the stage-2 generators), on (error if impossible), off",
    )
    log_every: int = opt(10, "steps between metric logs / progress lines")
    checkpoint_every: int = opt(500, "steps between sharded checkpoints (and one at the end)")
    eval_every: int = opt(
        500, "steps between evaluations on the held-out split (0 = only at the end)"
    )
    eval_images: int = opt(16, "held-out images (or samples) per evaluation")
    sample_steps: int = opt(25, "Euler steps used by evaluation sampling")
    flip: bool = opt(True, "random horizontal flips of training images")
    shuffle_buffer: int = opt(256, "local shuffle buffer (rows) of the per-worker data stream")
    seed: int = opt(0, "base seed (each rank adds its rank)")
    stop_at_step: int = opt(
        0, "stop cleanly after this step (0 = run to the end); a re-run resumes"
    )
    kill_worker_at_step: int = opt(
        0, "fault drill: rank 1 (or 0) dies once at this step; FailureConfig restarts"
    )


def _device() -> torch.device:
    if torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


class MlflowLogger:
    """Rank-0 MLflow client bound to the run the driver created (never a second run)."""

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool):
        self.enabled = enabled and bool(run_id)
        if self.enabled:
            import mlflow

            self.mlflow = mlflow
            self.client = mlflow.MlflowClient(tracking_uri)
            self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        ts = int(time.time() * 1000)
        batch = [self.mlflow.entities.Metric(k, float(v), ts, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def image(self, image: np.ndarray, key: str, step: int) -> None:
        if self.enabled:
            self.client.log_image(self.run_id, image, key=key, step=step)


def _epochs(
    make_iter: Callable[[int], Iterator[dict]], start_epoch: int, skip: int
) -> Iterator[tuple[int, int, dict]]:
    """(epoch, index in epoch, batch) forever, skipping `skip` batches of the first epoch on resume."""
    epoch = start_epoch
    while True:
        for i, batch in enumerate(make_iter(epoch)):
            if epoch == start_epoch and i < skip:
                continue
            yield epoch, i, batch
        epoch += 1
        skip = 0


def _save(
    step: int, epoch: int, index: int, model, optimizer, ema: EMA, run_id: str, rank: int
) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        extra = {"ema": ema.state_dict()}
        save_sharded(tmp, model, optimizer, extra)
        rng = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        torch.save(rng, os.path.join(tmp, f"rng_{rank}.pt"))
        if rank == 0:
            state = {
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": index + 1,
                "mlflow_run_id": run_id,
            }
            with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                json.dump(state, f)
        ray.train.report(
            {"step": step},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )


def _restore(model, optimizer, ema: EMA, rank: int) -> dict[str, Any]:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    with ckpt.as_directory() as d:
        extra = {"ema": ema.state_dict()}
        load_sharded(d, model, optimizer, extra)
        ema.load_state_dict(extra["ema"])
        rng_file = os.path.join(d, f"rng_{rank}.pt")
        if os.path.exists(rng_file):  # absent when resuming at a different world size
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        with open(os.path.join(d, TRAINER_STATE)) as f:
            return json.load(f)


def _maybe_die(cfg: LoopConfig, step: int, rank: int, marker_dir: str) -> None:
    """Fault drill for the FailureConfig test: one worker process exits hard, exactly once."""
    if cfg.kill_worker_at_step <= 0 or step != cfg.kill_worker_at_step:
        return
    victim = 1 if world()[1] > 1 else 0
    marker = storage.join(marker_dir, "killed_once")
    if rank == victim and not storage.exists(marker):
        storage.write_bytes_atomic(marker, b"1")
        print(f"[fault drill] rank {rank} exits at step {step}", flush=True)
        os._exit(1)


def run(
    task_factory: Callable[[torch.device], Any],
    loop: LoopConfig,
    optim: OptimConfig,
    *,
    eval_batch: dict[str, Any] | None,
    run_id: str,
    tracking_uri: str,
    export_fn: Callable[[dict[str, torch.Tensor]], None],
    run_dir: str,
    local_batches: bool = False,
) -> None:
    """The body of TorchTrainer's train_loop_per_worker."""
    import ray.train

    rank, world_size = world()
    device = _device()
    torch.manual_seed(loop.seed + rank)
    np.random.seed(loop.seed + rank)
    random.seed(loop.seed + rank)
    task = task_factory(device)
    model = task.model
    if is_distributed():
        task.shard()
    if loop.compile:
        for block in task.blocks():
            block.compile()
    precision = resolve_precision(loop.precision, device, "loop.precision")
    optimizer = build_optimizer(model.parameters(), optim, device)
    ema = EMA(model, optim.ema_decay)
    state = _restore(model, optimizer, ema, rank)
    graphed = None
    if cuda_graph_step.resolve(
        loop.cuda_graph, device, is_distributed(), getattr(task, "capture_safe", False)
    ):
        graphed = cuda_graph_step.CudaGraphStep(
            model,
            optimizer,
            lambda b: task.loss(b, flip=loop.flip),
            grad_clip=optim.grad_clip,
            device=device,
            precision=precision,
            ema=ema,
        )
    start = state["step"]
    log = MlflowLogger(tracking_uri, run_id, enabled=rank == 0)
    if start:
        log.metrics({"resumed_from_step": start}, start)
    if rank == 0:
        print(
            f"[train] {'resuming at step ' + str(start) if start else 'starting'}; world {world_size}, "
            f"device {device}, precision {precision}, "
            f"step {'captured as a CUDA graph' if graphed is not None else 'eager'}",
            flush=True,
        )

    shard = None if local_batches else ray.train.get_dataset_shard("train")

    def epoch_iter(epoch: int) -> Iterator[dict]:
        if shard is None:
            return task.epoch_batches(epoch, loop.batch_size, loop.seed)
        return shard.iter_torch_batches(
            batch_size=loop.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=loop.shuffle_buffer or None,
            local_shuffle_seed=loop.seed + 1000 * epoch + rank,
        )

    if eval_batch is not None:
        eval_batch = {k: torch.as_tensor(v) for k, v in eval_batch.items()}
    batches = _epochs(epoch_iter, state["epoch"], state["batch_in_epoch"])
    # Optional task hook, called with the number of finished steps after each optimiser step.
    after_step = getattr(task, "after_step", None)
    t_last, imgs_since = time.time(), 0
    t_start = time.time()
    epoch, index = state["epoch"], state["batch_in_epoch"] - 1
    step = start
    model.train()
    while step < loop.steps:
        epoch, index, batch = next(batches)
        _maybe_die(loop, step + 1, rank, run_dir)
        lr = lr_at(step, loop.steps, optim)
        if graphed is not None:
            out = graphed(batch, lr)
        else:
            out = train_step(
                model,
                optimizer,
                lambda b=batch: task.loss(b, flip=loop.flip),
                lr=lr,
                grad_clip=optim.grad_clip,
                device=device,
                precision=precision,
                ema=ema,
            )
        step += 1
        if after_step is not None:  # e.g. stage 0 moves its EMA teacher after every step
            after_step(step)
        imgs_since += loop.batch_size * world_size
        if step % loop.log_every == 0 or step == loop.steps:
            now = time.time()
            ips = imgs_since / max(now - t_last, 1e-9)
            metrics = {k: v.item() for k, v in out.items()}
            metrics.update(lr=lr, images_per_s=ips, epoch=epoch)
            if device.type == "cuda":
                metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            log.metrics(metrics, step)
            if rank == 0:
                rate = (step - start) / max(now - t_start, 1e-9)
                eta = (loop.steps - step) / max(rate, 1e-9)
                losses = " ".join(f"{k} {metrics[k]:.4f}" for k in out if k != "grad_norm")
                print(
                    f"[train] step {step}/{loop.steps} {losses} | {ips:.1f} img/s | ETA {eta:.0f}s",
                    flush=True,
                )
            t_last, imgs_since = now, 0
        last = step == loop.steps or step == loop.stop_at_step
        if eval_batch is not None and ((loop.eval_every and step % loop.eval_every == 0) or last):
            model.eval()
            with ema.swapped_in(model):
                metrics, grid = task.evaluate(eval_batch, steps=loop.sample_steps)
            model.train()
            log.metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
            if grid is not None:  # tasks without a decoder at hand have no pictures
                log.image(grid, "samples", step)
            if rank == 0:
                print(
                    f"[eval] step {step} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                    flush=True,
                )
        if step % loop.checkpoint_every == 0 or last:
            _save(step, epoch, index, model, optimizer, ema, run_id, rank)
        if step == loop.stop_at_step:
            if rank == 0:
                print(
                    f"[train] stopping at step {step} as asked (loop.stop_at_step); re-run to resume",
                    flush=True,
                )
            return

    if rank == 0 and graphed is not None:
        print(f"[train] CUDA graph: {graphed.replays} of {step - start} steps replayed", flush=True)
    with ema.swapped_in(model):
        full = full_state_dict(model)
    if rank == 0:
        export_fn(full)
