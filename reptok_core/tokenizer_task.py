"""Stage 1 as a training task: batches -> losses, evaluation, sample grids, export, loading.

Pure PyTorch; the Ray pipeline and the torchrun benchmarks both drive it.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from reptok_core import flow
from reptok_core.config import from_dict, to_dict
from reptok_core.distributed import shard_blocks
from reptok_core.encoder import set_trainable
from reptok_core.latent_space import SDVAESpace
from reptok_core.metrics import psnr, ssim
from reptok_core.storage import join, read_bytes, write_bytes_atomic
from reptok_core.tokenizer import Tokenizer, TokenizerConfig

EXPORT_WEIGHTS = "tokenizer.safetensors"
EXPORT_CONFIG = "tokenizer.json"


def images_from_uint8(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1] on `device`."""
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def images_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """Stack equally long rows of (N, H, W, 3) images into one (rows*H, N*W, 3) picture."""
    return np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def finetune_config(requested: TokenizerConfig, exported: TokenizerConfig) -> TokenizerConfig:
    """Fine-tuning an export: its architecture (encoder, decoder, latent space, image size),
    with the requested training choices (which encoder weights train, λ, the flow's t)."""
    cfg = copy.deepcopy(exported)
    cfg.encoder.finetune = requested.encoder.finetune
    cfg.encoder.cos_weight = requested.encoder.cos_weight
    cfg.flow = copy.deepcopy(requested.flow)
    return cfg


class TokenizerTask:
    """`init_from` (an export folder) starts from its weights; `cfg` must then be
    `finetune_config(..., that export's config)`."""

    def __init__(
        self,
        cfg: TokenizerConfig,
        device: torch.device,
        latent_space: torch.nn.Module | None = None,
        init_from: str = "",
    ):
        self.cfg = cfg
        self.device = device
        if init_from:
            model = load_tokenizer(init_from, latent_space=latent_space).train()
            model.cfg = cfg
            set_trainable(model.encoder.vit, cfg.encoder.finetune)
        else:
            model = Tokenizer(cfg, latent_space=latent_space)
        self.model = model.to(device)

    def shard(self, bf16_params: bool = False) -> None:
        dec = self.model.decoder
        shard_blocks(self.model, dec.blocks, dec, bf16_params)

    def blocks(self) -> list[torch.nn.Module]:
        return list(self.model.decoder.blocks)

    def inputs(self, batch: dict[str, Any], flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = images_from_uint8(batch["image"], self.device)
        if images.shape[-1] != self.cfg.image_size:
            raise ValueError(
                f"dataset images are {images.shape[-1]} px but model.image_size={self.cfg.image_size}; "
                "prepare the data at the model's resolution"
            )
        latents = batch.get("vae_latent")
        if latents is not None:
            # Cached latents belong to the unflipped image, so flipping is off with them.
            return images, latents.to(self.device).float().view(-1, *self.model.latent_shape())
        return (random_hflip(images) if flip else images), None

    def loss(self, batch: dict[str, Any], flip: bool = True) -> dict[str, torch.Tensor]:
        images, latents = self.inputs(batch, flip)
        return self.model.loss(images, latents)

    @torch.no_grad()
    def evaluate(
        self, batch: dict[str, Any], steps: int, seed: int = 0
    ) -> tuple[dict[str, float], np.ndarray]:
        """Reconstruction PSNR / SSIM + fixed-t validation flow loss; returns a grid too."""
        images, latents = self.inputs(batch, flip=False)
        if latents is None:
            latents = self.model.latent_space.encode(images)
        z = self.model.encode(images)
        recon = self.model.decode(z, steps=steps, seed=seed)
        val = flow.validation_loss(lambda x, t: self.model.decoder(x, t, z), latents, seed=seed)
        metrics = {
            "psnr": psnr(recon, images).mean().item(),
            "ssim": ssim(recon, images).mean().item(),
            "val_flow": val.mean().item(),
        }
        n = min(8, images.shape[0])
        grid = image_grid([images_to_uint8(images[:n]), images_to_uint8(recon[:n])])
        return metrics, grid


def export_tokenizer(
    state: dict[str, torch.Tensor],
    cfg: TokenizerConfig,
    uri: str,
    extra: dict | None = None,
    vae_config: dict | None = None,
) -> None:
    """Write weights (safetensors) + config JSON under `uri`.

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
    meta = {"config": to_dict(cfg), **({"vae_config": vae_config} if vae_config else {})}
    meta.update(extra or {})
    write_bytes_atomic(join(uri, EXPORT_CONFIG), json.dumps(meta, indent=2).encode())


def read_tokenizer_meta(uri: str) -> dict:
    """The export's JSON: {"config": ..., optional "vae_config", provenance}."""
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
