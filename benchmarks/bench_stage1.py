"""Stage-1 (tokenizer) training step on one device, without Ray: step time, images/s, counted
FLOPs per image, MFU against a bf16 matmul peak measured in the same run, peak memory.

The step is the product's (`reptok_core.training.optim.train_step`: bf16 autocast, clipping at
1.0, fused AdamW, EMA) on `TokenizerTask.loss` (flow + cosine term) of the `paper` preset:
DINOv2-B/14-reg4 at 224 px with only `cls_token` trainable (forward + backward to the cls
token), its frozen target copy (forward, no grad), and the XL decoder on 4x32x32 SD-VAE latents
given precomputed (uint8 images 256 px). Random weights (`EncoderConfig(weights="random")`).

    python benchmarks/bench_stage1.py --runs eager:128,regional:256,full:256 --out s1.json
    python benchmarks/bench_stage1.py --tiny --device cpu --runs eager:4,regional:4   # smoke

Run specs are `mode:batch[:option]`, mode eager | regional (torch.compile per block) | full
(torch.compile of the whole loss); option `ac` = activation checkpointing of the decoder
blocks, `cudnn` / `flash` = force that SDPA backend (PyTorch picks cuDNN by default here).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import _bench_common as bc  # first: puts the repo root on sys.path
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from reptok_core.config import preset_section
from reptok_core.models.encoder import EncoderConfig
from reptok_core.models.tokenizer import Tokenizer, TokenizerConfig
from reptok_core.perf import count_flops, measure_matmul_peak, time_calls
from reptok_core.stages.tokenizer import TokenizerTask
from reptok_core.training.optim import EMA, OptimConfig, build_optimizer, train_step

OPTIM = OptimConfig(lr=1e-4, warmup_steps=0)


def build(tiny: bool, device: torch.device) -> TokenizerTask:
    cfg = preset_section(TokenizerConfig, "tokenizer/tiny" if tiny else "tokenizer/paper")
    cfg.encoder = EncoderConfig(**{**cfg.encoder.__dict__, "weights": "random"})
    latents = bc.PrecomputedLatents(cfg.latent)
    torch.manual_seed(0)
    with torch.device(device):
        task = TokenizerTask(cfg, device, latent_space=latents)
    task.model.train()
    return task


def blocks_of(model: Tokenizer) -> list[torch.nn.Module]:
    enc = model.encoder
    return [*model.decoder.blocks, *enc.vit.blocks, *enc.frozen.blocks]


def batch_of(task: TokenizerTask, b: int, device: torch.device) -> dict[str, torch.Tensor]:
    """uint8 images and their precomputed latents, as the images Parquet gives them."""
    s = task.cfg.image_size
    gen = torch.Generator(device=device).manual_seed(1)
    images = torch.randint(0, 256, (b, s, s, 3), device=device, generator=gen).byte()
    latents = torch.randn(b, *task.model.latent_shape(), device=device, generator=gen)
    return {"image": images, "vae_latent": latents.flatten(1)}


def flops_per_image(task: TokenizerTask, device: torch.device, batch: int) -> float:
    """Counted on one eager forward + backward (the work the compiled step must also do)."""
    b = batch_of(task, batch, device)
    flops = count_flops(lambda: task.loss(b)["total"].backward())
    task.model.zero_grad(set_to_none=True)
    return flops / batch


def run_one(task, spec: bc.RunSpec, device, args, fpi: float, peak: float) -> dict:
    model = task.model
    torch._dynamo.reset()
    model.decoder.grad_checkpointing = spec.option == "ac"
    loss_fn = task.loss
    if spec.mode == "full":
        loss_fn = torch.compile(loss_fn, dynamic=False)
    elif spec.mode == "regional":
        bc.compile_blocks(blocks_of(model))
    opt = build_optimizer(model.parameters(), OPTIM, device)
    ema = EMA(model, OPTIM.ema_decay)
    precision = "bf16" if device.type == "cuda" else "fp32"
    batch = batch_of(task, spec.batch, device)

    def step() -> None:
        train_step(model, opt, lambda: loss_fn(batch), lr=OPTIM.lr, grad_clip=OPTIM.grad_clip,
                   device=device, precision=precision, ema=ema)  # fmt: skip

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    attn = sdpa_kernel([backends[spec.option]]) if spec.option in backends else nullcontext()
    try:
        with attn:
            first = time_calls(step, device, iters=1)[0]  # includes compilation
            times = time_calls(step, device, iters=args.steps, warmup=args.warmup)
            if args.profile == spec.name:
                bc.profile_to(step, args.profile_out, device)
    finally:
        bc.uncompile_blocks(blocks_of(model))
        model.decoder.grad_checkpointing = False
        model.zero_grad(set_to_none=True)
    return bc.step_result(times, first, spec.batch, fpi, peak, device, "images_per_s")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", default="eager:128,regional:128,regional:256")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny preset (CPU smoke test)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p.add_argument("--flops-batch", type=int, default=8, help="batch of the FLOP-count step")
    p.add_argument("--time-budget", type=float, default=0, help="skip runs after this many s")
    p.add_argument("--out", default="", help="JSON results (rewritten after every run)")
    p.add_argument("--profile", default="", help="run spec to profile (top kernels) after timing")
    p.add_argument("--profile-out", default="profile_stage1.txt")
    args = p.parse_args()
    device = bc.pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    peak = measure_matmul_peak(device)
    task = build(args.tiny, device)
    n_dec = sum(p.numel() for p in task.model.decoder.parameters())
    fpi = flops_per_image(task, device, args.flops_batch)
    res = bc.Results(
        args.out,
        {
            "bench": "stage1",
            "preset": "tiny" if args.tiny else "paper",
            "env": bc.environment(device),
            "matmul_peak_tflops": peak / 1e12,
            "decoder_params_m": n_dec / 1e6,
            "flops_per_image_g": fpi / 1e9,
        },
    )
    print(
        f"peak {peak / 1e12:.1f} TFLOP/s, {fpi / 1e9:.1f} GFLOP/image, decoder {n_dec / 1e6:.0f}M"
    )
    res.run_specs(
        bc.parse_runs(args.runs),
        lambda spec: run_one(task, spec, device, args, fpi, peak),
        device,
        args.time_budget,
        "images_per_s",
    )


if __name__ == "__main__":
    main()
