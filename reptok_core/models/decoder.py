"""The flow-matching decoder: the official RepTok decoder, an HDiT-style transformer
(k-diffusion's hourglass layers at a single level) that denoises an image latent conditioned
on the single image token, placed in-context in front of the patch tokens.

One layer: AdaRMSNorm -> cosine-similarity attention with a learnable per-head scale and axial
2-D RoPE on half of each head's channels -> zero-init output projection -> residual; then
AdaRMSNorm -> SwiGLU -> zero-init down projection -> residual. Time enters only through the
AdaRMSNorms, from a mapping network over random Fourier features. Parameter for parameter the
official model (`reptok/encoder/encoder.py` of CompVis/RepTok); reptok_core/official/convert.py
maps its checkpoint onto this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from reptok_core.config import opt

# The official layers' epsilon: RMS norms use it on the mean square, the cosine-similarity
# attention on the sum of squares.
EPS = 1e-6


@dataclass
class DecoderConfig:
    """The decoder's own sizes. What it reads and writes comes from the tokenizer's other parts
    (`Decoder`'s token_dim, in_channels, input_size), so no preset restates them."""

    patch_size: int = opt(2, "latent patch side; (latent side / patch_size)² patch tokens")
    width: int = opt(1152, "transformer width (the paper: 1152)")
    depth: int = opt(28, "transformer layers")
    head_dim: int = opt(72, "attention head size (heads = width / head_dim); a multiple of 8")
    ff_ratio: int = opt(3, "SwiGLU hidden size as a multiple of width (layers and mapping)")
    mapping_width: int = opt(1024, "width of the time mapping network feeding every AdaRMSNorm")
    mapping_depth: int = opt(2, "SwiGLU blocks in the time mapping network")


def _linear(d_in: int, d_out: int, zero: bool = False) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=False)
    if zero:
        nn.init.zeros_(layer.weight)
    return layer


class RMSNorm(nn.Module):
    """rms_norm with a learnable scale initialised to 1 (the official `scale` parameter)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), EPS)


class AdaRMSNorm(nn.Module):
    """rms_norm(x) · (1 + Linear_zero(c)): time-conditioned scale, no shift, no gate."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.linear = _linear(cond_dim, dim, zero=True)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale = (self.linear(c) + 1)[:, None]
        return F.rms_norm(x, (x.shape[-1],), None, EPS) * scale.to(x.dtype)


class SwiGLU(nn.Module):
    """up (no bias) -> value · silu(gate) -> zero-init down (no bias). The official layer puts
    the value in the first half of `up`'s output and the gate in the second."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = _linear(dim, 2 * hidden)
        self.down = _linear(hidden, dim, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.up(x).chunk(2, dim=-1)
        return self.down(value * F.silu(gate))


def canvas_positions(grid: int) -> torch.Tensor:
    """(1 + grid², 2) positions (y, x): the in-context token at the centre (0, 0), then the
    patch centres of a grid² raster on the [-1, 1] canvas."""
    edges = torch.linspace(-1.0, 1.0, grid + 1, dtype=torch.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    patches = torch.stack([ys.flatten(), xs.flatten()], dim=-1)
    return torch.cat([torch.zeros(1, 2, dtype=torch.float64), patches])


def axial_rope_angles(positions: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(N, heads, head_dim / 4) rotation angles: per head, head_dim / 8 frequencies for y then
    as many for x. The frequencies are log-spaced from π to 10π over heads × head_dim / 8
    values and dealt out round-robin across heads, so each head sees a different subset."""
    per_axis = head_dim // 8
    log_f = torch.linspace(math.log(math.pi), math.log(10 * math.pi), heads * per_axis + 1)
    freqs = log_f[:-1].exp().double().view(per_axis, heads).T  # (heads, per_axis)
    ang_y = positions[:, None, 0:1] * freqs[None]
    ang_x = positions[:, None, 1:2] * freqs[None]
    return torch.cat([ang_y, ang_x], dim=-1)


def apply_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + r) for i < r, r = cos.shape[-1] (head_dim / 4); the second
    half of each head's channels passes through. x (B, N, H, Dh); tables (N, H, r), fp32."""
    r = cos.shape[-1]
    x1, x2, rest = x[..., :r].float(), x[..., r : 2 * r].float(), x[..., 2 * r :]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    return torch.cat([y1.to(x.dtype), y2.to(x.dtype), rest], dim=-1)


def cosine_qk(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor):
    """q, k (B, N, H, Dh) scaled to norm sqrt(scale[h]) each, so q·k = scale · cos(q, k)."""
    s = scale.float().sqrt()[:, None]
    q_f = q.float() * (s * torch.rsqrt(q.float().pow(2).sum(-1, keepdim=True) + EPS))
    k_f = k.float() * (s * torch.rsqrt(k.float().pow(2).sum(-1, keepdim=True) + EPS))
    return q_f.to(q.dtype), k_f.to(k.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, width: int, head_dim: int, ff_ratio: int, cond_dim: int):
        super().__init__()
        if width % head_dim:
            raise ValueError(f"decoder width {width} is not a multiple of head_dim {head_dim}")
        self.heads, self.head_dim = width // head_dim, head_dim
        self.attn_norm = AdaRMSNorm(width, cond_dim)
        self.qkv = _linear(width, 3 * width)
        # Learnable attention temperature per head; SDPA then runs with scale 1.
        self.scale = nn.Parameter(torch.full((self.heads,), 10.0))
        self.out = _linear(width, width, zero=True)
        self.ff_norm = AdaRMSNorm(width, cond_dim)
        self.ff = SwiGLU(width, ff_ratio * width)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        b, n, w = x.shape
        # Normalise and rotate q, k in the (B, N, H, Dh) layout the projection writes: the
        # head-dim reductions then read contiguous rows (in the (B, H, N, Dh) view the fused
        # kernels ran ~4x slower on an H200, benchmarks/NOTES.md); SDPA takes transposed views.
        qkv = self.qkv(self.attn_norm(x, c)).view(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        q, k = cosine_qk(q, k, self.scale)
        q, k = apply_half_rope(q, *rope), apply_half_rope(k, *rope)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0
        )
        x = x + self.out(a.transpose(1, 2).reshape(b, n, w))
        return x + self.ff(self.ff_norm(x, c))


