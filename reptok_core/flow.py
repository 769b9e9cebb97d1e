"""Rectified flow: the interpolation path, its velocity target, the loss, and ODE samplers.

Convention (as in the paper): x_t = (1 - t) * x + t * eps, so t = 0 is data and t = 1 is noise;
the network predicts v = eps - x, and sampling integrates dx/dt = v from t = 1 down to t = 0.
The math lives here, apart from any network (as SiT keeps `transport/` apart from its models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from reptok_core.config import opt

# velocity_fn(x_t, t) -> v; t is a (B,) tensor.
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Point on the straight path between data `x` (t=0) and `noise` (t=1)."""
    t = _expand(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x


def sample_t(
    n: int,
    kind: str = "logit_normal",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training times in (0, 1): `uniform` or `logit_normal` (sigmoid of N(mean, std))."""
    if kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    raise ValueError(f"unknown t sampler {kind!r}; expected 'uniform' or 'logit_normal'")


@dataclass
class FlowConfig:
    t_sampler: str = opt(
        "logit_normal", "training-time sampler: 'logit_normal' (the paper) or 'uniform'"
    )
    t_mean: float = opt(0.0, "logit-normal location")
    t_std: float = opt(1.0, "logit-normal scale")


def flow_loss(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    cfg: FlowConfig | None = None,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """MSE between the predicted and the true velocity at random (or given) t and noise.

    With `reduce=False` returns the per-sample loss (B,), used by segment-wise validation.
    """
    cfg = cfg or FlowConfig()
    if t is None:
        t = sample_t(x.shape[0], cfg.t_sampler, mean=cfg.t_mean, std=cfg.t_std, device=x.device)
    if noise is None:
        noise = torch.randn_like(x)
    v = velocity_fn(interpolate(x, noise, t), t)
    per_sample = (v.float() - velocity_target(x, noise).float()).pow(2).flatten(1).mean(1)
    return per_sample.mean() if reduce else per_sample


@torch.no_grad()
def validation_loss(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    segments: int = 8,
    seed: int = 0,
) -> torch.Tensor:
    """Flow loss averaged over `segments` fixed t-values (segment midpoints) with seeded noise.

    The training loss is noisy because t and eps are random; fixing both makes validation
    curves comparable between steps and runs. Returns a (segments,) tensor; `.mean()` is the
    usual single number.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    losses = []
    for i in range(segments):
        t_val = (i + 0.5) / segments
        noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        t = torch.full((x.shape[0],), t_val, device=x.device)
        losses.append(flow_loss(velocity_fn, x, t=t, noise=noise))
    return torch.stack(losses)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance for `sample`: v_u + scale (v_c - v_u) while t is inside
    `interval` (the paper: 1.5 on [0.3, 0.9]); elsewhere, and at scale 1, only the conditional
    velocity is computed. `branches(x, t)` returns (v_c, v_u), e.g. from one forward of the
    doubled batch.

    `sample` decides this per step on the host from its time grid: the loop then has no
    device-to-host syncs, so a CUDA graph can hold it (reptok_core/graph_cache.py).
    """

    branches: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    scale: float
    interval: tuple[float, float] = (0.0, 1.0)

    @cached_property
    def _bounds(self) -> tuple[float, float]:
        # In fp32, the grid's own precision: a bound such as 0.8 rounds up in fp32 and must
        # still include the grid point 0.8.
        lo, hi = torch.tensor(self.interval, dtype=torch.float32).tolist()
        return lo, hi

    def active(self, t: float) -> bool:
        lo, hi = self._bounds
        return self.scale != 1.0 and lo <= t <= hi

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c, v_u = self.branches(x, t)
        return v_u + self.scale * (v_c - v_u)


def time_grid(steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    steps: int = 50,
    method: str = "euler",
    guidance: Guidance | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = v from t=1 (noise) to t=0 (data) with Euler or Heun steps."""
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown sampler {method!r}; expected 'euler' or 'heun'")
    ts = time_grid(steps).tolist()  # on the host: no per-step syncs
    b = noise.shape[0]

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        t_b = torch.full((b,), t, device=x.device)
        if guidance is not None and guidance.active(t):
            return guidance.velocity(x, t_b)
        return velocity_fn(x, t_b)

    x = noise
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = velocity(x, t)
        x_euler = x + dt * v
        if method == "heun" and i < steps - 1:
            x = x + dt * 0.5 * (v + velocity(x_euler, t_next))
        else:
            x = x_euler
    return x
