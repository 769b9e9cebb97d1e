"""Rectified flow: the interpolation path, its velocity target, the loss, and ODE samplers.

The math lives here, apart from any network (as SiT keeps `transport/` apart from its models).
This docstring is THE place where the project's conventions are written down; config help and
model docstrings point here.

Time and velocity
  - Here, in every loss and sampler: x_t = (1 - t) x + t eps, so t = 0 is data and t = 1 is
    noise; the target velocity is v = eps - x; sampling integrates dx/dt = v from t = 1 down to
    t = 0 on the grid linspace(1, 0, steps + 1). The decoder's network uses this t directly, as
    the official RepTok decoder does (its own loop also runs t = 1 -> 0).
  - The generators' networks (mixer.MixerGenerator, text_generator.TextGenerator) run the
    official RepTok GENERATOR's convention inside: time s = 1 - t (s = 0 is noise, s = 1 data),
    prediction u = x - eps = -v. Their `forward(z_t, t, ...)` takes this module's t and returns
    its v (they feed 1 - t to the time embedding and negate their output), so everything outside
    the networks stays in one convention, and official mixer weights work unchanged.
  - Training times: t = sigmoid(N(t_mean, t_std)) (the paper: N(0, 1), symmetric, so s = 1 - t
    has the same law) or uniform.

Classifier-free guidance (`Guidance`)
  - Guided velocity v_u + scale (v_c - v_u), v_c conditional, v_u with the null class / null
    text (the same formula in either sign convention: it is affine in the outputs).
  - The interval [lo, hi] is in the GENERATOR's time s (0 = noise), as in the paper and the
    official code: the paper's 1.5 on [0.3, 0.9] guides s in [0.3, 0.9], i.e. t in [0.1, 0.7].
    Both bounds are inclusive. Step i (grid point t_i = 1 - s_i) is guided iff scale != 1 and
    float32(lo) <= s_i <= float32(hi) with s_i = linspace(0, 1, steps + 1)[i] in float32: the
    official sampler's own grid and comparison (`FlowModel.generate_with_cfg_interval`), so the
    boundary steps are decided the same way (at 50 steps float32 puts s_15 just below 0.3:
    steps 16..45 are guided, 30 of 50). Outside the interval, and at scale 1, the
    CONDITIONAL velocity alone is used (as there: cfg_scale 1 with the real labels).

Token scaling (what the generators model; reptok_core/formats/token_stats.TokenNormalizer)
  - Per dimension (the default): (z - mean_d) / std_d, the token Parquet manifest's statistics.
  - The official scalar: z / scale_factor (its first stage divides tokens by `scale_factor` on
    encode and multiplies on decode), held as mean 0 and std = scale_factor in every dimension
    (`TokenNormalizer.scalar`; GeneratorConfig.token_scale > 0 picks it for training).
  - Exports store the normaliser's mean and std vectors either way; sampling starts from
    N(0, I) in the normalised space and returns denormalised tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

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
    """Classifier-free guidance for `sample`: v_u + scale (v_c - v_u) at the steps whose
    generator time s = 1 - t lies in `interval` (bounds inclusive; the paper: 1.5 on
    [0.3, 0.9]); elsewhere, and at scale 1, only the conditional velocity is computed (module
    docstring). `branches(x, t)` returns (v_c, v_u), e.g. from one forward of the doubled batch.

    `sample` takes the decisions for its whole time grid up front on the host: the loop then
    has no device-to-host syncs, so a CUDA graph can hold it (reptok_core/serving/graph_cache.py).
    """

    branches: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    scale: float
    interval: tuple[float, float] = (0.0, 1.0)

    def guided(self, steps: int) -> list[bool]:
        """For each point of `time_grid(steps)`: whether the velocity there is guided."""
        return list(guided_points(self.scale, tuple(self.interval), steps))

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c, v_u = self.branches(x, t)
        return v_u + self.scale * (v_c - v_u)


@lru_cache(maxsize=64)
def guided_points(scale: float, interval: tuple[float, float], steps: int) -> tuple[bool, ...]:
    """Guidance decisions on the points of `time_grid(steps)`, decided as the official sampler
    does: its grid s = linspace(0, 1, steps + 1) in float32 against float32 bounds, inclusive."""
    lo, hi = interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"CFG interval {list(interval)} must satisfy 0 <= lo <= hi <= 1")
    if scale == 1.0:
        return (False,) * (steps + 1)
    s = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32)
    lo_32, hi_32 = torch.tensor(interval, dtype=torch.float32)
    return tuple(((s >= lo_32) & (s <= hi_32)).tolist())


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
    guided = guidance.guided(steps) if guidance is not None else [False] * (steps + 1)
    b = noise.shape[0]

    def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        t_b = torch.full((b,), ts[i], device=x.device)
        if guided[i]:
            return guidance.velocity(x, t_b)
        return velocity_fn(x, t_b)

    x = noise
    for i in range(steps):
        dt = ts[i + 1] - ts[i]
        v = velocity(x, i)
        x_euler = x + dt * v
        if method == "heun" and i < steps - 1:
            x = x + dt * 0.5 * (v + velocity(x_euler, i + 1))
        else:
            x = x_euler
    return x
