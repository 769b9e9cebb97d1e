"""FSDP2 scaling of the stage-1 and stage-2 training steps under torchrun, without Ray.

Performance (GPUs; same per-GPU batch for every N):
    torchrun --nproc_per_node=N benchmarks/bench_scaling.py perf --stage 1 --preset paper --batch 64
Correctness (gloo on CPU works everywhere):
    torchrun --nproc_per_node=2 benchmarks/bench_scaling.py check --stage 1 --preset tiny --out /tmp/n2.json --ckpt /tmp/ck
    torchrun --nproc_per_node=1 benchmarks/bench_scaling.py check --stage 1 --preset tiny --out /tmp/n1.json --load /tmp/ck
`check` runs one optimizer step on a fixed global batch split across ranks and records the loss
before and after; with `--load` it first evaluates the loss of a checkpoint written at another
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

from reptok_core import flow  # noqa: E402
from reptok_core.config import preset_section  # noqa: E402
from reptok_core.models.mixer import MixerConfig, MixerGenerator  # noqa: E402
from reptok_core.models.tokenizer import Tokenizer, TokenizerConfig  # noqa: E402
from reptok_core.training.distributed import (  # noqa: E402
    init_from_env,
    is_distributed,
    load_sharded,
    save_sharded,
    shard_blocks,
    world,
)
from reptok_core.training.optim import OptimConfig, build_optimizer, train_step  # noqa: E402


class Stage:
    """Model + a fixed, seeded global batch whose per-sample t and noise do not depend on N."""

    def __init__(self, stage: int, preset: str, global_batch: int, device: torch.device):
        torch.manual_seed(0)
        self.stage, self.device = stage, device
        gen = torch.Generator().manual_seed(123)
        if stage == 1:
            cfg = preset_section(TokenizerConfig, f"tokenizer/{preset}")
            cfg.encoder.weights = "random"
            # The paper preset's SD-VAE needs diffusers weights; latents are given precomputed here.
            self.model = Tokenizer(cfg, latent_space=bc.PrecomputedLatents(cfg.latent)).to(device)
            s = cfg.image_size
            self.x = torch.rand(global_batch, 3, s, s, generator=gen) * 2 - 1
            self.target = torch.randn(global_batch, *self.model.latent_shape(), generator=gen)
            self.blocks, self.root = self.model.decoder.blocks, self.model.decoder
        else:
            cfg = preset_section(MixerConfig, f"generator/{preset}", "model.mixer")
            token_dim = bc.preset_token_dim(preset)
            self.model = MixerGenerator(cfg, token_dim).to(device)
            self.x = torch.randint(0, cfg.num_classes + 1, (global_batch,), generator=gen)
            self.target = torch.randn(global_batch, token_dim, generator=gen)
            self.blocks, self.root = self.model.blocks, self.model
        self.t = torch.rand(global_batch, generator=gen)
        self.noise = torch.randn(self.target.shape, generator=gen)

    def shard(self) -> None:
        shard_blocks(self.model, self.blocks, self.root)

    def local(self, rank: int, world_size: int) -> tuple[torch.Tensor, ...]:
        n = self.t.shape[0] // world_size
        sl = slice(rank * n, (rank + 1) * n)
        return tuple(a[sl].to(self.device) for a in (self.x, self.target, self.t, self.noise))

    def loss(self, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        x, target, t, noise = self.local(rank, world_size)
        if self.stage == 1:
            z = self.model.encode(x)
            fl = flow.flow_loss(
                lambda xt, tt: self.model.decoder(xt, tt, z), target, t=t, noise=noise
            )
        else:
            fl = flow.flow_loss(lambda xt, tt: self.model(xt, tt, x), target, t=t, noise=noise)
        return {"total": fl}


def global_mean(v: torch.Tensor) -> float:
    v = v.detach().float().clone()
    if is_distributed():
        dist.all_reduce(v, op=dist.ReduceOp.AVG)
    return v.item()


def check(args: argparse.Namespace, device: torch.device) -> dict:
    rank, ws = world()
    st = Stage(args.stage, args.preset, args.global_batch, device)
    if is_distributed():
        st.shard()
    ocfg = OptimConfig(lr=1e-3, warmup_steps=0, grad_clip=1.0)
    opt = build_optimizer(st.model.parameters(), ocfg, device)
    out: dict = {"world_size": ws}
    if args.load:
        load_sharded(args.load, st.model, opt, {})
        with torch.no_grad():
            out["loaded_loss"] = global_mean(st.loss(rank, ws)["total"])
        return out
    res = train_step(
        st.model,
        opt,
        lambda: st.loss(rank, ws),
        lr=ocfg.lr,
        grad_clip=ocfg.grad_clip,
        device=device,
        precision="fp32",
    )
    out["loss_before"] = global_mean(res["total"])
    out["grad_norm"] = res["grad_norm"].item()
    with torch.no_grad():
        out["loss_after"] = global_mean(st.loss(rank, ws)["total"])
    if args.ckpt:
        save_sharded(args.ckpt, st.model, opt, {})
    return out


def perf(args: argparse.Namespace, device: torch.device) -> dict:
    rank, ws = world()
    st = Stage(args.stage, args.preset, args.batch * ws, device)
    if is_distributed():
        st.shard()
    if args.compile:
        for b in st.blocks:
            b.compile()
    ocfg = OptimConfig(lr=1e-4, warmup_steps=0)
    opt = build_optimizer(st.model.parameters(), ocfg, device)
    precision = "bf16" if device.type == "cuda" else "fp32"

    def step() -> None:
        train_step(
            st.model,
            opt,
            lambda: st.loss(rank, ws),
            lr=1e-4,
            grad_clip=1.0,
            device=device,
            precision=precision,
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
