"""Text-conditioned token generator: a transformer over [noisy token, K learnable tokens,
time token] that cross-attends to a frozen text encoder's token states.

It shares the class mixer's (official RepTok) input parts: the tokens are built at the
image-token dimension D (DiT's sinusoidal time embedding) and projected to the width by one
shared Linear; MLPs use the exact GELU; the network runs the official generator's time s = 1 - t
and predicts data - noise, while `forward` takes and returns the flow's t and velocity
(conventions: reptok_core/flow.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from reptok_core.config import opt
from reptok_core.models.layers import MLP, Attention, CrossAttention, SinusoidalTimeEmbedding


@dataclass
class TextGeneratorConfig:
    """The model's own sizes; the token and text-state widths are the data's (`TextGenerator`'s
    token_dim and text_dim)."""

    width: int = opt(1152, "transformer width")
    depth: int = opt(24, "transformer blocks (self-attention + cross-attention to text + MLP)")
    heads: int = opt(16, "attention heads")
    mlp_ratio: float = opt(4.0, "MLP hidden size as a multiple of width")
    num_learnable_tokens: int = opt(4, "learnable tokens concatenated to the noisy token")
    caption_dropout: float = opt(
        0.1, "probability a caption is replaced by the null text (trains CFG)"
    )


class TextBlock(nn.Module):
    def __init__(self, width: int, text_dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.cross = CrossAttention(width, text_dim, heads)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross(self.norm2(x), text, mask)
        return x + self.mlp(self.norm3(x))


class TextGenerator(nn.Module):
    """v_θ(z_t, t | text states (B, L, E), mask (B, L) with 1 = real token). `token_dim` is the
    tokens' dimension D, `text_dim` the text encoder's hidden size E (MiniLM-L6: 384)."""

    def __init__(self, cfg: TextGeneratorConfig, token_dim: int, text_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_dim, self.text_dim = token_dim, text_dim
        d, w = token_dim, cfg.width
        self.learnable = nn.Parameter(torch.randn(1, cfg.num_learnable_tokens, d) * 0.02)
        self.time_embed = SinusoidalTimeEmbedding(d)
        self.proj_in = nn.Linear(d, w)  # shared by all tokens
        self.pos = nn.Parameter(torch.randn(1, cfg.num_learnable_tokens + 2, w) * 0.02)
        # A learned "empty caption": what the model is conditioned on when the caption is dropped.
        self.null_text = nn.Parameter(torch.zeros(1, 1, text_dim))
        self.blocks = nn.ModuleList(
            TextBlock(w, text_dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(w)
        self.out = nn.Linear(w, token_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def sizes(self) -> dict[str, int]:
        """The sizes it was built with besides its config (an export records them)."""
        return {"token_dim": self.token_dim, "text_dim": self.text_dim}

    def caption_drop(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) bool: which samples train unconditionally (probability caption_dropout, for CFG)."""
        return torch.rand(batch, device=device) < self.cfg.caption_dropout

    def forward(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        mask: torch.Tensor,
        null: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`null` (B,) bool marks samples that see only the learned null text (CFG's
        unconditional branch). It is applied here, inside forward, because under FSDP the
        `null_text` parameter is only gathered while the module runs."""
        b = z_t.shape[0]
        if null is not None:
            text = torch.where(null[:, None, None], self.null_text.to(text.dtype), text)
            first_only = torch.zeros_like(mask, dtype=torch.bool)
            first_only[:, 0] = True
            mask = torch.where(null[:, None], first_only, mask.bool())
        dt = z_t.dtype
        s = 1 - t.float()  # the generators' time: 0 at noise
        tokens = torch.cat(
            [
                z_t[:, None],
                self.learnable.to(dt).expand(b, -1, -1),
                self.time_embed(s).to(dt)[:, None],
            ],
            dim=1,
        )
        h = self.proj_in(tokens) + self.pos
        text = text.to(h.dtype)
        for block in self.blocks:
            h = block(h, text, mask)
        return -self.out(self.norm(h[:, 0]))  # data - noise -> the flow's noise - data