class TimeMapping(nn.Module):
    """t -> fixed random Gaussian Fourier features -> Linear -> RMSNorm -> SwiGLU residual
    blocks -> RMSNorm: the conditioning vector of every AdaRMSNorm."""

    def __init__(self, width: int, depth: int, ff_ratio: int):
        super().__init__()
        if width % 2:
            raise ValueError(f"mapping width {width} must be even")
        # Random but fixed: persistent, so a checkpoint carries the draw it was trained with.
        self.register_buffer("fourier", torch.randn(width // 2, 1))
        self.in_proj = _linear(width, width)
        self.in_norm = RMSNorm(width)
        self.blocks = nn.ModuleList(MappingBlock(width, ff_ratio) for _ in range(depth))
        self.out_norm = RMSNorm(width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * t.float()[:, None] @ self.fourier.float().T
        h = self.in_proj(torch.cat([f.cos(), f.sin()], dim=-1).to(self.in_proj.weight.dtype))
        h = self.in_norm(h)
        for block in self.blocks:
            h = block(h)
        return self.out_norm(h)


class MappingBlock(nn.Module):
    def __init__(self, width: int, ff_ratio: int):
        super().__init__()
        self.norm = RMSNorm(width)
        self.ff = SwiGLU(width, ff_ratio * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x))


class TokenProjection(nn.Module):
    """Token (D) -> decoder width (W >= D): LayerNorm(Linear_zero(z + offset)) + zero-padded
    (z + offset). At init the linear branch is exactly zero, so the decoder sees the SSL token
    itself; `offset` is the official model's learnable vector added to the token."""

    def __init__(self, token_dim: int, width: int):
        super().__init__()
        if width < token_dim:
            raise ValueError(
                f"decoder.width {width} must be >= the token dim {token_dim} (the encoder's width)"
            )
        self.pad = width - token_dim
        self.offset = nn.Parameter(torch.zeros(token_dim))
        self.linear = nn.Linear(token_dim, width)
        self.norm = nn.LayerNorm(width)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z + self.offset.to(z.dtype)
        return self.norm(self.linear(z)) + F.pad(z, (0, self.pad))


class Decoder(nn.Module):
    """v_θ(x_t, t | z): latent (B, C, H, W) + time (B,) + token (B, D) -> velocity (B, C, H, W).

    t = 1 is noise, t = 0 data (reptok_core/flow.py), as in the official decoder. `token_dim`
    is the encoder's width (<= cfg.width), `in_channels` x `input_size`² the latent's shape.
    """

    def __init__(self, cfg: DecoderConfig, token_dim: int, in_channels: int, input_size: int):
        super().__init__()
        self.cfg = cfg
        self.token_dim, self.in_channels, self.input_size = token_dim, in_channels, input_size
        p, c, w = cfg.patch_size, in_channels, cfg.width
        if input_size % p:
            raise ValueError(f"latent size {input_size} not divisible by decoder.patch_size {p}")
        if cfg.head_dim % 8:
            raise ValueError(f"decoder head_dim {cfg.head_dim} must be a multiple of 8 (RoPE)")
        self.grid = input_size // p
        self.token_proj = TokenProjection(token_dim, w)
        self.patch_merge = _linear(p * p * c, w)
        # One projection over [token; patches] once they are joined (the official layout).
        self.in_proj = _linear(w, w)
        self.time = TimeMapping(cfg.mapping_width, cfg.mapping_depth, cfg.ff_ratio)
        self.blocks = nn.ModuleList(
            DecoderLayer(w, cfg.head_dim, cfg.ff_ratio, cfg.mapping_width) for _ in range(cfg.depth)
        )
        self.out_norm = RMSNorm(w)
        self.out_proj = _linear(w, p * p * c, zero=True)
        angles = axial_rope_angles(canvas_positions(self.grid), w // cfg.head_dim, cfg.head_dim)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        # Activation checkpointing of every layer (recompute in backward): less memory, ~1/3
        # more decoder compute. Set by the training code; off by default.
        self.grad_checkpointing = False

    @property
    def sizes(self) -> dict[str, int]:
        """The sizes it was built with besides its config (an export records them)."""
        return {
            "token_dim": self.token_dim,
            "in_channels": self.in_channels,
            "input_size": self.input_size,
        }

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, grid², p·p·C), features in (p1 p2 c) order."""
        b, c, h, w = x.shape
        p = self.cfg.patch_size
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        p, c, g = self.cfg.patch_size, self.in_channels, self.grid
        x = x.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        patches = self.patch_merge(self.patchify(x_t))
        token = self.token_proj(z).to(patches.dtype)[:, None]
        h = self.in_proj(torch.cat([token, patches], dim=1))
        c = self.time(t)
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, rope, use_reentrant=False)
            else:
                h = block(h, c, rope)
        # The image token conditions through attention only; it is dropped before the head.
        return self.unpatchify(self.out_proj(self.out_norm(h[:, 1:])))
