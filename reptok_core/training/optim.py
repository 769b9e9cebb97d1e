"""The optimisation step shared by every stage, free of Ray: AdamW + warm-up/cosine schedule,
bf16 autocast, gradient clipping, an EMA of the trainable weights, and gradient averaging for
trainable parameters that FSDP does not own (the encoder's `[cls]` embedding)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from reptok_core.config import opt


@dataclass
class OptimConfig:
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = opt(
        0.0, "AdamW weight decay on matrices (not on norms, biases, embeddings of rank 1)"
    )
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    warmup_steps: int = opt(1000, "linear warm-up steps")
    schedule: str = opt(
        "constant", "after warm-up: 'constant' or 'cosine' (down to min_lr_ratio·lr)"
    )
    min_lr_ratio: float = opt(0.1, "cosine floor as a fraction of lr")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    ema_decay: float = opt(
        0.9999, "EMA decay of the trainable weights (EMA weights are evaluated and exported)"
    )


def build_optimizer(
    params: Iterable[nn.Parameter], cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule={cfg.schedule!r}; expected 'constant' or 'cosine'")


class EMA:
    """Exponential moving average of a model's trainable parameters.

    Shadows have the parameters' own type, so under FSDP2 each rank keeps only its shard.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        pairs = [(self.shadow[n], p) for n, p in model.named_parameters() if n in self.shadow]
        if not pairs:
            return
        # One multi-tensor kernel instead of a launch per parameter (hundreds for the mixer);
        # FSDP2 shards are updated through their local tensors.
        shadows = [_local(s) for s, _ in pairs]
        torch._foreach_lerp_(shadows, [_local(p.detach()) for _, p in pairs], 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, v in state.items():
            self.shadow[n].copy_(v)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Temporarily run `model` with the EMA weights (eval, sampling, export)."""
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, v in self.shadow.items():
                params[n].copy_(v)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, v in backup.items():
                    params[n].copy_(v)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def average_replicated_grads(model: nn.Module) -> None:
    """All-reduce (mean) the grads of trainable parameters that are plain tensors.

    FSDP2 reduce-scatters the grads of the parameters it shards; anything left replicated (the
    `[cls]` embedding, kept beside the frozen encoder) would otherwise drift apart per rank.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in model.parameters():
        if p.requires_grad and p.grad is not None and not isinstance(p, DTensor):
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


def autocast(device: torch.device, precision: str, cache: bool = True):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"precision={precision!r}; expected 'bf16' or 'fp32'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[], dict[str, torch.Tensor]],
    *,
    lr: float,
    grad_clip: float,
    device: torch.device,
    precision: str = "bf16",
    ema: EMA | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step; returns the loss dict (detached) plus the pre-clip grad norm."""
    set_lr(optimizer, lr)
    return update(
        model, optimizer, loss_fn, grad_clip=grad_clip, device=device, precision=precision, ema=ema
    )


def update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[], dict[str, torch.Tensor]],
    *,
    grad_clip: float,
    device: torch.device,
    precision: str,
    ema: EMA | None,
    autocast_cache: bool = True,
) -> dict[str, torch.Tensor]:
    """train_step after the learning rate is set: the part a CUDA graph can capture (no host
    syncs when the model is not sharded)."""
    with autocast(device, precision, cache=autocast_cache):
        losses = loss_fn()
    losses["total"].backward()
    average_replicated_grads(model)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = _grad_norm(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model)
    out = {k: v.detach() for k, v in losses.items()}
    out["grad_norm"] = grad_norm
    return out


def _grad_norm(params: list[nn.Parameter], clip: float) -> torch.Tensor:
    """Global grad norm over sharded (DTensor) and replicated grads, clipping when clip > 0."""
    sharded = [p for p in params if isinstance(p, DTensor)]
    plain = [p for p in params if not isinstance(p, DTensor)]
    sq = torch.zeros((), device=params[0].grad.device if params else "cpu")
    if sharded:
        norm = torch.nn.utils.get_total_norm([p.grad for p in sharded])
        sq = sq + (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2
    if plain:
        sq = sq + torch.nn.utils.get_total_norm([p.grad for p in plain]).float() ** 2
    total = sq.sqrt()
    if clip > 0:
        coef = torch.clamp(clip / (total + 1e-6), max=1.0)
        # One multi-tensor kernel per dtype, with the factor kept on the device (no host sync).
        grads: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            grads.setdefault(p.grad.dtype, []).append(_local(p.grad))
        for dtype, group in grads.items():
            torch._foreach_mul_(group, coef.to(dtype))
    return total.detach()
