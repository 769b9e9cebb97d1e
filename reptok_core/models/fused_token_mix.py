"""The MLP-Mixer's token-mixing MLP as two Triton kernels (forward, backward) on CUDA.

For x (B, N, C) with N = 3 tokens, the token MLP computes, for every (b, c),
    out[b, :, c] = W2 · gelu(W1 · x[b, :, c] + b1) + b2      (W1: H x N, W2: N x H)
with the exact (erf) GELU of the official RepTok mixer, as reptok_core.models.layers.MLP.
As two matmuls (K = 3 and N = 3) its hidden activation (B, H, C), 85x the block input for
H = 256, goes through memory several times per step, which made it most of the mixer's step
time. These kernels keep the hidden activation in registers: the forward reads x and writes
out; the backward recomputes the hidden units and writes dx plus per-program partial weight
gradients (summed afterwards, deterministic). Same math, fp32 accumulation. Measured on an
H200 (benchmarks/NOTES.md): paper mixer training step 0.076 s vs 0.110 s with the matmuls at
batch 1024.

Exposed as the custom op `reptok::token_mix` (opaque to torch.compile, with a FLOP formula so
`FlopCounterMode` counts it like the two matmuls it replaces).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the matmul path is used
    triton = None

# gelu(u) = u Φ(u) with Φ(u) = 0.5 (1 + erf(u / sqrt 2)) the standard normal CDF, and
# gelu'(u) = Φ(u) + u φ(u) with φ(u) = exp(-u² / 2) / sqrt(2 pi) its density.


def available(x: torch.Tensor, n_tokens: int, hidden: int) -> bool:
    return (
        triton is not None
        and x.is_cuda
        and x.numel() < 2**31  # int32 offsets in the kernels
        and n_tokens == 3
        and hidden <= 1024
    )


if triton is not None:

    @triton.jit
    def _normal_cdf(u):  # gelu(u) = u * _normal_cdf(u)
        return 0.5 * (1.0 + tl.erf(u * 0.7071067811865475))

    @triton.jit
    def _fwd_small_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, C, H: tl.constexpr,
                    BLOCK_C: tl.constexpr):  # fmt: skip
        # For a few samples: a [BLOCK_C, H] tile, all hidden units in parallel, three
        # cross-lane sums. Lower latency than the per-lane loop when there are few programs.
        pid_c = tl.program_id(0)
        b = tl.program_id(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = offs_c < C
        offs_h = tl.arange(0, H)
        base = b * 3 * C
        x0 = tl.load(x_ptr + base + offs_c, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + base + C + offs_c, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + base + 2 * C + offs_c, mask=mask, other=0.0).to(tl.float32)
        w10 = tl.load(w1_ptr + offs_h * 3).to(tl.float32)
        w11 = tl.load(w1_ptr + offs_h * 3 + 1).to(tl.float32)
        w12 = tl.load(w1_ptr + offs_h * 3 + 2).to(tl.float32)
        bb1 = tl.load(b1_ptr + offs_h).to(tl.float32)
        pre = (
            x0[:, None] * w10[None, :]
            + x1[:, None] * w11[None, :]
            + x2[:, None] * w12[None, :]
            + bb1[None, :]
        )
        g = pre * _normal_cdf(pre)
        for j in tl.static_range(3):
            w2j = tl.load(w2_ptr + j * H + offs_h).to(tl.float32)
            oj = tl.sum(g * w2j[None, :], axis=1) + tl.load(b2_ptr + j).to(tl.float32)
            tl.store(out_ptr + base + j * C + offs_c, oj.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fwd_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, C, H: tl.constexpr,
                    BLOCK_C: tl.constexpr):  # fmt: skip
        # One (sample, channel) per lane; the loop over hidden units keeps everything per lane
        # (weights are uniform scalar loads), so there are no cross-thread reductions.
        pid_c = tl.program_id(0)
        b = tl.program_id(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = offs_c < C
        base = b * 3 * C
        x0 = tl.load(x_ptr + base + offs_c, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + base + C + offs_c, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + base + 2 * C + offs_c, mask=mask, other=0.0).to(tl.float32)
        o0 = tl.zeros([BLOCK_C], dtype=tl.float32) + tl.load(b2_ptr).to(tl.float32)
        o1 = tl.zeros([BLOCK_C], dtype=tl.float32) + tl.load(b2_ptr + 1).to(tl.float32)
        o2 = tl.zeros([BLOCK_C], dtype=tl.float32) + tl.load(b2_ptr + 2).to(tl.float32)
        for h in range(H):
            w10 = tl.load(w1_ptr + h * 3).to(tl.float32)
            w11 = tl.load(w1_ptr + h * 3 + 1).to(tl.float32)
            w12 = tl.load(w1_ptr + h * 3 + 2).to(tl.float32)
            pre = x0 * w10 + x1 * w11 + x2 * w12 + tl.load(b1_ptr + h).to(tl.float32)
            g = pre * _normal_cdf(pre)
            o0 += g * tl.load(w2_ptr + h).to(tl.float32)
            o1 += g * tl.load(w2_ptr + H + h).to(tl.float32)
            o2 += g * tl.load(w2_ptr + 2 * H + h).to(tl.float32)
        oty = out_ptr.dtype.element_ty
        tl.store(out_ptr + base + offs_c, o0.to(oty), mask=mask)
        tl.store(out_ptr + base + C + offs_c, o1.to(oty), mask=mask)
        tl.store(out_ptr + base + 2 * C + offs_c, o2.to(oty), mask=mask)

    @triton.jit
    def _bwd_kernel(x_ptr, go_ptr, w1_ptr, b1_ptr, w2_ptr, dx_ptr, part_ptr, B, C,
                    H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
        # A [BLOCK_B samples, BLOCK_C channels] tile stays in registers while the loop walks the
        # hidden units: dx accumulates per lane; each weight gradient is one tile-wide sum per
        # hidden unit, written as this program's partial (summed over programs afterwards).
        pid_c = tl.program_id(0)
        pid_b = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < B)[:, None] & (offs_c < C)[None, :]
        offs = rows[:, None] * 3 * C + offs_c[None, :]
        x0 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + offs + C, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + offs + 2 * C, mask=mask, other=0.0).to(tl.float32)
        g0 = tl.load(go_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g1 = tl.load(go_ptr + offs + C, mask=mask, other=0.0).to(tl.float32)
        g2 = tl.load(go_ptr + offs + 2 * C, mask=mask, other=0.0).to(tl.float32)
        dx0 = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        dx1 = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        dx2 = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        row = part_ptr + (pid_c * tl.num_programs(1) + pid_b) * 7 * H
        for h in range(H):
            w10 = tl.load(w1_ptr + h * 3).to(tl.float32)
            w11 = tl.load(w1_ptr + h * 3 + 1).to(tl.float32)
            w12 = tl.load(w1_ptr + h * 3 + 2).to(tl.float32)
            w20 = tl.load(w2_ptr + h).to(tl.float32)
            w21 = tl.load(w2_ptr + H + h).to(tl.float32)
            w22 = tl.load(w2_ptr + 2 * H + h).to(tl.float32)
            pre = x0 * w10 + x1 * w11 + x2 * w12 + tl.load(b1_ptr + h).to(tl.float32)
            cdf = _normal_cdf(pre)
            g = pre * cdf
            dgelu = cdf + pre * tl.exp(-0.5 * pre * pre) * 0.3989422804014327  # 1 / sqrt(2 pi)
            # Masked lanes have zero output gradient, hence zero dpre and g * go.
            dpre = (g0 * w20 + g1 * w21 + g2 * w22) * dgelu
            dx0 += dpre * w10
            dx1 += dpre * w11
            dx2 += dpre * w12
            tl.store(row + h, tl.sum(dpre * x0))
            tl.store(row + H + h, tl.sum(dpre * x1))
            tl.store(row + 2 * H + h, tl.sum(dpre * x2))
            tl.store(row + 3 * H + h, tl.sum(dpre))
            tl.store(row + 4 * H + h, tl.sum(g * g0))
            tl.store(row + 5 * H + h, tl.sum(g * g1))
            tl.store(row + 6 * H + h, tl.sum(g * g2))
        dty = dx_ptr.dtype.element_ty
        tl.store(dx_ptr + offs, dx0.to(dty), mask=mask)
        tl.store(dx_ptr + offs + C, dx1.to(dty), mask=mask)
        tl.store(dx_ptr + offs + 2 * C, dx2.to(dty), mask=mask)


SMALL_BATCH = 8  # forward batches up to this use the tile kernel, larger the per-lane loop
BWD_BLOCK_B = 8
BWD_BLOCK_C = 128


def forward_impl(x, w1, b1, w2, b2):
    x = x.contiguous()
    bsz, _, c = x.shape
    out = torch.empty_like(x)
    w1, w2, h = w1.contiguous(), w2.contiguous(), w1.shape[0]
    # The tile kernel needs a power-of-two hidden size (tl.arange); the loop kernel takes any.
    if bsz <= SMALL_BATCH and h & (h - 1) == 0:
        # sampling: measured 53 ms vs 90 ms per 50 mixer steps at batch 1-2
        grid = (triton.cdiv(c, 32), bsz)
        _fwd_small_kernel[grid](x, w1, b1, w2, b2, out, c, H=h, BLOCK_C=32, num_warps=8)
    else:
        block_c = 512 if bsz >= 64 else 128
        grid = (triton.cdiv(c, block_c), bsz)
        _fwd_kernel[grid](x, w1, b1, w2, b2, out, c, H=h, BLOCK_C=block_c, num_warps=4)
    return out


def backward_impl(gout, x, w1, b1, w2):
    x, gout = x.contiguous(), gout.contiguous()
    bsz, _, c = x.shape
    h = w1.shape[0]
    nb, nc = triton.cdiv(bsz, BWD_BLOCK_B), triton.cdiv(c, BWD_BLOCK_C)
    dx = torch.empty_like(x)
    part = torch.empty(nc * nb, 7, h, device=x.device, dtype=torch.float32)
    _bwd_kernel[(nc, nb)](x, gout, w1.contiguous(), b1, w2.contiguous(), dx, part, bsz, c,
                          H=h, BLOCK_B=BWD_BLOCK_B, BLOCK_C=BWD_BLOCK_C, num_warps=4)  # fmt: skip
    sums = part.sum(0)  # (7, H); the returns must not alias each other: copy each out
    dw1 = sums[0:3].t().to(w1.dtype, memory_format=torch.contiguous_format, copy=True)
    db1 = sums[3].to(b1.dtype, copy=True)
    dw2 = sums[4:7].to(w2.dtype, copy=True)
    db2 = gout.float().sum((0, 2)).to(w2.dtype)
    return dx, dw1, db1, dw2, db2


@torch.library.custom_op("reptok::token_mix", mutates_args=())
def token_mix(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    return forward_impl(x, w1, b1, w2, b2)


@token_mix.register_fake
def _(x, w1, b1, w2, b2):
    return torch.empty_like(x)


@torch.library.custom_op("reptok::token_mix_backward", mutates_args=())
def token_mix_backward(
    gout: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_impl(gout, x, w1, b1, w2)


@token_mix_backward.register_fake
def _(gout, x, w1, b1, w2):
    n = w2.shape[0]
    return (
        torch.empty_like(x),
        torch.empty_like(w1),
        torch.empty_like(b1),
        torch.empty_like(w2),
        w2.new_empty(n),
    )


def _setup(ctx, inputs, output):
    x, w1, b1, w2, _ = inputs
    ctx.save_for_backward(x, w1, b1, w2)


def _backward(ctx, gout):
    x, w1, b1, w2 = ctx.saved_tensors
    return token_mix_backward(gout, x, w1, b1, w2)


token_mix.register_autograd(_backward, setup_context=_setup)


@register_flop_formula(torch.ops.reptok.token_mix)
def _token_mix_flops(x_shape, w1_shape, *args, **kwargs) -> int:
    bsz, n, c = x_shape
    return 2 * 2 * bsz * c * n * w1_shape[0]  # the two matmuls it replaces


@register_flop_formula(torch.ops.reptok.token_mix_backward)
def _token_mix_backward_flops(gout_shape, x_shape, w1_shape, *args, **kwargs) -> int:
    bsz, n, c = x_shape
    return 2 * 2 * 2 * bsz * c * n * w1_shape[0]  # dgrad + wgrad of both matmuls
