"""Loading one generation of models (tokenizer + optional generators) for a Models replica.

References are export folders (path or s3://) or registry URIs (`models:/name@alias`); a
registry reference is pinned to the version it resolves to now, so an alias that moved counts
as a change. Only what changed is loaded again; the rest is carried over from the old set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines import model_uri
from pipelines.serving.config import ModelSettings

if TYPE_CHECKING:  # torch is imported on the replicas only, not by the ingress or the CLI
    import torch

ROLES = ("tokenizer", "generator", "text_generator")
# The conditioning each generator role needs: /generate samples labels, /text-to-image captions.
GENERATOR_KINDS = {"generator": "class", "text_generator": "text"}


@dataclass
class Loaded:
    """Everything one model generation needs; swapped as a whole so requests never see a mix."""

    refs: dict[str, tuple[str, str]]  # role -> (reference, registry version)
    tokenizer: Any
    inference: Any  # reptok_core.serving.inference.Inference: CUDA graphs of exactly these models
    knobs: tuple = ()  # the settings the models were prepared with (precision, compile, graphs)
    generator: Any = None
    text_generator: Any = None
    text_encoder: Any = None


def _version(ref: str, settings: ModelSettings) -> str:
    return (
        model_uri.registry_version(ref, settings.mlflow_uri) if model_uri.is_registry(ref) else ""
    )


def load_changed(
    old: Loaded | None, settings: ModelSettings, device: torch.device, max_batch: int = 16
) -> Loaded | None:
    """The models `settings` ask for, reusing what `old` already holds; None when nothing
    changed (same references, registry versions, precision, compile and graph settings).
    Raises ValueError on a bad combination."""
    from reptok_core.config import Switch, choice
    from reptok_core.device import resolve_precision
    from reptok_core.exports.generator import load_generator
    from reptok_core.exports.tokenizer import load_tokenizer
    from reptok_core.models.layers import compile_blocks
    from reptok_core.models.text_encoder import OFFLINE_MINILM, TextEncoder
    from reptok_core.serving.inference import Inference, cast_weights

    wanted = {role: getattr(settings, role) for role in ROLES}
    if not wanted["tokenizer"]:
        raise ValueError("model.tokenizer is empty: give an export folder or models:/ URI")
    refs = {r: (ref, _version(ref, settings)) for r, ref in wanted.items() if ref}
    knobs = (settings.precision, settings.compile, settings.max_graphs, max_batch)
    if old is not None and old.refs == refs and old.knobs == knobs:
        return None
    if old is not None and old.knobs != knobs:
        old = None  # models are cast / compiled in place: prepare everything afresh

    def fetch(role: str) -> str:
        cache = settings.cache_dir or None
        return model_uri.resolve(wanted[role], settings.mlflow_uri, cache).folder

    def same(role: str) -> bool:
        return old is not None and old.refs.get(role) == refs.get(role)

    new = Loaded(
        refs=refs,
        tokenizer=old.tokenizer
        if same("tokenizer")
        else load_tokenizer(fetch("tokenizer"), device),
        # A fresh graph cache per generation: captured graphs hold the old weights' memory.
        inference=Inference(max_batch, settings.max_graphs),
        knobs=knobs,
    )
    for role, kind in GENERATOR_KINDS.items():
        if role not in refs:
            continue
        g = getattr(old, role) if same(role) else load_generator(fetch(role), device)
        if g.conditioning.kind != kind:
            raise ValueError(
                f"model.{role} {wanted[role]!r} is a {g.conditioning.kind}-conditioned "
                f"generator; model.{role} serves {kind}-conditioned ones"
            )
        setattr(new, role, g)
    if same("text_generator"):
        new.text_encoder = old.text_encoder
    elif new.text_generator is not None:
        name = new.text_generator.text_encoder or OFFLINE_MINILM
        new.text_encoder = TextEncoder(name).to(device)
    dtype = resolve_precision(settings.precision, device, "model.precision").dtype
    compiled = choice(Switch, settings.compile, "model.compile").decide(device.type == "cuda")
    if not same("tokenizer"):
        cast_weights(new.tokenizer.decoder, dtype)
        cast_weights(new.tokenizer.latent_space, dtype)
        if compiled:
            compile_blocks(new.tokenizer.decoder.blocks)
    for role in ("generator", "text_generator"):
        g = getattr(new, role)
        if g is not None and not same(role):
            cast_weights(g.model, dtype)
            if compiled and role == "generator":  # measured; the text model stays eager
                compile_blocks(g.model.blocks)
        if g is not None and g.normalizer.mean.numel() != new.tokenizer.token_dim:
            raise ValueError(
                f"model.{role} makes {g.normalizer.mean.numel()}-d tokens but the "
                f"tokenizer's are {new.tokenizer.token_dim}-d"
            )
    if settings.warmup_steps > 0 and device.type == "cuda":
        warm_up(new, settings.warmup_steps)
    return new


def warm_up(m: Loaded, steps: int) -> None:
    """Twice each model at batch 1: the first call compiles and runs eagerly, the second
    captures its CUDA graph (graph_cache.py), so requests with these settings start replaying."""
    import torch

    for _ in range(2):
        z = torch.zeros(1, m.tokenizer.token_dim)
        if m.generator is not None:
            z = m.inference.tokens(m.generator, [0], m.generator.cfg.guidance_scale, steps, 0)
        if m.text_generator is not None:
            text = m.text_encoder(["a photo"])
            scale = m.text_generator.cfg.guidance_scale
            m.inference.tokens(m.text_generator, text, scale, steps, 0)
        m.inference.decode(m.tokenizer, z.cpu(), steps, [0])
