"""A trained tokenizer on storage: export folder (weights + config JSON) and loading it."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from reptok_core.config import from_dict, to_dict
from reptok_core.models.latent_space import SDVAESpace
from reptok_core.models.tokenizer import Tokenizer, TokenizerConfig
from reptok_core.storage import join, read_bytes, write_bytes_atomic

EXPORT_WEIGHTS = "tokenizer.safetensors"


EXPORT_CONFIG = "tokenizer.json"


def export_tokenizer(
    state: dict[str, torch.Tensor],
    cfg: TokenizerConfig,
    sizes: dict[str, int],
    uri: str,
    extra: dict | None = None,
    vae_config: dict | None = None,
) -> None:
    """Write weights (safetensors) + config JSON under `uri`.

    `sizes` are the decoder's derived sizes (`Tokenizer.decoder.sizes`: token_dim, in_channels,
    input_size); the JSON records them so a loader knows the shapes without building the
    model, and loading checks that the rebuilt model has them.

    Of the frozen target only the tensors that differ from the trained encoder are kept (with
    `finetune=cls`, the original [cls] embedding): enough for fine-tuning from the export to
    regularise towards the same target. The VAE is left out (it loads from `cfg.latent.vae`)
    unless `vae_config` (its diffusers config) is given: then its weights travel in the export,
    which loads offline (an imported official checkpoint carries its SD-VAE this way).
    """
    keep = {}
    for k, v in state.items():
        if k.startswith("encoder.frozen."):
            twin = state.get("encoder.vit." + k[len("encoder.frozen.") :])
            if twin is not None and torch.equal(twin, v):
                continue
        elif k.startswith("latent_space.") and not vae_config:
            continue
        keep[k] = v.contiguous()
    if vae_config and not any(k.startswith("latent_space.vae.") for k in keep):
        raise ValueError(f"export {uri!r}: vae_config given but the state holds no VAE weights")
    write_bytes_atomic(join(uri, EXPORT_WEIGHTS), save_safetensors_bytes(keep))
    meta = {
        "config": to_dict(cfg),
        "sizes": dict(sizes),
        **({"vae_config": vae_config} if vae_config else {}),
    }
    meta.update(extra or {})
    write_bytes_atomic(join(uri, EXPORT_CONFIG), json.dumps(meta, indent=2).encode())


def read_tokenizer_meta(uri: str) -> dict:
    """The export's JSON: {"config": ..., "sizes": ..., optional "vae_config", provenance}."""
    return json.loads(read_bytes(join(uri, EXPORT_CONFIG)))


def load_tokenizer(
    uri: str, device: torch.device | str = "cpu", latent_space: torch.nn.Module | None = None
) -> Tokenizer:
    """Rebuild an exported tokenizer; the encoder's weights come from the export, not the hub,
    and so does the VAE when the export carries it."""
    meta = read_tokenizer_meta(uri)
    cfg = from_dict(TokenizerConfig, meta["config"])
    cfg.encoder.weights = "random"
    state = load_safetensors_bytes(read_bytes(join(uri, EXPORT_WEIGHTS)))
    vae_from_export = latent_space is None and "vae_config" in meta
    if vae_from_export:
        latent_space = SDVAESpace.from_config(
            meta["vae_config"], cfg.latent.scaling_factor, cfg.latent.sample
        )
    else:  # the caller's latent space (or the hub's VAE) keeps its own weights
        state = {k: v for k, v in state.items() if not k.startswith("latent_space.")}
    model = Tokenizer(cfg, latent_space=latent_space)
    if model.decoder.sizes != meta.get("sizes"):
        raise ValueError(
            f"tokenizer export {uri!r} records decoder sizes {meta.get('sizes')} but its encoder "
            f"and latent space give {model.decoder.sizes}"
        )
    # The target is the trained encoder except where the export says otherwise.
    frozen = {f"encoder.frozen.{k}": v for k, v in _encoder_state(state).items()}
    state = {**frozen, **state}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if not vae_from_export:
        missing = [k for k in missing if not k.startswith("latent_space.")]
    if missing or unexpected:
        raise ValueError(
            f"tokenizer export {uri!r} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(device).eval()


def _encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len("encoder.vit.")
    return {k[n:]: v for k, v in state.items() if k.startswith("encoder.vit.")}
