"""Stage-2 (class-conditional MLP-Mixer) training step on one device, without Ray: step time,
samples/s, counted FLOPs per sample, MFU against a bf16 matmul peak measured in the same run,
peak memory.

The step is the `paper` mixer's (width 1536, depth 28, 3 tokens): rectified-flow loss on
normalised 768-d tokens with label dropout 0.1, bf16 autocast, fused AdamW, gradient clipping.

    python benchmarks/bench_stage2.py --runs eager:1024,regional:1024,regional:4096 --out s2.json
    python benchmarks/bench_stage2.py --tiny --device cpu --runs eager:8,regional:8   # smoke

Run specs are `mode:batch[:option]`, mode eager | regional (torch.compile per mixer block) |
full (torch.compile of the whole loss). On CUDA the token-mixing MLP runs as the Triton kernels
of `reptok_core/models/fused_token_mix.py` (the default). Options:
  mm     the token-mixing MLP as two matmuls (the official form), for comparison;
  train  the training pipeline's own step (`reptok_core.training.optim.train_step`: lr set, clipping
         with the grad norm kept, EMA update) instead of the bare step;
  graph  the whole step (forward, backward, clipping, AdamW) captured once as a CUDA graph and
         replayed: no per-kernel launch cost (AdamW capturable, autocast without its cast cache).
"""

from __future__ import annotations

import argparse
import time

import _bench_common as bc  # first: puts the repo root on sys.path
import torch

from reptok_core import flow
from reptok_core.config import preset_section
from reptok_core.models.mixer import MixerBlock, MixerConfig, MixerGenerator
from reptok_core.perf import count_flops, measure_matmul_peak, time_calls
from reptok_core.training import optim as training


def batch_of(model: MixerGenerator, b: int, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(1)
    z = torch.randn(b, model.token_dim, device=device, generator=gen)
    y = torch.randint(0, model.cfg.num_classes, (b,), device=device, generator=gen)
    return z, y


def make_loss(model: MixerGenerator, bf16: bool, cast_cache: bool = True):
    def loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        amp = torch.autocast(z.device.type, torch.bfloat16, enabled=bf16, cache_enabled=cast_cache)
        with amp:
            y = model.drop_labels(y)
            return flow.flow_loss(lambda x, t: model(x, t, y), z)

    return loss


def fused_vs_matmul(device: torch.device) -> dict[str, float]:
    """One paper-size mixer block in fp32: fused token mixing vs two matmuls (output, grads)."""
    torch.manual_seed(0)
    cfg = preset_section(MixerConfig, "generator/paper", "model.mixer")
    blk = MixerBlock(cfg.width, cfg.token_hidden, cfg.channel_hidden).to(device)
    for q in blk.parameters():
        torch.nn.init.normal_(q, std=0.05)
    x = torch.randn(64, 3, 1536, device=device)
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


def graphed(body, opt: torch.optim.Optimizer, warmup: int = 3):
    """`body` (one whole training step) captured as a CUDA graph; returns its replay.

    Warm-up runs on a side stream (as torch.cuda.graph requires); grads are set to None before
    the capture so backward allocates them inside the graph's pool and each replay overwrites
    them, which is what zero_grad would have done.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def run_one(model, spec: bc.RunSpec, device, args, fps: float, peak: float) -> dict:
    bf16 = device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    torch._dynamo.reset()
    MixerBlock.fused_token_mix = spec.option != "mm"
    graph = spec.option == "graph"
    loss_fn = make_loss(model, bf16, cast_cache=not graph)
    if spec.mode == "full":
        loss_fn = torch.compile(loss_fn, dynamic=False)
    elif spec.mode == "regional":
        bc.compile_blocks(model.blocks)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), fused=fused, capturable=graph)
    z, y = batch_of(model, spec.batch, device)

    def body() -> None:
        loss_fn(z, y).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()

    def step() -> None:
        body()
        opt.zero_grad(set_to_none=True)

    if spec.option == "train":
        ema = training.EMA(model, 0.9999)

        def losses() -> dict[str, torch.Tensor]:  # train_step opens the autocast itself
            yd = model.drop_labels(y)
            return {"total": flow.flow_loss(lambda x, t: model(x, t, yd), z)}

        def step() -> None:
            training.train_step(model, opt, losses, lr=1e-4, grad_clip=1.0, device=device,
                                precision="bf16" if bf16 else "fp32", ema=ema)  # fmt: skip

    try:
        t0 = time.perf_counter()
        if graph:
            step = graphed(body, opt)
        time_calls(step, device, iters=1)  # compilation / capture happen here
        first = time.perf_counter() - t0
        times = time_calls(step, device, iters=args.steps, warmup=args.warmup)
        if args.profile == spec.name:
            bc.profile_to(step, args.profile_out, device)
    finally:
        bc.uncompile_blocks(model.blocks)
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
    with torch.device(device):
        size = "tiny" if args.tiny else "paper"
        cfg = preset_section(MixerConfig, f"generator/{size}", "model.mixer")
        model = MixerGenerator(cfg, bc.preset_token_dim(size)).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    z, y = batch_of(model, args.flops_batch, device)
    loss_fn = make_loss(model, device.type == "cuda")
    # The fused token-mixing op carries a FLOP formula equal to the two matmuls it replaces.
    fps = count_flops(lambda: loss_fn(z, y).backward()) / args.flops_batch
    model.zero_grad(set_to_none=True)
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
    for spec in bc.parse_runs(args.runs):
        if args.time_budget and res.elapsed() > args.time_budget:
            res.add({"run": spec.name, "status": "skipped (time budget)"})
            continue
        row = bc.guarded(lambda s=spec: run_one(model, s, device, args, fps, peak), device)
        res.add({"run": spec.name, "batch": spec.batch, **row})
    cols = ["run", "status", "step_s", "samples_per_s", "tflops_per_s", "mfu", "peak_mem_gb"]
    bc.print_table(res.doc["runs"], cols + ["first_step_s"])


if __name__ == "__main__":
    main()
