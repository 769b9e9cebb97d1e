"""One class-conditional image as the Serve replica makes it (`reptok_core.serving.inference.Inference`:
`class_tokens` then `decode`, what /generate runs), without Ray or HTTP: latency at batch 1 and
images/s at larger batches, `paper` presets with random weights (SD-VAE from the sd-vae-ft-mse
config, so diffusers must be importable).

Modes (eager-fp32 first: the others cast the weights): `eager-fp32` (the replica before CUDA graphs: fp32 weights, eager), `eager` (bf16
weights), `graph` (bf16, CUDA graphs: the replica's default on a GPU), `graph-compiled` (plus
regional torch.compile of the mixer and decoder blocks). Check: the graphed images against the
eager bf16 ones for the same seeds (the same kernels replayed: expect equality or rounding).

    python benchmarks/bench_serving.py --batches 1,16 --out serving.json
    python benchmarks/bench_serving.py --tiny --device cpu --modes eager-fp32,eager    # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time

import _bench_common as bc  # first: puts the repo root on sys.path
import torch
from bench_sampling import TINY_VAE

from reptok_core.config import preset_section
from reptok_core.exports.generator import LoadedGenerator
from reptok_core.formats.token_stats import TokenNormalizer
from reptok_core.models.generator import GeneratorConfig, build_model
from reptok_core.models.latent_space import SD_VAE_FT_MSE, SDVAESpace
from reptok_core.models.tokenizer import Tokenizer, TokenizerConfig
from reptok_core.serving.inference import Inference, cast_weights


def build(tiny: bool, device: torch.device) -> tuple[Tokenizer, LoadedGenerator]:
    torch.manual_seed(0)
    size = "tiny" if tiny else "paper"
    cfg = preset_section(TokenizerConfig, f"tokenizer/{size}")
    cfg.encoder = dataclasses.replace(cfg.encoder, weights="random")
    vae = SDVAESpace.from_config(TINY_VAE if tiny else SD_VAE_FT_MSE)
    cfg.latent.kind = "sd-vae"
    tok = Tokenizer(cfg, latent_space=vae)
    gcfg = preset_section(GeneratorConfig, f"generator/{size}")
    mixer = build_model(gcfg, tok.token_dim)
    # Zero-initialised output layers would make every velocity 0 and the check vacuous.
    for m in (mixer, tok.decoder):
        for p in m.parameters():
            if p.ndim >= 2 and not p.detach().any():
                torch.nn.init.normal_(p, std=0.02)
    norm = TokenNormalizer.identity(tok.token_dim)
    gen = LoadedGenerator(mixer.to(device).eval(), norm.to(device), gcfg, {})
    return tok.to(device).eval(), gen


def generate(inf: Inference, tok, gen, labels: list[int], steps: int) -> torch.Tensor:
    """/generate's model work: tokens for the labels, then their images (seeds 0..n-1)."""
    z = inf.tokens(gen, labels, gen.cfg.guidance_scale, steps, seed=0)
    return inf.decode(tok, z, steps, list(range(len(labels))))


def latency(fn, iters: int) -> list[float]:
    """Wall seconds per call, until the images are on the host (what a caller waits)."""
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn().cpu()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke run)")
    p.add_argument("--modes", default="eager-fp32,eager,graph,graph-compiled")
    p.add_argument("--batches", default="1,16", help="images per call; the first gives latency")
    p.add_argument("--steps", type=int, default=50, help="Euler steps of mixer and decoder")
    p.add_argument("--iters", type=int, default=20, help="timed calls per batch")
    p.add_argument("--out", default="", help="JSON results file")
    args = p.parse_args()
    device = bc.pick_device(args.device)
    tok, gen = build(args.tiny, device)
    res = bc.Results(args.out, {"bench": "serving", "env": bc.environment(device)})
    batches = [int(b) for b in args.batches.split(",")]
    eager_bf16: dict[int, torch.Tensor] = {}
    for mode in args.modes.split(","):
        if mode != "eager-fp32":
            for m in (tok.decoder, tok.latent_space, gen.model):
                cast_weights(m, torch.bfloat16 if device.type == "cuda" else torch.float32)
        if mode == "graph-compiled":
            bc.compile_blocks([*gen.model.blocks, *tok.decoder.blocks])
        inf = Inference(max_batch=max(batches), max_graphs=0 if mode.startswith("eager") else 8)
        for b in batches:
            labels = [i % gen.cfg.mixer.num_classes for i in range(b)]
            t0 = time.perf_counter()
            first = generate(inf, tok, gen, labels, args.steps).float().cpu()
            setup = time.perf_counter() - t0
            t0 = time.perf_counter()  # the graph cache captures a setting on its second call
            generate(inf, tok, gen, labels, args.steps).cpu()
            second = time.perf_counter() - t0
            call = functools.partial(generate, inf, tok, gen, labels, args.steps)
            times = latency(call, args.iters if b == batches[0] else max(3, args.iters // 4))
            img = generate(inf, tok, gen, labels, args.steps).float().cpu()
            row = {"mode": mode, "batch": b, "first_call_s": setup, "second_call_s": second,
                   "p50_s": statistics.median(times), "p90_s": sorted(times)[int(0.9 * (len(times) - 1))],
                   "images_per_s": b / statistics.median(times),
                   "repeatable": bool(torch.equal(first, img))}  # fmt: skip
            if mode == "eager":
                eager_bf16[b] = img
            elif b in eager_bf16:
                ref = eager_bf16[b].double()
                row["rel_diff_vs_eager"] = ((img.double() - ref).norm() / ref.norm()).item()
            res.add(row)
        if mode == "graph-compiled":
            bc.uncompile_blocks([*gen.model.blocks, *tok.decoder.blocks])
    bc.print_table(res.doc["runs"], ["mode", "batch", "p50_s", "p90_s", "images_per_s",
                                     "first_call_s", "second_call_s", "rel_diff_vs_eager"])  # fmt: skip


if __name__ == "__main__":
    main()
