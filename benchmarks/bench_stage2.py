"""Stage-2 (class-conditional MLP-Mixer) training step on one device, without Ray: step time,
samples/s, counted FLOPs per sample, MFU against a bf16 matmul peak measured in the same run,
peak memory.

The step is the product's (`reptok_core.training.optim.train_step`: lr, bf16 autocast, clipping
with the grad norm kept, fused AdamW, EMA) on `GeneratorTask.loss` (rectified-flow loss with
label dropout 0.1) of the `paper` mixer (width 1536, depth 28, 3 tokens) on 768-d tokens.

    python benchmarks/bench_stage2.py --runs eager:1024,regional:1024,regional:4096 --out s2.json
    python benchmarks/bench_stage2.py --tiny --device cpu --runs eager:8,regional:8   # smoke

Run specs are `mode:batch[:option]`, mode eager | regional (torch.compile per mixer block) |
full (torch.compile of the whole loss). On CUDA the token-mixing MLP runs as the Triton kernels
of `reptok_core/models/fused_token_mix.py` (the default). Options:
  mm     the token-mixing MLP as two matmuls (the official form), for comparison;
  graph  the step as the training loop captures it on one GPU
         (`reptok_core.training.cuda_graph_step.CudaGraphStep`): forward, backward, clipping,
         AdamW and EMA captured once and replayed, no per-kernel launch cost.
"""

from __future__ import annotations

import argparse
import time

import _bench_common as bc  # first: puts the repo root on sys.path
import torch

from reptok_core.config import preset_section
from reptok_core.formats.token_stats import TokenNormalizer
from reptok_core.models.generator import GeneratorConfig
from reptok_core.models.mixer import MixerBlock, MixerConfig
from reptok_core.perf import count_flops, measure_matmul_peak, time_calls
from reptok_core.stages.generator import GeneratorTask
from reptok_core.training.cuda_graph_step import CudaGraphStep
from reptok_core.training.optim import EMA, OptimConfig, build_optimizer, train_step

OPTIM = OptimConfig(lr=1e-4, warmup_steps=0)


def batch_of(task: GeneratorTask, b: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(1)
    z = torch.randn(b, task.model.token_dim, device=device, generator=gen)
    y = torch.randint(0, task.cfg.mixer.num_classes, (b,), device=device, generator=gen)
    return {"token": z, "label": y}


def fused_vs_matmul(device: torch.device) -> dict[str, float]:
    """One paper-size mixer block in fp32: fused token mixing vs two matmuls (output, grads)."""
    torch.manual_seed(0)
    cfg = preset_section(MixerConfig, "generator/paper", "model.mixer")
    blk = MixerBlock(cfg.width, cfg.token_hidden, cfg.channel_hidden).to(device)
    for q in blk.parameters():
        torch.nn.init.normal_(q, std=0.05)
    x = torch.randn(64, 3, cfg.width, device=device)
    res = {}
    for fused in (False, True):
        MixerBlock.fused_token_mix = fused
        xi = x.clone().requires_grad_(True)
        out = blk(xi)
        grads = torch.autograd.grad(out.square().sum(), [xi, *blk.token_mix.parameters()])
        res[fused] = [out, *grads]
    MixerBlock.fused_token_mix = True
    names = ["out", "dx", "d_fc1_w", "d_fc1_b", "d_fc2_w", "d_fc2_b"]
    return {
        n: ((a - b).norm() / b.norm()).item()
        for n, a, b in zip(names, res[True], res[False], strict=True)
    }


def run_one(task, spec: bc.RunSpec, device, args, fps: float, peak: float) -> dict:
    model = task.model
    torch._dynamo.reset()
    MixerBlock.fused_token_mix = spec.option != "mm"
    loss_fn = task.loss
    if spec.mode == "full":
        loss_fn = torch.compile(loss_fn, dynamic=False)
    elif spec.mode == "regional":
        bc.compile_blocks(task.blocks())
    opt = build_optimizer(model.parameters(), OPTIM, device)
    kw = dict(grad_clip=OPTIM.grad_clip, device=device, ema=EMA(model, OPTIM.ema_decay),
              precision="bf16" if device.type == "cuda" else "fp32")  # fmt: skip
    batch = batch_of(task, spec.batch, device)
    if spec.option == "graph":
        graphed = CudaGraphStep(model, opt, loss_fn, **kw)

        def step() -> None:
            graphed(batch, OPTIM.lr)
    else:

        def step() -> None:
            train_step(model, opt, lambda: loss_fn(batch), lr=OPTIM.lr, **kw)

    try:
        t0 = time.perf_counter()
        # compilation (and, for graph, the eager warm-up steps and the capture) happen here
        time_calls(step, device, iters=4 if spec.option == "graph" else 1)
        first = time.perf_counter() - t0
        times = time_calls(step, device, iters=args.steps, warmup=args.warmup)
        if args.profile == spec.name:
            bc.profile_to(step, args.profile_out, device)
    finally:
        bc.uncompile_blocks(task.blocks())
        model.zero_grad(set_to_none=True)
    return bc.step_result(times, first, spec.batch, fps, peak, device, "samples_per_s")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", default="regional:1024,regional:1024:mm,regional:4096")
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--flops-batch", type=int, default=64)
    p.add_argument("--time-budget", type=float, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--profile", default="", help="run spec to profile (top kernels) after timing")
    p.add_argument("--profile-out", default="profile_stage2.txt")
    args = p.parse_args()
    device = bc.pick_device(args.device)

    check = fused_vs_matmul(device) if device.type == "cuda" else None
    peak = measure_matmul_peak(device)
    torch.manual_seed(0)
    size = "tiny" if args.tiny else "paper"
    cfg = preset_section(GeneratorConfig, f"generator/{size}")
    task = GeneratorTask(cfg, TokenNormalizer.identity(bc.preset_token_dim(size)), device)
    task.model.train()
    n_params = sum(p.numel() for p in task.model.parameters())
    batch = batch_of(task, args.flops_batch, device)
    # The fused token-mixing op carries a FLOP formula equal to the two matmuls it replaces.
    fps = count_flops(lambda: task.loss(batch)["total"].backward()) / args.flops_batch
    task.model.zero_grad(set_to_none=True)
    res = bc.Results(
        args.out,
        {
            "bench": "stage2",
            "preset": "tiny" if args.tiny else "paper",
            "env": bc.environment(device),
            "fused_vs_matmul_rel_err": check,
            "matmul_peak_tflops": peak / 1e12,
            "params_m": n_params / 1e6,
            "flops_per_sample_g": fps / 1e9,
        },
    )
    print(f"peak {peak / 1e12:.1f} TFLOP/s, {fps / 1e9:.2f} GFLOP/sample, {n_params / 1e6:.0f}M")
    res.run_specs(
        bc.parse_runs(args.runs),
        lambda spec: run_one(task, spec, device, args, fps, peak),
        device,
        args.time_budget,
        "samples_per_s",
    )


if __name__ == "__main__":
    main()
