"""The RepTok tokenizer: SSL encoder (one token) + latent space + flow-matching decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from reptok_core import flow
from reptok_core.config import opt, section
from reptok_core.models.decoder import Decoder, DecoderConfig
from reptok_core.models.encoder import EncoderConfig, SSLEncoder, cosine_loss
from reptok_core.models.latent_space import LatentSpaceConfig, PixelSpace, build_latent_space


@dataclass
class TokenizerConfig:
    encoder: EncoderConfig = section(EncoderConfig, "the self-supervised ViT that gives the token")
    decoder: DecoderConfig = section(DecoderConfig, "the flow-matching decoder transformer")
    latent: LatentSpaceConfig = section(
        LatentSpaceConfig, "where the decoder works: pixels or SD-VAE latents"
    )
    flow: flow.FlowConfig = section(flow.FlowConfig, "rectified-flow training")
    image_size: int = opt(256, "image side in pixels (must match the prepared data)")


class Tokenizer(nn.Module):
    """The decoder's input sizes follow from the other parts: the token is the encoder's width,
    the latent is the latent space's channels x (image_size / its downsampling)²."""

    def __init__(
        self,
        cfg: TokenizerConfig,
        latent_space: nn.Module | None = None,
        encoder: SSLEncoder | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder if encoder is not None else SSLEncoder(cfg.encoder)
        self.latent_space = (
            latent_space if latent_space is not None else build_latent_space(cfg.latent)
        )
        side, rest = divmod(cfg.image_size, self.latent_space.downsample)
        if rest:
            raise ValueError(
                f"image_size={cfg.image_size} is not a multiple of the latent space's "
                f"downsampling {self.latent_space.downsample}"
            )
        self.decoder = Decoder(
            cfg.decoder,
            token_dim=self.encoder.dim,
            in_channels=self.latent_space.channels,
            input_size=side,
        )

    @property
    def token_dim(self) -> int:
        return self.encoder.dim

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> tokens (B, D)."""
        return self.encoder(images)

    def loss(
        self, images: torch.Tensor, latents: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Flow loss of the decoder given the image's own token, plus the cosine regulariser.

        `latents` may be precomputed (the images Parquet's `vae_latent` column); otherwise the
        latent space encodes the images here.
        """
        if latents is None:
            latents = self.latent_space.encode(images)
        z = self.encoder(images)
        z_frozen = self.encoder.target(images)
        flow_l = flow.flow_loss(lambda x, t: self.decoder(x, t, z), latents, self.cfg.flow)
        cos_l = cosine_loss(z, z_frozen, self.cfg.encoder.cos_weight)
        cos_sim = torch.nn.functional.cosine_similarity(
            z.float().detach(), z_frozen.float(), dim=-1
        ).mean()
        return {"flow": flow_l, "cos": cos_l, "total": flow_l + cos_l, "cos_sim": cos_sim}

    def latent_shape(self) -> tuple[int, int, int]:
        s = self.decoder.input_size
        return (self.decoder.in_channels, s, s)

    def seeded_noise(self, n: int, seed: int | None = 0) -> torch.Tensor:
        """The starting noise `decode(seed=seed)` draws for n tokens: float32 randn (n, C, H, W)
        from a seeded CPU generator, so it is the same on every device."""
        gen = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn((n, *self.latent_shape()), generator=gen)

    @torch.no_grad()
    def decode(
        self,
        tokens: torch.Tensor,
        steps: int = 50,
        seed: int | None = 0,
        method: str = "euler",
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens (B, D) -> images in [-1, 1]; the same seed gives the same images.

        `noise` (B, C, H, W), when given, is the flow's starting point instead of
        `seeded_noise(B, seed)`: e.g. rows drawn with different seeds, one per token.
        """
        if noise is None:
            noise = self.seeded_noise(tokens.shape[0], seed)
        elif tuple(noise.shape) != (tokens.shape[0], *self.latent_shape()):
            raise ValueError(
                f"noise has shape {tuple(noise.shape)}; "
                f"expected {(tokens.shape[0], *self.latent_shape())}"
            )
        # The ODE state stays fp32 even when the weights are bf16: 50 Euler steps in bf16 drift.
        dtype = next(self.decoder.parameters()).dtype
        noise, tokens = noise.to(tokens.device, torch.float32), tokens.to(dtype)
        latents = flow.sample(
            lambda x, t: self.decoder(x.to(dtype), t, tokens).float(), noise, steps, method
        )
        return self.latent_space.decode(latents)

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, steps: int = 50, seed: int | None = 0
    ) -> torch.Tensor:
        return self.decode(self.encode(images), steps=steps, seed=seed)

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
        """n tokens on the straight line from token a (D,) to token b (D,), ends included."""
        w = torch.linspace(0, 1, n, device=a.device, dtype=a.dtype)[:, None]
        return (1 - w) * a[None] + w * b[None]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def is_pixel_space(tok: Tokenizer) -> bool:
    return isinstance(tok.latent_space, PixelSpace)
