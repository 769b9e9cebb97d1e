"""The flow-matching decoder: a DiT-style transformer that denoises an image latent
conditioned on the single image token, placed in-context in front of the patch tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from reptok_core.config import opt
from reptok_core.encoder import TokenProjection
from reptok_core.layers import MLP, Attention, FourierTimeEmbedding, modulate, rope_2d


@dataclass
class DecoderConfig:
    in_channels: int = opt(4, "latent channels (4 for the SD-VAE, 3 in pixel space)")
    input_size: int = opt(32, "latent side (32 for 256 px through the SD-VAE)")
    patch_size: int = opt(2, "latent patch side; (input_size / patch_size)² patch tokens")
    width: int = opt(1152, "transformer width (1152 = DiT-XL)")
    depth: int = opt(28, "transformer blocks")
    heads: int = opt(16, "attention heads (head dim = width / heads, divisible by 4 for 2-D RoPE)")
    mlp_ratio: float = opt(4.0, "MLP hidden size as a multiple of width")
    cond_dim: int = opt(
        640, "width of the time mapping MLP that feeds every block's adaptive norms"
    )
    token_dim: int = opt(768, "image-token dimension (the encoder's width); must be <= width")


def decoder_tiny(**kw) -> DecoderConfig:
    return DecoderConfig(
        **{
            **dict(
                in_channels=3,
                input_size=16,
                patch_size=4,
                width=64,
                depth=2,
                heads=2,
                cond_dim=64,
                token_dim=32,
            ),
            **kw,
        }
    )


def decoder_small(**kw) -> DecoderConfig:
    return DecoderConfig(
        **{
            **dict(
                in_channels=3,
                input_size=32,
                patch_size=4,
                width=384,
                depth=8,
                heads=6,
                cond_dim=256,
                token_dim=192,
            ),
            **kw,
        }
    )


def decoder_paper(**kw) -> DecoderConfig:
    return DecoderConfig(**kw)


DECODER_PRESETS = {"tiny": decoder_tiny, "small": decoder_small, "paper": decoder_paper}


class DecoderBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, cond_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * width))
        nn.init.zeros_(self.ada[1].weight)  # zero-init: every block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1), rope)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))
        self.linear = nn.Linear(width, out_dim)
        for layer in (self.ada[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class Decoder(nn.Module):
    """v_θ(x_t, t | z): latent (B, C, H, W) + time (B,) + token (B, D) -> velocity (B, C, H, W)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        p, c, w = cfg.patch_size, cfg.in_channels, cfg.width
        if cfg.input_size % p:
            raise ValueError(f"latent size {cfg.input_size} not divisible by patch {p}")
        self.grid = cfg.input_size // p
        self.patch_embed = nn.Linear(c * p * p, w)
        self.token_proj = TokenProjection(cfg.token_dim, w)
        self.time_embed = FourierTimeEmbedding(cfg.cond_dim)
        self.blocks = nn.ModuleList(
            DecoderBlock(w, cfg.heads, cfg.mlp_ratio, cfg.cond_dim) for _ in range(cfg.depth)
        )
        self.final = FinalLayer(w, c * p * p, cfg.cond_dim)
        cos, sin = rope_2d(self.grid, w // cfg.heads, n_prefix=1)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Activation checkpointing of every block (recompute in backward): less memory, ~1/3
        # more decoder compute. Set by the training code; off by default.
        self.grad_checkpointing = False
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.cfg.patch_size
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        p, c, g = self.cfg.patch_size, self.cfg.in_channels, self.grid
        x = x.view(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(self.patchify(x_t))
        cond_token = self.token_proj(z).to(tokens.dtype)[:, None]
        h = torch.cat([cond_token, tokens], dim=1)
        c = self.time_embed(t)
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, rope, use_reentrant=False)
            else:
                h = block(h, c, rope)
        # The image token conditions through attention only; it is dropped before the head.
        return self.unpatchify(self.final(h[:, 1:], c))
