"""THE training loop of every stage (0: DINO, 1: tokenizer, 2: generator), free of Ray.

A *task* (reptok_core.stages.dino.DinoTask, .tokenizer.TokenizerTask, .generator.GeneratorTask)
supplies the model and what a batch means; this loop supplies everything around it: FSDP2
(task.shard() in a process group), torch.compile, the CUDA-graph step, precision, optimiser and
EMA, sharded checkpoints with resume at (epoch, batch), the fault drill, evaluation and sample
grids, progress lines, stop_at_step / max_minutes, and the export of the EMA weights on rank 0.

Where it differs by environment it talks to three seams, each a small Protocol below:
- CheckpointStore: where checkpoints live (training/checkpoints.FolderCheckpoints; Ray Train's
  storage in pipelines/ray_loop.py);
- MetricSink: where rank 0's metrics and sample grids go (a JSON-lines file in
  training/launch.py; MLflow in pipelines/ray_loop.py);
- BatchSource: this rank's batches, epoch by epoch (formats/images.ImageBatches; the
  task's own `epoch_batches` when none is given; a Ray Dataset shard in pipelines/ray_loop.py).
The caller picks the device (torchrun: LOCAL_RANK -> cuda:N; Ray: ray.train.torch.get_device).
Under python/torchrun, training/launch.train wires the Ray-free seams and calls `run`.

An epoch's batch order must depend only on (seed, epoch, rank), so a resumed run can skip the
batches it already took.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from reptok_core import storage
from reptok_core.config import Switch, opt
from reptok_core.device import Precision, resolve_precision
from reptok_core.training import cuda_graph_step
from reptok_core.training.checkpoints import FRESH, read_checkpoint, write_checkpoint
from reptok_core.training.distributed import full_state_dict, is_distributed, world
from reptok_core.training.optim import EMA, OptimConfig, build_optimizer, lr_at, train_step


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
    max_minutes: float = opt(
        0, "stop cleanly after this many minutes of training (0 = no limit); a re-run resumes"
    )
    kill_worker_at_step: int = opt(
        0, "fault drill: rank 1 (or 0) dies once at this step; FailureConfig restarts"
    )


class Task(Protocol):
    """What the loop needs of a stage. Optional: `capture_safe` (bool: the loss may be captured
    as a CUDA graph), `after_step(step)` (work after each optimiser step: stage 0's teacher EMA),
    `epoch_batches(epoch, batch_size, seed)` (the task's own batches, used when no BatchSource
    is given)."""

    model: torch.nn.Module

    def shard(self) -> None: ...  # fully_shard the model (called in a process group only)

    def blocks(self) -> list[torch.nn.Module]: ...  # what loop.compile compiles

    def loss(self, batch: dict[str, Any], flip: bool = True) -> dict[str, torch.Tensor]: ...

    def evaluate(
        self, batch: dict[str, Any], steps: int
    ) -> tuple[dict[str, float], np.ndarray | None]: ...  # metrics, sample grid (or None)


class CheckpointStore(Protocol):
    def saving(self, step: int) -> AbstractContextManager[str]:
        """A local folder for this rank's part of step `step`'s checkpoint (every rank enters);
        on exit the store makes the checkpoint durable, all or nothing."""
        ...

    def latest(self) -> AbstractContextManager[str | None]:
        """The newest complete checkpoint as a local folder, or None to start fresh."""
        ...


class MetricSink(Protocol):
    """Called on rank 0 only."""

    def metrics(self, values: dict[str, float], step: int) -> None: ...

    def image(self, image: np.ndarray, key: str, step: int) -> None: ...


class BatchSource(Protocol):
    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """This rank's batches of one epoch, in an order fixed by (seed, epoch, rank)."""
        ...


class TaskBatches:
    """The task's own batches (stage 2 holds or streams its token set itself)."""

    def __init__(self, task: Any, batch_size: int, seed: int):
        if not hasattr(task, "epoch_batches"):
            raise TypeError(
                f"{type(task).__name__} has no epoch_batches: give the loop a BatchSource"
            )
        self.task, self.batch_size, self.seed = task, batch_size, seed

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        return self.task.epoch_batches(epoch, self.batch_size, self.seed)


def _epochs(source: BatchSource, start_epoch: int, skip: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, index in epoch, batch) forever, skipping `skip` batches of the first epoch on resume."""
    epoch = start_epoch
    while True:
        for i, batch in enumerate(source.epoch(epoch)):
            if epoch == start_epoch and i < skip:
                continue
            yield epoch, i, batch
        epoch += 1
        skip = 0


def _maybe_die(cfg: LoopConfig, step: int, rank: int, marker_dir: str) -> None:
    """Fault drill for the restart tests: one worker process exits hard, exactly once."""
    if cfg.kill_worker_at_step <= 0 or step != cfg.kill_worker_at_step:
        return
    if not marker_dir:
        raise ValueError("loop.kill_worker_at_step needs the run's folder (run_dir) for its marker")
    victim = 1 if world()[1] > 1 else 0
    marker = storage.join(marker_dir, "killed_once")
    if rank == victim and not storage.exists(marker):
        storage.write_bytes_atomic(marker, b"1")
        print(f"[fault drill] rank {rank} exits at step {step}", flush=True)
        os._exit(1)


def _out_of_time(cfg: LoopConfig, step: int, t_start: float, device: torch.device) -> bool:
    """Whether loop.max_minutes is spent. Checked on log steps only, and rank 0's clock decides
    for every rank: ranks that disagreed would wait on each other's checkpoint forever."""
    if cfg.max_minutes <= 0 or step % cfg.log_every:
        return False
    late = torch.tensor(float(time.time() - t_start > cfg.max_minutes * 60), device=device)
    if is_distributed():
        torch.distributed.broadcast(late, 0)
    return bool(late.item())


def run(
    make_task: Callable[[torch.device], Task],
    loop: LoopConfig,
    optim: OptimConfig,
    *,
    device: torch.device,
    checkpoints: CheckpointStore,
    metrics: MetricSink,
    batches: BatchSource | None = None,
    eval_batch: dict[str, Any] | None = None,
    export: Callable[[dict[str, torch.Tensor]], None] | None = None,
    run_dir: str = "",
    checkpoint_meta: dict[str, Any] | None = None,
) -> None:
    """Train `make_task(device)` to loop.steps (or loop.stop_at_step / max_minutes), resuming
    from the newest checkpoint; then `export(full EMA state dict)` on rank 0. Call on every rank.

    batches: None = the task's own `epoch_batches`. eval_batch: the fixed held-out batch
    (None = no evaluation). run_dir: the run's folder (local or s3://), where the fault drill
    leaves its marker. checkpoint_meta: extra fields for every checkpoint's trainer_state.json.
    """
    rank, world_size = world()
    # One initialisation on every rank: replicated parameters (stage 0's student, frozen random
    # encoders) must agree, and a checkpoint keeps only one copy of them. Then each rank draws
    # its own flips and noise.
    torch.manual_seed(loop.seed)
    task = make_task(device)
    torch.manual_seed(loop.seed + rank)
    np.random.seed(loop.seed + rank)
    random.seed(loop.seed + rank)
    model = task.model
    if is_distributed():
        task.shard()
    if loop.compile:
        for block in task.blocks():
            block.compile()
    precision = resolve_precision(loop.precision, device, "loop.precision")
    optimizer = build_optimizer(model.parameters(), optim, device)
    ema = EMA(model, optim.ema_decay)
    with checkpoints.latest() as folder:
        state = FRESH if folder is None else read_checkpoint(folder, model, optimizer, ema)
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
    if start and rank == 0:
        metrics.metrics({"resumed_from_step": start}, start)
    if rank == 0:
        print(
            f"[train] {'resuming at step ' + str(start) if start else 'starting'}; world {world_size}, "
            f"device {device}, precision {precision}, "
            f"step {'captured as a CUDA graph' if graphed is not None else 'eager'}",
            flush=True,
        )

    source = batches if batches is not None else TaskBatches(task, loop.batch_size, loop.seed)
    if eval_batch is not None:
        eval_batch = {k: torch.as_tensor(v) for k, v in eval_batch.items()}
    stream = _epochs(source, state["epoch"], state["batch_in_epoch"])
    # Optional task hook, called with the number of finished steps after each optimiser step.
    after_step = getattr(task, "after_step", None)
    t_last, imgs_since = time.time(), 0
    t_start = time.time()
    epoch, index = state["epoch"], state["batch_in_epoch"] - 1
    step = start
    model.train()
    while step < loop.steps:
        epoch, index, batch = next(stream)
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
            values = {k: v.item() for k, v in out.items()}
            values.update(lr=lr, images_per_s=ips, epoch=epoch)
            if device.type == "cuda":
                values["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if rank == 0:
                metrics.metrics(values, step)
                rate = (step - start) / max(now - t_start, 1e-9)
                eta = (loop.steps - step) / max(rate, 1e-9)
                losses = " ".join(f"{k} {values[k]:.4f}" for k in out if k != "grad_norm")
                print(
                    f"[train] step {step}/{loop.steps} {losses} | {ips:.1f} img/s | ETA {eta:.0f}s",
                    flush=True,
                )
            t_last, imgs_since = now, 0
        stop = step == loop.stop_at_step or _out_of_time(loop, step, t_start, device)
        last = step == loop.steps or stop
        if eval_batch is not None and ((loop.eval_every and step % loop.eval_every == 0) or last):
            model.eval()
            with ema.swapped_in(model):
                scores, grid = task.evaluate(eval_batch, steps=loop.sample_steps)
            model.train()
            if rank == 0:
                metrics.metrics({f"eval/{k}": v for k, v in scores.items()}, step)
                if grid is not None:  # tasks without a decoder at hand have no pictures
                    metrics.image(grid, "samples", step)
                print(
                    f"[eval] step {step} " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()),
                    flush=True,
                )
        if step % loop.checkpoint_every == 0 or last:
            trainer_state = {"step": step, "epoch": epoch, "batch_in_epoch": index + 1}
            with checkpoints.saving(step) as folder:
                write_checkpoint(
                    folder, model, optimizer, ema, {**trainer_state, **(checkpoint_meta or {})}
                )
        if stop and step < loop.steps:
            if rank == 0:
                print(
                    f"[train] stopping at step {step} as asked (loop.stop_at_step / "
                    "loop.max_minutes); re-run to resume",
                    flush=True,
                )
            return

    if rank == 0 and graphed is not None:
        print(f"[train] CUDA graph: {graphed.replays} of {step - start} steps replayed", flush=True)
    with ema.swapped_in(model):
        full = full_state_dict(model)
    if rank == 0 and export is not None:
        export(full)
