"""The stage-2 generator: its config, the two ways it is conditioned (class labels for the
MLP-Mixer, caption states for the text model), and sampling tokens with classifier-free guidance.

Everything that differs between class- and text-conditioned generation lives in one
`Conditioning` per kind, looked up once from `GeneratorConfig.kind` (`conditioning(cfg)`);
training, export, evaluation and serving call it instead of asking which kind they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reptok_core import flow
from reptok_core.config import opt, section
from reptok_core.formats.token_stats import TokenNormalizer
from reptok_core.formats.tokens import caption_index
from reptok_core.models.mixer import MixerConfig, MixerGenerator
from reptok_core.models.text_generator import TextGenerator, TextGeneratorConfig


@dataclass
class GeneratorConfig:
    kind: str = opt(
        "class", "'class' (MLP-Mixer over class labels) or 'text' (caption-conditioned)"
    )
    mixer: MixerConfig = section(MixerConfig, "class-conditional MLP-Mixer (kind=class)")
    text: TextGeneratorConfig = section(TextGeneratorConfig, "text-conditioned model (kind=text)")
    flow: flow.FlowConfig = section(flow.FlowConfig, "training-time t distribution")
    guidance_scale: float = opt(
        1.5, "classifier-free guidance scale for evaluation samples and serving (1 = off)"
    )
    guidance_interval: list[float] = opt(
        [0.3, 0.9],
        "[lo, hi] where classifier-free guidance is applied, inclusive, in the GENERATOR's time "
        "s = 1 - t (s = 0 is noise), as the paper's and the official code's [0.3, 0.9] "
        "(reptok_core/flow.py)",
    )
    token_scale: float = opt(
        0.0,
        "token normalisation: 0 = per-dimension mean/std of the token manifest; > 0 = the "
        "official scalar, tokens divided by this `scale_factor` (reptok_core/flow.py)",
    )


# A condition is what a batch of samples is conditioned on, rows first: class labels (B,) for
# the mixer, (caption states (B, L, E), mask (B, L)) for the text model. `parts` is it as a tuple
# of tensors (what a CUDA graph takes as inputs), `joined` the way back.
Condition = Any


class Conditioning:
    """What class- and text-conditioned generation differ in (one instance per kind)."""

    kind: str
    keyword: str  # sample_tokens' argument for this kind's condition
    uses_captions: bool  # trains on the caption cache of the token Parquet

    def model_config(self, cfg: GeneratorConfig) -> Any:
        raise NotImplementedError

    def build(self, cfg: GeneratorConfig, token_dim: int, text_dim: int | None) -> torch.nn.Module:
        raise NotImplementedError

    def sizes(self, manifest: dict[str, Any], captions: dict[str, Any] | None) -> dict[str, int]:
        """The model's data-given sizes (`build_model`'s token_dim, text_dim) from the token
        manifest and its caption cache."""
        return {"token_dim": manifest["dim"]}

    def num_classes(self, cfg: GeneratorConfig) -> int | None:
        """Classes it generates (what class-balanced samples and gFID need); None for text."""
        return None

    def check_tokens(self, cfg: GeneratorConfig, manifest: dict[str, Any], source: str) -> None:
        """ValueError, naming `source`, when the token Parquet's manifest cannot train it."""

    def condition_column(
        self, rows: dict[str, Any], captions: list[str] | None
    ) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def batch_arrays(
        self, rows: dict[str, Any], captions: list[str] | None
    ) -> dict[str, np.ndarray]:
        """Loaded token rows -> the numeric batch a GeneratorTask reads: `token`, `token_flip`
        when encoded, and each row's condition (`label`, or `caption_idx` into `captions`)."""
        out = {"token": rows["token"]}
        if "token_flip" in rows:
            out["token_flip"] = rows["token_flip"]
        return {**out, **self.condition_column(rows, captions)}

    def condition(self, batch: dict[str, Any], captions: Any, device: torch.device) -> Condition:
        """A batch's condition on `device`; `captions` = (states (U, L, E), mask) of the cache."""
        raise NotImplementedError

    def parts(self, condition: Condition, device: torch.device) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def joined(self, parts: tuple[torch.Tensor, ...]) -> Condition:
        raise NotImplementedError

    def padded(
        self, model: torch.nn.Module, parts: tuple[torch.Tensor, ...], rows: int
    ) -> tuple[torch.Tensor, ...]:
        """`parts` grown to `rows` rows with a harmless filler (the padding rows are dropped)."""
        raise NotImplementedError

    def velocity(
        self, model: torch.nn.Module, condition: Condition, drop: bool = False
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(x, t) -> v under `condition`; with `drop`, training's random CFG dropout to null."""
        raise NotImplementedError

    def paired_velocity(
        self, model: torch.nn.Module, condition: Condition
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(x, t) -> v of the doubled batch [x, x]: the first half under `condition`, the
        second under the null condition (one forward for both CFG branches)."""
        raise NotImplementedError

    def describe(self, cfg: GeneratorConfig, meta: dict[str, Any]) -> dict[str, Any]:
        """What a client needs to know to ask for samples (the Serve /info entry)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        model: torch.nn.Module,
        normalizer: TokenNormalizer,
        condition: Condition,
        *,
        scale: float = 1.0,
        interval: tuple[float, float] = (0.0, 1.0),
        steps: int = 50,
        seed: int | None = 0,
        method: str = "euler",
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token per row of `condition`, denormalised (B, D). CFG with `scale` is applied
        only where the generator time s = 1 - t is in `interval` (the paper: 1.5 on
        [0.3, 0.9]; reptok_core/flow.py). The same seed gives the same tokens; `noise` (B, D),
        when given, replaces `seeded_token_noise(B, normalizer, seed)`."""
        p = next(model.parameters())
        parts = self.parts(condition, p.device)
        condition = self.joined(parts)
        # Guided steps run the conditional and unconditional branches as one doubled batch:
        # half the launches of two forwards (what limits small-batch sampling), same math.
        cond, both = self.velocity(model, condition), self.paired_velocity(model, condition)
        if noise is None:
            noise = seeded_token_noise(parts[0].shape[0], normalizer, seed)
        # The ODE state stays fp32 even when the weights are bf16: 50 Euler steps in bf16 drift.
        noise = noise.to(p.device, torch.float32)
        guidance = flow.Guidance(
            lambda x, t: both(x.to(p.dtype), t).float().chunk(2), scale, tuple(interval)
        )
        z = flow.sample(lambda x, t: cond(x.to(p.dtype), t).float(), noise, steps, method, guidance)
        return normalizer.to(p.device).denormalize(z.float())


class ClassConditioning(Conditioning):
    kind, keyword, uses_captions = "class", "labels", False

    def model_config(self, cfg: GeneratorConfig) -> MixerConfig:
        return cfg.mixer

    def build(self, cfg: GeneratorConfig, token_dim: int, text_dim: int | None) -> torch.nn.Module:
        return MixerGenerator(cfg.mixer, token_dim)

    def num_classes(self, cfg: GeneratorConfig) -> int:
        return cfg.mixer.num_classes

    def check_tokens(self, cfg: GeneratorConfig, manifest: dict[str, Any], source: str) -> None:
        if manifest["num_classes"] < 1:
            raise ValueError(f"{source!r} has no labels; use model.kind=text")
        if manifest["num_classes"] > cfg.mixer.num_classes:
            raise ValueError(
                f"the tokens of {source!r} have labels up to {manifest['num_classes'] - 1} but "
                f"the generator knows model.mixer.num_classes={cfg.mixer.num_classes}"
            )

    def condition_column(
        self, rows: dict[str, Any], captions: list[str] | None
    ) -> dict[str, np.ndarray]:
        if (rows["label"] < 0).any():
            raise ValueError("some token rows have no label; a class-conditional model needs all")
        return {"label": rows["label"]}

    def condition(self, batch: dict[str, Any], captions: Any, device: torch.device) -> Condition:
        return torch.as_tensor(batch["label"]).to(device).long()

    def parts(self, condition: Condition, device: torch.device) -> tuple[torch.Tensor, ...]:
        return (torch.as_tensor(condition, device=device).long(),)

    def joined(self, parts: tuple[torch.Tensor, ...]) -> Condition:
        return parts[0]

    def padded(self, model, parts, rows):
        (y,) = parts
        return (pad_rows(y, rows, model.null_class),)

    def velocity(self, model, condition, drop=False):
        y = model.drop_labels(condition) if drop else condition
        return lambda x, t: model(x, t, y)

    def paired_velocity(self, model, condition):
        y2 = torch.cat([condition, torch.full_like(condition, model.null_class)])
        return lambda x, t: model(torch.cat([x, x]), torch.cat([t, t]), y2)

    def describe(self, cfg: GeneratorConfig, meta: dict[str, Any]) -> dict[str, Any]:
        return {"num_classes": cfg.mixer.num_classes}


class TextConditioning(Conditioning):
    kind, keyword, uses_captions = "text", "text", True

    def model_config(self, cfg: GeneratorConfig) -> TextGeneratorConfig:
        return cfg.text

    def build(self, cfg: GeneratorConfig, token_dim: int, text_dim: int | None) -> torch.nn.Module:
        if text_dim is None:
            raise ValueError("a text generator needs text_dim (the caption encoder's hidden size)")
        return TextGenerator(cfg.text, token_dim, text_dim)

    def sizes(self, manifest: dict[str, Any], captions: dict[str, Any] | None) -> dict[str, int]:
        if captions is None:
            raise ValueError("a text generator trains on a caption cache; the tokens have none")
        return {"token_dim": manifest["dim"], "text_dim": captions["dim"]}

    def condition_column(
        self, rows: dict[str, Any], captions: list[str] | None
    ) -> dict[str, np.ndarray]:
        return {"caption_idx": caption_index(rows["caption"], captions or [])}

    def condition(self, batch: dict[str, Any], captions: Any, device: torch.device) -> Condition:
        idx = torch.as_tensor(batch["caption_idx"]).to(device).long()
        return captions[0][idx], captions[1][idx]

    def parts(self, condition: Condition, device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(v.to(device) for v in condition)

    def joined(self, parts: tuple[torch.Tensor, ...]) -> Condition:
        return tuple(parts)

    def padded(self, model, parts, rows):
        states, mask = parts
        return pad_rows(states, rows), pad_rows(mask, rows, 1)

    def velocity(self, model, condition, drop=False):
        states, mask = condition
        null = model.caption_drop(states.shape[0], states.device) if drop else None
        return lambda x, t: model(x, t, states, mask, null=null)

    def paired_velocity(self, model, condition):
        states, mask = condition
        b = states.shape[0]
        states2, mask2 = torch.cat([states, states]), torch.cat([mask, mask])
        null2 = torch.arange(2 * b, device=states.device) >= b  # the second half sees the null text
        return lambda x, t: model(torch.cat([x, x]), torch.cat([t, t]), states2, mask2, null=null2)

    def describe(self, cfg: GeneratorConfig, meta: dict[str, Any]) -> dict[str, Any]:
        return {"text_encoder": meta.get("text_encoder")}


CONDITIONINGS = {c.kind: c for c in (ClassConditioning(), TextConditioning())}


def conditioning(cfg: GeneratorConfig) -> Conditioning:
    """The conditioning `cfg.kind` names; a ValueError naming the option otherwise."""
    if cfg.kind not in CONDITIONINGS:
        raise ValueError(f"model.kind={cfg.kind!r}; expected one of {' | '.join(CONDITIONINGS)}")
    return CONDITIONINGS[cfg.kind]


def build_model(
    cfg: GeneratorConfig, token_dim: int, text_dim: int | None = None
) -> torch.nn.Module:
    """The generator for tokens of `token_dim` (from the token manifest, or an export's
    recorded sizes); a text generator also needs `text_dim`, the caption states' width."""
    return conditioning(cfg).build(cfg, token_dim, text_dim)


def pad_rows(x: torch.Tensor, rows: int, fill: float = 0.0) -> torch.Tensor:
    """`x` grown to `rows` rows of `fill` (batch buckets: the padding rows are dropped after)."""
    if x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0], *x.shape[1:]), fill)
    return torch.cat([x, pad])


@torch.no_grad()
def sample_tokens(
    model: torch.nn.Module,
    normalizer: TokenNormalizer,
    *,
    labels: torch.Tensor | None = None,
    text: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kw: Any,
) -> torch.Tensor:
    """Generate one token per condition; returns denormalised tokens (B, D).

    Give `labels` (B,) for a MixerGenerator (use `model.null_class` for unconditional samples)
    or `text=(states (B, L, E), mask (B, L))` for a TextGenerator; `kw` as `Conditioning.sample`
    (scale, interval, steps, seed, method, noise).
    """
    given = {k: v for k, v in (("labels", labels), ("text", text)) if v is not None}
    if len(given) != 1:
        raise ValueError("sample_tokens needs exactly one of labels= or text=")
    ((keyword, condition),) = given.items()
    kind = next(c for c in CONDITIONINGS.values() if c.keyword == keyword)
    return kind.sample(model, normalizer, condition, **kw)


def seeded_token_noise(n: int, normalizer: TokenNormalizer, seed: int | None) -> torch.Tensor:
    """The starting noise `sample_tokens(seed=seed)` draws for n tokens: float32 randn from a
    seeded CPU generator, so it is the same on every device."""
    gen = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((n, normalizer.mean.numel()), generator=gen)
