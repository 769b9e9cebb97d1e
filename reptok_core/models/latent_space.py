"""Where the decoder works: raw pixels, or the Stable Diffusion VAE's latent space.

Both take and return images in [-1, 1], (B, 3, H, W); `encode` gives what the decoder models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from reptok_core.config import opt


@dataclass
class LatentSpaceConfig:
    kind: str = opt(
        "sd-vae", "'pixel' (decode pixels directly) or 'sd-vae' (Stable Diffusion VAE latents)"
    )
    vae: str = opt(
        "stabilityai/sd-vae-ft-mse", "hub id or local folder of a diffusers AutoencoderKL"
    )
    scaling_factor: float = opt(0.18215, "latents are multiplied by this (the SD-VAE's own factor)")
    sample: bool = opt(True, "sample the VAE posterior (true) or take its mean (false)")


# The diffusers config of stabilityai/sd-vae-ft-mse (the paper's VAE): the one source for code
# that builds that VAE without the hub (benchmarks, the official-checkpoint import).
SD_VAE_FT_MSE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
)


class PixelSpace(nn.Module):
    channels = 3
    downsample = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class SDVAESpace(nn.Module):
    """diffusers AutoencoderKL (frozen), latents multiplied by its scaling factor."""

    channels = 4
    downsample = 8

    def __init__(self, vae: nn.Module, scaling_factor: float = 0.18215, sample: bool = True):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = scaling_factor
        self.sample = sample
        self.channels = vae.config.latent_channels
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, scaling_factor: float = 0.18215, sample: bool = True
    ) -> SDVAESpace:
        from diffusers import AutoencoderKL  # lazy: only users of the VAE need diffusers

        return cls(AutoencoderKL.from_pretrained(name_or_path), scaling_factor, sample)

    @classmethod
    def from_config(
        cls, config: dict[str, Any], scaling_factor: float = 0.18215, sample: bool = True
    ) -> SDVAESpace:
        """A randomly initialised VAE of a given diffusers config (tests, benchmarks)."""
        from diffusers import AutoencoderKL

        return cls(AutoencoderKL(**config), scaling_factor, sample)

    def train(self, mode: bool = True) -> SDVAESpace:
        super().train(mode)
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample() if self.sample else dist.mean
        return z * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return out.clamp(-1, 1)


def build_latent_space(cfg: LatentSpaceConfig) -> nn.Module:
    if cfg.kind == "pixel":
        return PixelSpace()
    if cfg.kind == "sd-vae":
        return SDVAESpace.from_pretrained(cfg.vae, cfg.scaling_factor, cfg.sample)
    raise ValueError(f"latent.kind={cfg.kind!r}; expected 'pixel' or 'sd-vae'")
