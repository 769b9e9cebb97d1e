"""The training step captured once as a CUDA graph and replayed.

Why: the stage-2 mixer's step is bound by kernel launches, not by the GPU. At batch 1024 on an
H200 an eager step spends 82 ms on the host for 32 ms of GPU work; a replay is one launch
(benchmarks/NOTES.md). Capture needs a single process (FSDP2's hooks and collectives do not
capture), fixed shapes and a loss without host syncs; the generator tasks qualify.

How: the first `warmup` steps of a batch shape run eagerly on a side stream (lazy initialisation, optimiser
state, cuBLAS workspaces), then one step is captured and every later step copies its batch into
the captured input buffers, writes the learning rate into the tensor the fused AdamW reads, and
replays. Capture executes nothing, so the captured step is replayed at once: no step is lost or
repeated. A batch with other shapes (or non-numeric fields) runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from reptok_core.config import Switch, choice
from reptok_core.training.optim import EMA, set_lr, update


def resolve(
    setting: Switch | str, device: torch.device, distributed: bool, capturable: bool
) -> bool:
    """`loop.cuda_graph` (a Switch) -> whether to capture the step."""
    setting = choice(Switch, setting, "loop.cuda_graph")
    possible = device.type == "cuda" and not distributed and capturable
    if setting is Switch.ON and not possible:
        raise ValueError(
            "loop.cuda_graph=on needs one CUDA worker (no FSDP sharding) and a task whose loss "
            f"is capture-safe; here device={device}, distributed={distributed}, "
            f"task capture-safe={capturable}. Use loop.cuda_graph=auto or off."
        )
    return setting.decide(possible)


def _signature(batch: dict[str, Any]) -> tuple | None:
    sig = []
    for k, v in sorted(batch.items()):
        if not isinstance(v, (torch.Tensor, np.ndarray)) or v.dtype == object:
            return None
        sig.append((k, tuple(v.shape), str(v.dtype)))
    return tuple(sig)


class CudaGraphStep:
    """`step(batch, lr)` with the semantics of `training.train_step(model, optimizer,
    lambda: loss_fn(batch), ...)`; returns the loss dict and the grad norm (fresh tensors)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
        *,
        grad_clip: float,
        device: torch.device,
        precision: str,
        ema: EMA | None,
        warmup: int = 3,
    ):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.kw = dict(grad_clip=grad_clip, device=device, precision=precision, ema=ema)
        self.device, self.warmup = device, warmup
        self.side = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.signature: tuple | None = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.lrs = [torch.zeros((), device=device) for _ in optimizer.param_groups]
        self.eager_steps: dict[tuple | None, int] = {}  # per batch signature
        self.replays = 0

    def __call__(self, batch: dict[str, Any], lr: float) -> dict[str, torch.Tensor]:
        sig = _signature(batch)
        if self.graph is not None and sig == self.signature:
            return self._replay(batch, lr)
        # Capture a shape only after it ran eagerly: its compiled blocks and lazily created
        # state exist then, and nothing has to compile inside the capture.
        if self.graph is None and sig is not None and self.eager_steps.get(sig, 0) >= self.warmup:
            self._capture(batch, sig)
            return self._replay(batch, lr)
        return self._eager(batch, sig, lr)

    def _eager(
        self, batch: dict[str, Any], sig: tuple | None, lr: float
    ) -> dict[str, torch.Tensor]:
        set_lr(self.optimizer, lr)
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            # The same autocast settings as the capture: compiled blocks guard on them, and a
            # recompilation inside the capture would invalidate it.
            out = update(
                self.model,
                self.optimizer,
                lambda: self.loss_fn(batch),
                autocast_cache=False,
                **self.kw,
            )
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        self.eager_steps[sig] = self.eager_steps.get(sig, 0) + 1
        return out

    def _capture(self, batch: dict[str, Any], sig: tuple) -> None:
        self.signature = sig
        self.inputs = {k: torch.as_tensor(v).to(self.device) for k, v in batch.items()}
        groups = self.optimizer.param_groups
        saved = [(g["lr"], g["capturable"]) for g in groups]
        # The fused AdamW reads a tensor lr from device memory at replay time; a float would be
        # baked into the graph. The groups get their floats back after the capture, so
        # checkpoints and eager steps see the usual optimiser.
        for g, lr in zip(groups, self.lrs, strict=True):
            g["lr"], g["capturable"] = lr, True
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.outputs = update(
                    self.model,
                    self.optimizer,
                    lambda: self.loss_fn(self.inputs),
                    autocast_cache=False,
                    **self.kw,
                )
        except Exception as e:
            raise RuntimeError(
                "capturing the training step as a CUDA graph failed (the loss or a compiled "
                "block did something a graph cannot hold); run with loop.cuda_graph=off"
            ) from e
        finally:
            for g, (lr, cap) in zip(groups, saved, strict=True):
                g["lr"], g["capturable"] = lr, cap

    def _replay(self, batch: dict[str, Any], lr: float) -> dict[str, torch.Tensor]:
        # Non-blocking keeps the host ahead of the GPU; safe as long as the data source does not
        # refill a pinned buffer it already handed out (NumPy / pageable batches never do).
        for k, v in batch.items():
            self.inputs[k].copy_(torch.as_tensor(v), non_blocking=True)
        set_lr(self.optimizer, lr)
        for t in self.lrs:
            t.fill_(lr)
        self.graph.replay()
        self.replays += 1
        return {k: v.clone() for k, v in self.outputs.items()}
