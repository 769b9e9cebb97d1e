"""The stage-2 training step exactly as the pipeline runs it on one GPU (without Ray):
`GeneratorTask.loss` on in-memory token batches, `training.train_step` (lr, clipping, fused
AdamW, EMA) eagerly, or `cuda_graph_step.CudaGraphStep` (loop.cuda_graph=auto), with or
without regional compilation (loop.compile). Two parts:

check  the graphed step against the eager one from the same weights and RNG state, on the
       small class- and text-conditioned generators, 12 steps over alternating batches and a changing lr: the
       largest relative difference of the weights, the EMA and the reported losses;
bench  the `paper` mixer (or text generator, --kind text): step time, samples/s, MFU against a bf16 matmul peak measured here.

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
from torch.nn.attention import SDPBackend, sdpa_kernel

from reptok_core.config import preset_section
from reptok_core.formats.token_stats import TokenNormalizer
from reptok_core.models.generator import GeneratorConfig
from reptok_core.perf import count_flops, measure_matmul_peak, time_calls
from reptok_core.stages.generator import GeneratorTask
from reptok_core.training.cuda_graph_step import CudaGraphStep
from reptok_core.training.optim import EMA, OptimConfig, build_optimizer, train_step

OPTIM = OptimConfig(lr=1e-4, warmup_steps=5)


def make_task(preset: str, rows: int, device: torch.device, kind: str = "class", **mixer):
    """A GeneratorTask on random in-memory tokens of the preset's width; text: 64 cached
    captions of 16 MiniLM-wide (384) states."""
    cfg = preset_section(GeneratorConfig, f"generator/{preset}")
    cfg.kind = kind
    cfg.mixer = dataclasses.replace(cfg.mixer, **mixer)
    dim = bc.preset_token_dim(preset)
    gen = torch.Generator().manual_seed(0)
    data = {
        "token": torch.randn(rows, dim, generator=gen) * 2 + 1,
        "token_flip": torch.randn(rows, dim, generator=gen) * 2 + 1,
    }
    captions = None
    if kind == "class":
        data["label"] = torch.randint(0, cfg.mixer.num_classes, (rows,), generator=gen)
    else:
        data["caption_idx"] = torch.randint(0, 64, (rows,), generator=gen)
        lengths = torch.randint(3, 17, (64,), generator=gen)
        mask = torch.arange(16)[None] < lengths[:, None]
        captions = (torch.randn(64, 16, 384, generator=gen), mask)
    norm = TokenNormalizer(torch.ones(dim), 2 * torch.ones(dim))
    torch.manual_seed(0)
    return GeneratorTask(cfg, norm, device, data=data, captions=captions)


def stepper(task: GeneratorTask, device: torch.device, graph: bool):
    """(step(batch, lr) -> outputs, ema) as the training loop (reptok_core/training/loop.py) builds them."""
    opt = build_optimizer(task.model.parameters(), OPTIM, device)
    ema = EMA(task.model, 0.999)
    kw = dict(grad_clip=1.0, device=device, precision="bf16", ema=ema)
    if graph:
        return CudaGraphStep(task.model, opt, lambda b: task.loss(b), **kw), ema

    def step(batch, lr):
        return train_step(task.model, opt, lambda: task.loss(batch), lr=lr, **kw)

    return step, ema


def check(device: torch.device, kind: str, steps: int = 12) -> dict[str, float]:
    """Graphed vs eager from identical weights and RNG: relative differences after `steps`."""
    base = make_task("small", 256, device, kind)
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


def time_mode(task: GeneratorTask, b: int, mode: str, fps: float, peak: float, args) -> dict:
    device = task.device
    step, _ = stepper(task, device, mode.endswith("graph"))
    if args.sdpa:  # the attention backends SDPA may pick, for the whole step
        backends = [getattr(SDPBackend, name.upper()) for name in args.sdpa.split("+")]
        step = _with_backends(step, backends)
    batches = list(task.epoch_batches(0, b, seed=0))
    calls = iter(range(10**9))
    times = time_calls(lambda: step(batches[next(calls) % len(batches)], 1e-4), device,
                       iters=args.steps, warmup=args.warmup)  # fmt: skip
    if args.profile == f"{args.kind}:{mode}:{b}":
        bc.profile_to(lambda: step(batches[0], 1e-4), args.profile_out, device)
    return bc.step_result(times, 0.0, b, fps, peak, device, "samples_per_s")


def _with_backends(step, backends):
    def wrapped(batch, lr):
        with sdpa_kernel(backends):
            return step(batch, lr)

    return wrapped


def flops_per_sample(task: GeneratorTask, b: int) -> float:
    batch = {k: v.to(task.device) for k, v in next(task.epoch_batches(0, b, seed=0)).items()}
    flops = count_flops(lambda: task.loss(batch)["total"].backward())
    task.model.zero_grad(set_to_none=True)
    return flops / b


def bench(args, device, peak: float, res: bc.Results) -> None:
    preset = "tiny" if args.tiny else "paper"
    for b in (int(x) for x in args.batches.split(",")):
        task = make_task(preset, b * 4, device, args.kind)
        fps = flops_per_sample(task, b)
        for mode in args.modes.split(","):
            if mode.startswith("regional"):
                bc.compile_blocks(task.model.blocks)
            run = functools.partial(time_mode, task, b, mode, fps, peak, args)
            row = bc.guarded(run, device)
            bc.uncompile_blocks(task.model.blocks)
            res.add(
                {"run": f"{args.kind}:{mode}:{b}", "batch": b, "gflop_per_sample": fps / 1e9, **row}
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", default="1024", help="comma-separated batch sizes")
    p.add_argument("--modes", default="eager,graph,regional,regional+graph",
                   help="eager | graph | regional | regional+graph, comma-separated")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="the tiny model instead of `paper`")
    p.add_argument("--kind", default="class", help="generator timed: 'class' (mixer) or 'text'")
    p.add_argument(
        "--sdpa", default="", help="SDPA backends allowed, e.g. efficient_attention+math"
    )
    p.add_argument("--skip-check", action="store_true", help="only time (no graph-vs-eager check)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (incl. capture)")
    p.add_argument("--out", default="", help="JSON results file")
    p.add_argument("--profile", default="", help="run to profile after timing, e.g. text:eager:256")
    p.add_argument("--profile-out", default="profile_graph_step.txt", help="top-kernels table")
    args = p.parse_args()
    device = torch.device("cuda")
    peak = measure_matmul_peak(device)
    res = bc.Results(args.out, {"env": bc.environment(device), "peak_tflops": peak / 1e12})
    if not args.skip_check:
        res.doc["graph_vs_eager"] = chk = {k: check(device, k) for k in ("class", "text")}
        print("graph vs eager:", chk, flush=True)
    bench(args, device, peak, res)
    cols = ["run", "status", "step_s", "samples_per_s", "tflops_per_s", "mfu", "peak_mem_gb"]
    bc.print_table(res.doc["runs"], cols)


if __name__ == "__main__":
    main()
