import math

import pytest
import torch

from reptok_core import flow


def gaussian_velocity(mu: float, sigma: float):
    """Exact E[eps - x | x_t] for data x ~ N(mu, sigma²) on the path x_t = (1-t)x + t eps."""

    def v(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = (1 - t)[:, None], t[:, None]
        var = a**2 * sigma**2 + b**2
        return (b - a * sigma**2) * (x_t - a * mu) / var - mu

    return v


@pytest.mark.parametrize("method,steps,tol", [("euler", 200, 0.03), ("heun", 40, 0.01)])
def test_sampling_exact_velocity_recovers_gaussian(method, steps, tol):
    mu, sigma = 1.5, 0.4
    noise = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = flow.sample(gaussian_velocity(mu, sigma), noise, steps=steps, method=method)
    assert abs(x.mean().item() - mu) < tol
    assert abs(x.std().item() - sigma) < tol


def test_heun_beats_euler_at_equal_steps():
    mu, sigma = 1.5, 0.4
    noise = torch.randn(50_000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = gaussian_velocity(mu, sigma)
    err = {m: abs(flow.sample(v, noise, 10, m).std().item() - sigma) for m in ("euler", "heun")}
    assert err["heun"] < err["euler"]


def test_path_and_target():
    x, eps = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([0.0, 1.0, 0.5, 0.25])
    xt = flow.interpolate(x, eps, t)
    assert torch.allclose(xt[0], x[0]) and torch.allclose(xt[1], eps[1])
    assert torch.allclose(xt[2], 0.5 * x[2] + 0.5 * eps[2])
    assert torch.allclose(flow.velocity_target(x, eps), eps - x)


def test_flow_loss_closed_forms():
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 2.0
    eps = torch.randn(1000, 8, generator=torch.Generator().manual_seed(1))
    t = torch.rand(1000)
    # The zero predictor's loss is E[(eps - x)^2] exactly.
    zero = flow.flow_loss(lambda xt, tt: torch.zeros_like(xt), x, t=t, noise=eps)
    assert torch.isclose(zero, (eps - x).pow(2).mean(), rtol=1e-5)
    # The oracle that knows (x, eps) has zero loss.
    oracle = flow.flow_loss(lambda xt, tt: eps - x, x, t=t, noise=eps)
    assert oracle.item() == 0.0


def test_t_samplers():
    u = flow.sample_t(100_000, "uniform")
    ln = flow.sample_t(100_000, "logit_normal")
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    logits = torch.log(ln / (1 - ln))
    assert abs(logits.mean()) < 0.02 and abs(logits.std() - 1) < 0.02
    with pytest.raises(ValueError, match="t sampler"):
        flow.sample_t(3, "beta")


def test_guidance_scale_one_is_conditional_and_interval_respected():
    cond = lambda x, t: torch.ones_like(x)  # noqa: E731
    calls = []
    uncond = lambda x, t: calls.append(t[0].item()) or -torch.ones_like(x)  # noqa: E731
    x = torch.zeros(3, 2)
    plain = flow.sample(cond, x, steps=10)
    assert torch.allclose(plain, torch.full_like(x, -1.0))  # 10 steps of dt = -0.1, v = 1

    def branches(x, t):
        return cond(x, t), uncond(x, t)

    same = flow.sample(cond, x, steps=10, guidance=flow.Guidance(branches, 1.0, (0.15, 0.45)))
    assert torch.equal(same, plain) and not calls  # scale 1: the unconditional branch never runs
    g = flow.sample(cond, x, steps=10, guidance=flow.Guidance(branches, 2.0, (0.15, 0.45)))
    # The interval is in the generator's time s = 1 - t (0 = noise): s = 0.2, 0.3, 0.4 are
    # inside, i.e. t = 0.8, 0.7, 0.6 (3 steps): u + s (c - u) = -1 + 2 * 2 = 3; the other 7: 1
    assert calls == pytest.approx([0.8, 0.7, 0.6])
    assert torch.allclose(g, torch.full_like(x, -0.1 * (3 * 3 + 7 * 1)))


def test_validation_loss_is_deterministic_and_segmented():
    v = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x = torch.randn(16, 4)
    a, b = (
        flow.validation_loss(v, x, segments=4, seed=3),
        flow.validation_loss(v, x, segments=4, seed=3),
    )
    assert a.shape == (4,) and torch.equal(a, b)
    assert not math.isnan(a.mean().item())


def test_sampler_validates_arguments():
    with pytest.raises(ValueError, match="steps"):
        flow.sample(lambda x, t: x, torch.zeros(1, 1), steps=0)
    with pytest.raises(ValueError, match="sampler"):
        flow.sample(lambda x, t: x, torch.zeros(1, 1), steps=2, method="rk4")


@pytest.mark.parametrize("interval", [(0.2, 0.8), (0.3, 0.9), (0.4, 0.6), (0.0, 1.0)])
def test_guidance_interval_is_decided_like_the_official_sampler(interval):
    # The official generate_with_cfg_interval walks s = linspace(0, 1, n + 1) (fp32, 0 = noise)
    # and guides unless s < lo or s > hi, a 0-dim fp32 tensor against Python floats.
    g = flow.Guidance(lambda x, t: x, 2.0, interval)
    lo, hi = interval
    for steps in (10, 25, 50, 100, 250):
        official = [not (s < lo or s > hi) for s in torch.linspace(0, 1, steps + 1)]
        assert g.guided(steps) == official
    # The grid points line up: t_i = 1 - s_i.
    assert torch.allclose(flow.time_grid(50), 1 - torch.linspace(0, 1, 51), atol=1e-7)
    # Both bounds are inclusive: at 10 steps s = 0.3 ... 0.9 are 7 guided points (3 .. 9).
    assert flow.Guidance(None, 1.5, (0.3, 0.9)).guided(10) == [False] * 3 + [True] * 7 + [False]
    assert flow.Guidance(None, 1.0, (0.3, 0.9)).guided(10) == [False] * 11


def test_guidance_interval_is_checked():
    with pytest.raises(ValueError, match="CFG interval"):
        flow.Guidance(None, 1.5, (0.9, 0.3)).guided(10)
