"""Building blocks of the generators (the decoder's official layers live in decoder.py): the
DiT time embedding, q/k-normalised self- and cross-attention, the exact-GELU MLP, and regional
compilation."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SinusoidalTimeEmbedding(nn.Module):
    """DiT's timestep embedder, as the official RepTok generator uses it: t -> [cos(t f_k),
    sin(t f_k)] with f_k = 10000^(-k / (freq_dim / 2)), k < freq_dim / 2, -> Linear -> SiLU ->
    Linear. t is used as given (a float in [0, 1] for the generators, not scaled by 1000)."""

    def __init__(self, out_dim: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        if freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {freq_dim}")
        half = freq_dim // 2
        # Computed as exp(-ln(P) k / half) in fp32, the official formula's own rounding.
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
        )

    def features(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, freq_dim): cosines first, then sines, in fp32 (inference.cast_weights
        leaves the frequency buffer in fp32)."""
        angles = t.float()[:, None] * self.freqs.float()[None]
        return torch.cat([angles.cos(), angles.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t).to(self.mlp[0].weight.dtype))


class RMSNorm(nn.RMSNorm):
    """RMSNorm whose weight follows the input's dtype. Under bf16 autocast q and k arrive in
    bf16 while the weight is fp32, and torch then falls back from its fused kernel to ~6
    elementwise ops each way: a third of the text generator's step on an H200
    (benchmarks/NOTES.md). The fused kernel accumulates in fp32 either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


# Below this many query x key pairs per head, attention runs as two batched matmuls and a
# softmax: the fused SDPA kernels tile to 64-128 rows and columns, so for the text generator
# (6 queries over 6 tokens or a caption's 16-77 states) they spent most of their time on
# padding (~1/3 of its step on an H200, benchmarks/NOTES.md); the math backend upcasts to fp32.
SHORT_ATTENTION_PAIRS = 4096


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v for (B, H, N, Dh) inputs; `mask` (bool, broadcastable to
    (B, H, N, M)) marks the keys each query may see. Same result as SDPA."""
    if q.shape[-2] * k.shape[-2] > SHORT_ATTENTION_PAIRS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # Scores in fp32 like the fused kernels' accumulators (tiny here: N x M per head).
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head self-attention with RMS-normalised q and k (stable at large width) via SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # Norm in the (B, N, H, Dh) layout the projection writes (contiguous, fast); SDPA takes
        # (B, H, N, Dh) views of it and returns its output in the same layout.
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Queries from x, keys/values from a context sequence (text states), with a padding mask."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.q_norm = RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, n, d = x.shape
        m = context.shape[1]
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(b, m, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, None if mask is None else mask[:, None, None, :].bool())
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    """Linear -> exact (erf) GELU -> Linear, as the official RepTok mixer's FeedForward."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def compile_blocks(blocks) -> None:
    """Regional compilation: each block compiled in place (one compile per block shape, reused
    by every block of that shape; far quicker to compile than the whole model)."""
    for block in blocks:
        block.compile(dynamic=False)
