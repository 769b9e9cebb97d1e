"""The stage-2 generator: its config, the model it builds (class-conditional MLP-Mixer or
text-conditioned), and sampling tokens from it with classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reptok_core import flow
from reptok_core.config import opt, section
from reptok_core.formats.token_stats import TokenNormalizer
from reptok_core.models.mixer import MixerConfig, MixerGenerator
from reptok_core.models.text_generator import TextGenerator, TextGeneratorConfig

KINDS = ("class", "text")


@dataclass
class GeneratorConfig:
    kind: str = opt(
        "class", "'class' (MLP-Mixer over class labels) or 'text' (caption-conditioned)"
    )
    mixer: MixerConfig = section(MixerConfig, "class-conditional MLP-Mixer (kind=class)")
    text: TextGeneratorConfig = section(TextGeneratorConfig, "text-conditioned model (kind=text)")
    flow: flow.FlowConfig = section(flow.FlowConfig, "training-time t distribution")
    cfg_scale: float = opt(1.5, "classifier-free guidance scale for evaluation samples (1 = off)")
    cfg_interval: list[float] = opt(
        [0.3, 0.9],
        "[lo, hi] where CFG is applied, inclusive, in the GENERATOR's time s = 1 - t (s = 0 is "
        "noise), as the paper's and the official code's [0.3, 0.9] (reptok_core/flow.py)",
    )
    token_scale: float = opt(
        0.0,
        "token normalisation: 0 = per-dimension mean/std of the token manifest; > 0 = the "
        "official scalar, tokens divided by this `scale_factor` (reptok_core/flow.py)",
    )


def build_model(
    cfg: GeneratorConfig, token_dim: int, text_dim: int | None = None
) -> torch.nn.Module:
    """The generator for tokens of `token_dim` (from the token manifest, or an export's
    recorded sizes); a text generator also needs `text_dim`, the caption states' width."""
    if cfg.kind == "class":
        return MixerGenerator(cfg.mixer, token_dim)
    if cfg.kind == "text":
        if text_dim is None:
            raise ValueError("a text generator needs text_dim (the caption encoder's hidden size)")
        return TextGenerator(cfg.text, token_dim, text_dim)
    raise ValueError(f"generator kind {cfg.kind!r}; expected one of {KINDS}")


@torch.no_grad()
def sample_tokens(
    model: torch.nn.Module,
    normalizer: TokenNormalizer,
    *,
    labels: torch.Tensor | None = None,
    text: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    steps: int = 50,
    seed: int | None = 0,
    method: str = "euler",
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate one token per condition; returns denormalised tokens (B, D).

    Give `labels` (B,) for a MixerGenerator (use `model.null_class` for unconditional samples)
    or `text=(states (B, L, E), mask (B, L))` for a TextGenerator. CFG with `scale` is applied
    only where the generator time s = 1 - t is in `interval` (the paper: 1.5 on [0.3, 0.9];
    reptok_core/flow.py). The same seed gives the same tokens;
    `noise` (B, D), when given, replaces `seeded_token_noise(B, normalizer, seed)`.
    """
    p = next(model.parameters())
    device = p.device
    if (labels is None) == (text is None):
        raise ValueError("sample_tokens needs exactly one of labels= or text=")
    # Guided steps run the conditional and unconditional branches as one doubled batch: half
    # the launches of two forwards (what limits small-batch sampling), same per-row math.
    if labels is not None:
        y = torch.as_tensor(labels, device=device).long()
        b = y.shape[0]
        y2 = torch.cat([y, torch.full_like(y, model.null_class)])

        def cond(x, t):
            return model(x, t, y)

        def both(x, t):
            return model(torch.cat([x, x]), torch.cat([t, t]), y2)
    else:
        states, mask = (v.to(device) for v in text)
        b = states.shape[0]
        states2, mask2 = torch.cat([states, states]), torch.cat([mask, mask])
        null2 = torch.arange(2 * b, device=device) >= b  # the second half sees the null text

        def cond(x, t):
            return model(x, t, states, mask)

        def both(x, t):
            return model(torch.cat([x, x]), torch.cat([t, t]), states2, mask2, null=null2)

    if noise is None:
        noise = seeded_token_noise(b, normalizer, seed)
    # The ODE state stays fp32 even when the weights are bf16: 50 Euler steps in bf16 drift.
    noise = noise.to(device, torch.float32)
    guidance = flow.Guidance(
        lambda x, t: both(x.to(p.dtype), t).float().chunk(2), scale, tuple(interval)
    )
    z = flow.sample(lambda x, t: cond(x.to(p.dtype), t).float(), noise, steps, method, guidance)
    return normalizer.to(device).denormalize(z.float())


def seeded_token_noise(n: int, normalizer: TokenNormalizer, seed: int | None) -> torch.Tensor:
    """The starting noise `sample_tokens(seed=seed)` draws for n tokens: float32 randn from a
    seeded CPU generator, so it is the same on every device."""
    gen = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((n, normalizer.mean.numel()), generator=gen)
