"""Class-conditional token generator: an MLP-Mixer over three tokens
[noisy image token (+pos), class embedding, time embedding], trained with flow matching."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from reptok_core import fused_token_mix as ftm
from reptok_core.config import opt
from reptok_core.layers import MLP, FourierTimeEmbedding


@dataclass
class MixerConfig:
    token_dim: int = opt(768, "image-token dimension (the tokenizer's encoder width)")
    width: int = opt(1536, "mixer width (paper XL: 1536 x 28 blocks = 536M parameters)")
    depth: int = opt(28, "mixer blocks")
    mlp_ratio: float = opt(4.0, "channel-mixing MLP hidden size as a multiple of width")
    # The official mixer sizes its token-mixing MLP as 3 tokens x expansion 3 = 9 hidden units;
    # its measured 9.6 GFLOP/sample (6 x 533M params x 3 tokens) leaves no room for a wide one.
    token_mlp_dim: int = opt(9, "hidden size of the token-mixing MLP (it mixes only 3 tokens)")
    num_classes: int = opt(1000, "classes; label num_classes is the null class used by CFG")
    class_dropout: float = opt(0.1, "label dropout that trains the null class (CFG)")


def mixer_tiny(**kw) -> MixerConfig:
    return MixerConfig(
        **{**dict(token_dim=32, width=64, depth=2, token_mlp_dim=16, num_classes=10), **kw}
    )


def mixer_small(**kw) -> MixerConfig:
    return MixerConfig(
        **{**dict(token_dim=192, width=512, depth=8, token_mlp_dim=64, num_classes=10), **kw}
    )


def mixer_paper(**kw) -> MixerConfig:
    return MixerConfig(**kw)


MIXER_PRESETS = {"tiny": mixer_tiny, "small": mixer_small, "paper": mixer_paper}

N_TOKENS = 3


class MixerBlock(nn.Module):
    # On CUDA the token-mixing MLP runs as the fused Triton kernels of
    # reptok_core/fused_token_mix.py (same function, 1.45x faster training step on an H200,
    # benchmarks/NOTES.md); False keeps the two matmuls everywhere.
    fused_token_mix = True

    def __init__(self, width: int, mlp_ratio: float, token_mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.token_mix = MLP(N_TOKENS, token_mlp_dim)
        self.norm2 = nn.LayerNorm(width)
        self.channel_mix = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        mlp = self.token_mix
        if self.fused_token_mix and ftm.available(y, N_TOKENS, mlp.fc1.out_features):
            w1, b1, w2, b2 = mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
            x = x + torch.ops.reptok.token_mix(y, w1, b1, w2, b2).to(x.dtype)
        else:
            x = x + self.token_mix(y.transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mix(self.norm2(x))


class MixerGenerator(nn.Module):
    """v_θ(z_t, t | y) for normalised tokens z (B, D), labels y (B,) with y == num_classes = null."""

    def __init__(self, cfg: MixerConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_in = nn.Linear(cfg.token_dim, w)
        self.pos = nn.Parameter(torch.zeros(1, N_TOKENS, w))
        self.class_embed = nn.Embedding(cfg.num_classes + 1, w)
        self.time_embed = FourierTimeEmbedding(w)
        self.blocks = nn.ModuleList(
            MixerBlock(w, cfg.mlp_ratio, cfg.token_mlp_dim) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(w)
        self.out = nn.Linear(w, cfg.token_dim)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.zeros_(self.out.weight)  # start by predicting zero velocity
        nn.init.zeros_(self.out.bias)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Replace labels by the null class with probability class_dropout (training only)."""
        drop = torch.rand(y.shape, device=y.device) < self.cfg.class_dropout
        return torch.where(drop, torch.full_like(y, self.null_class), y)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.stack(
            [self.token_in(z_t), self.class_embed(y), self.time_embed(t).to(z_t.dtype)], dim=1
        )
        h = h + self.pos
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h[:, 0]))
