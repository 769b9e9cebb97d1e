"""Stage 1 as a training task: batches -> losses, evaluation, sample grids, export, loading.

Pure PyTorch; the Ray pipeline and the torchrun benchmarks both drive it.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from reptok_core import flow
from reptok_core.evaluation.metrics import psnr, ssim
from reptok_core.exports.tokenizer import load_tokenizer
from reptok_core.images import image_grid, images_from_uint8, images_to_uint8, random_hflip
from reptok_core.models.encoder import set_trainable
from reptok_core.models.tokenizer import Tokenizer, TokenizerConfig
from reptok_core.training.distributed import shard_blocks


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
