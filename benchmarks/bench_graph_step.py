"""The stage-2 training step exactly as the pipeline runs it on one GPU (without Ray):
`GeneratorTask.loss` on in-memory token batches, `training.train_step` (lr, clipping, fused
AdamW, EMA) eagerly, or `cuda_graph_step.CudaGraphStep` (loop.cuda_graph=auto), with or
without regional compilation (loop.compile). Two parts:

check  the graphed step against the eager one from the same weights and RNG state, on a small
       class-conditional generator, 12 steps over alternating batches and a changing lr: the
       largest relative difference of the weights, the EMA and the reported losses;
bench  the `paper` mixer: step time, samples/s, MFU against a bf16 matmul peak measured here.

    python benchmarks/bench_graph_step.py --batches 1024,2048 --out graph_step.json
    python benchmarks/bench_graph_step.py --tiny --batches 64 --steps 5     # quick GPU check
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools

import _bench_common as bc  # first: puts the repo root on sys.path
import torch

from reptok_core.cuda_graph_step import CudaGraphStep
from reptok_core.generator_task import GeneratorTask, generator_preset
from reptok_core.perf import count_flops, measure_matmul_peak, time_calls
from reptok_core.token_stats import TokenNormalizer
from reptok_core.training import EMA, OptimConfig, build_optimizer, train_step

OPTIM = OptimConfig(lr=1e-4, warmup_steps=5)


def make_task(preset: str, rows: int, device: torch.device, **mixer) -> GeneratorTask:
    cfg = generator_preset(preset)
    cfg.mixer = dataclasses.replace(cfg.mixer, **mixer)
    gen = torch.Generator().manual_seed(0)
    data = {
        "token": torch.randn(rows, cfg.mixer.token_dim, generator=gen) * 2 + 1,
        "token_flip": torch.randn(rows, cfg.mixer.token_dim, generator=gen) * 2 + 1,
        "label": torch.randint(0, cfg.mixer.num_classes, (rows,), generator=gen),
    }
    norm = TokenNormalizer(torch.ones(cfg.mixer.token_dim), 2 * torch.ones(cfg.mixer.token_dim))
    torch.manual_seed(0)
    return GeneratorTask(cfg, norm, device, data=data)


def stepper(task: GeneratorTask, device: torch.device, graph: bool):
    """(step(batch, lr) -> outputs, ema) as train_loop builds them."""
    opt = build_optimizer(task.model.parameters(), OPTIM, device)
    ema = EMA(task.model, 0.999)
    kw = dict(grad_clip=1.0, device=device, precision="bf16", ema=ema)
    if graph:
        return CudaGraphStep(task.model, opt, lambda b: task.loss(b), **kw), ema

    def step(batch, lr):
        return train_step(task.model, opt, lambda: task.loss(batch), lr=lr, **kw)

    return step, ema


def check(device: torch.device, steps: int = 12) -> dict[str, float]:
    """Graphed vs eager from identical weights and RNG: relative differences after `steps`."""
    base = make_task("small", 256, device, token_mlp_dim=9)
    batches = list(base.epoch_batches(0, 64, seed=0))[:2]
    results = {}
    for graph in (False, True):
        task = copy.deepcopy(base)
        step, ema = stepper(task, device, graph)
        torch.manual_seed(123)
        torch.cuda.manual_seed(123)
        losses = [step(batches[i % 2], 1e-4 * (i + 1))["total"].item() for i in range(steps)]
        flat = torch.cat([p.detach().flatten() for p in task.model.parameters()])
        shadow = torch.cat([v.flatten() for v in ema.shadow.values()])
        results[graph] = (flat, shadow, torch.tensor(losses), getattr(step, "replays", 0))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    (pe, ee, le, _), (pg, eg, lg, replays) = results[False], results[True]
    start = torch.cat([p.detach().flatten() for p in base.model.parameters()])
    return {
        "steps": steps,
        "replayed_steps": replays,
        "params_rel": rel(pg, pe),
        "ema_rel": rel(eg, ee),
        "losses_rel": rel(lg, le),
        "params_moved_rel": rel(pe, start),  # how far training moved them: the scale to beat
    }


def time_mode(task: GeneratorTask, b: int, graph: bool, fps: float, peak: float, args) -> dict:
    device = task.device
    step, _ = stepper(task, device, graph)
    batches = list(task.epoch_batches(0, b, seed=0))
    calls = iter(range(10**9))
    times = time_calls(lambda: step(batches[next(calls) % len(batches)], 1e-4), device,
                       iters=args.steps, warmup=args.warmup)  # fmt: skip
    return bc.step_result(times, 0.0, b, fps, peak, device, "samples_per_s")


def flops_per_sample(task: GeneratorTask, b: int) -> float:
    batch = {k: v.to(task.device) for k, v in next(task.epoch_batches(0, b, seed=0)).items()}
    flops = count_flops(lambda: task.loss(batch)["total"].backward())
    task.model.zero_grad(set_to_none=True)
    return flops / b


def bench(args, device, peak: float, res: bc.Results) -> None:
    preset = "tiny" if args.tiny else "paper"
    for b in (int(x) for x in args.batches.split(",")):
        task = make_task(preset, b * 4, device)
        fps = flops_per_sample(task, b)
        for mode in args.modes.split(","):
            if mode.startswith("regional"):
                bc.compile_blocks(task.model.blocks)
            run = functools.partial(time_mode, task, b, mode.endswith("graph"), fps, peak, args)
            row = bc.guarded(run, device)
            bc.uncompile_blocks(task.model.blocks)
            res.add({"run": f"{mode}:{b}", "batch": b, "gflop_per_sample": fps / 1e9, **row})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", default="1024", help="comma-separated batch sizes")
    p.add_argument("--modes", default="eager,graph,regional,regional+graph",
                   help="eager | graph | regional | regional+graph, comma-separated")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="the tiny mixer instead of `paper`")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (incl. capture)")
    p.add_argument("--out", default="", help="JSON results file")
    args = p.parse_args()
    device = torch.device("cuda")
    peak = measure_matmul_peak(device)
    res = bc.Results(args.out, {"env": bc.environment(device), "peak_tflops": peak / 1e12})
    res.doc["graph_vs_eager"] = chk = check(device)
    print("graph vs eager:", chk, flush=True)
    bench(args, device, peak, res)
    cols = ["run", "status", "step_s", "samples_per_s", "tflops_per_s", "mfu", "peak_mem_gb"]
    bc.print_table(res.doc["runs"], cols)


if __name__ == "__main__":
    main()
