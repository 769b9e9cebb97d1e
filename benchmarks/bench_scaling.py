"""FSDP2 scaling of the stage-1 and stage-2 training steps under torchrun, without Ray: the
product's step (reptok_core.training.optim.train_step, with EMA) on the stages' real losses
(TokenizerTask: flow + cosine term; GeneratorTask: flow with label dropout).

Performance (GPUs; same per-GPU batch for every N):
    torchrun --nproc_per_node=N benchmarks/bench_scaling.py perf --stage 1 --preset paper --batch 64
Correctness (gloo on CPU works everywhere):
    torchrun --nproc_per_node=2 benchmarks/bench_scaling.py check --stage 1 --preset tiny --out /tmp/n2.json --ckpt /tmp/ck
    torchrun --nproc_per_node=1 benchmarks/bench_scaling.py check --stage 1 --preset tiny --out /tmp/n1.json --load /tmp/ck
`check` runs one optimizer step on a fixed global batch split across ranks and records the loss
before and after (each sample's t, noise and label dropout seeded by its index in the global
batch, so they do not depend on N); `--ckpt` writes the loop's checkpoint
(training/checkpoints.write_checkpoint), and `--load` evaluates the loss of one written at another
world size (resharded on load). Equal numbers across N show the sharded step is the same step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _bench_common as bc  # noqa: E402

from reptok_core.config import preset_section  # noqa: E402
from reptok_core.formats.token_stats import TokenNormalizer  # noqa: E402
from reptok_core.models.generator import GeneratorConfig  # noqa: E402
from reptok_core.models.tokenizer import TokenizerConfig  # noqa: E402
from reptok_core.stages.generator import GeneratorTask  # noqa: E402
from reptok_core.stages.tokenizer import TokenizerTask  # noqa: E402
from reptok_core.training.checkpoints import read_checkpoint, write_checkpoint  # noqa: E402
from reptok_core.training.distributed import init_from_env, is_distributed, world  # noqa: E402
from reptok_core.training.optim import EMA, OptimConfig, build_optimizer, train_step  # noqa: E402


class Stage:
    """The stage's real training task (stages.tokenizer.TokenizerTask: flow + cosine loss;
    stages.generator.GeneratorTask: flow loss with label dropout) and a fixed, seeded global
    batch, of which each rank takes its contiguous share."""

    def __init__(self, stage: int, preset: str, global_batch: int, device: torch.device):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(123)
        if stage == 1:
            cfg = preset_section(TokenizerConfig, f"tokenizer/{preset}")
            cfg.encoder.weights = "random"
            # The paper preset's SD-VAE needs diffusers weights; latents are given precomputed here.
            self.task = TokenizerTask(cfg, device, latent_space=bc.PrecomputedLatents(cfg.latent))
            s = cfg.image_size
            latents = torch.randn(global_batch, *self.task.model.latent_shape(), generator=gen)
            self.batch = {
                "image": torch.randint(0, 256, (global_batch, s, s, 3), generator=gen).byte(),
                "vae_latent": latents.flatten(1),
            }
        else:
            cfg = preset_section(GeneratorConfig, f"generator/{preset}")
            dim = bc.preset_token_dim(preset)
            self.task = GeneratorTask(cfg, TokenNormalizer.identity(dim), device)
            self.batch = {
                "token": torch.randn(global_batch, dim, generator=gen),
                "label": torch.randint(0, cfg.mixer.num_classes, (global_batch,), generator=gen),
            }
        self.model = self.task.model

    def local(self, rank: int, world_size: int) -> tuple[int, dict[str, torch.Tensor]]:
        """(index of this rank's first sample, this rank's share of the global batch)."""
        n = len(next(iter(self.batch.values()))) // world_size
        return rank * n, {k: v[rank * n : (rank + 1) * n] for k, v in self.batch.items()}

    def loss(self, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        """The task's loss on this rank's share."""
        return self.task.loss(self.local(rank, world_size)[1])

    def seeded_loss(self, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        """The task's loss averaged over this rank's samples one by one, the RNG seeded by the
        sample's global index before each: its random t, noise and label dropout are then
        the same at every world size, so steps at different world sizes can be compared."""
        first, batch = self.local(rank, world_size)
        parts = []
        for i in range(len(next(iter(batch.values())))):
            torch.manual_seed(1000 + first + i)
            parts.append(self.task.loss({k: v[i : i + 1] for k, v in batch.items()}))
        return {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}


def global_mean(v: torch.Tensor) -> float:
    v = v.detach().float().clone()
    if is_distributed():
        dist.all_reduce(v, op=dist.ReduceOp.AVG)
    return v.item()


def check(args: argparse.Namespace, device: torch.device) -> dict:
    rank, ws = world()
    st = Stage(args.stage, args.preset, args.global_batch, device)
    if is_distributed():
        st.task.shard()
    ocfg = OptimConfig(lr=1e-3, warmup_steps=0, grad_clip=1.0)
    opt = build_optimizer(st.model.parameters(), ocfg, device)
    ema = EMA(st.model, ocfg.ema_decay)
    out: dict = {"world_size": ws}
    if args.load:
        read_checkpoint(args.load, st.model, opt, ema)
        with torch.no_grad():
            out["loaded_loss"] = global_mean(st.seeded_loss(rank, ws)["total"])
        return out
    res = train_step(
        st.model,
        opt,
        lambda: st.seeded_loss(rank, ws),
        lr=ocfg.lr,
        grad_clip=ocfg.grad_clip,
        device=device,
        precision="fp32",
        ema=ema,
    )
    out["loss_before"] = global_mean(res["total"])
    out["grad_norm"] = res["grad_norm"].item()
    with torch.no_grad():
        after = st.seeded_loss(rank, ws)
    out["loss_after"] = global_mean(after["total"])
    out["terms_after"] = {k: global_mean(v) for k, v in after.items()}  # stage 1: flow, cos, ...
    if args.ckpt:
        os.makedirs(args.ckpt, exist_ok=True)
        write_checkpoint(args.ckpt, st.model, opt, ema, {"step": 1})
    return out


def perf(args: argparse.Namespace, device: torch.device) -> dict:
    rank, ws = world()
    st = Stage(args.stage, args.preset, args.batch * ws, device)
    if is_distributed():
        st.task.shard()
    if args.compile:
        for b in st.task.blocks():
            b.compile()
    ocfg = OptimConfig(lr=1e-4, warmup_steps=0)
    opt = build_optimizer(st.model.parameters(), ocfg, device)
    ema = EMA(st.model, ocfg.ema_decay)
    precision = "bf16" if device.type == "cuda" else "fp32"

    def step() -> None:
        train_step(
            st.model,
            opt,
            lambda: st.loss(rank, ws),
            lr=ocfg.lr,
            grad_clip=ocfg.grad_clip,
            device=device,
            precision=precision,
            ema=ema,
        )

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.iters
    return {
        "world_size": ws,
        "stage": args.stage,
        "preset": args.preset,
        "batch_per_gpu": args.batch,
        "step_s": dt,
        "images_per_s_per_gpu": args.batch / dt,
        "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("mode", choices=["check", "perf"])
    p.add_argument("--stage", type=int, choices=[1, 2], default=1)
    p.add_argument("--preset", default="tiny", help="model preset: tiny, small or paper")
    p.add_argument(
        "--global-batch", type=int, default=8, help="check: global batch split across ranks"
    )
    p.add_argument("--batch", type=int, default=32, help="perf: batch per GPU")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--ckpt", default="", help="check: write a sharded checkpoint here after the step"
    )
    p.add_argument(
        "--load",
        default="",
        help="check: load this checkpoint (any world size) and report its loss",
    )
    p.add_argument("--out", default="", help="write the rank-0 JSON result here")
    args = p.parse_args()
    device = init_from_env()
    result = (check if args.mode == "check" else perf)(args, device)
    if world()[0] == 0:
        print(json.dumps(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
