"""The optional `vae_latent` column: SD-VAE latents of the prepared images."""

from __future__ import annotations

from typing import Any

import numpy as np


def load_vae(model: str) -> Any:
    """The frozen SD-VAE latent space (reptok_core.models.latent_space), on the GPU when there is one.

    Latents are the posterior mean, not a sample, so re-running a shard writes identical bytes
    (idempotence) and training can add its own noise; they are scaled by the VAE's factor.
    """
    from reptok_core.device import resolve_device
    from reptok_core.models.latent_space import SDVAESpace  # lazy: diffusers is heavy

    space = SDVAESpace.from_pretrained(model, sample=False)
    return space.to(resolve_device())


def encode_vae_latents(images_uint8: np.ndarray, latent_space: Any) -> np.ndarray:
    """(B,H,W,3) uint8 -> float32 (B,C,H/8,W/8) latents from `latent_space.encode`."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2)
    x = x.float() / 127.5 - 1.0
    device = next(latent_space.parameters()).device
    with torch.no_grad():
        z = latent_space.encode(x.to(device))
    return z.float().cpu().numpy()
