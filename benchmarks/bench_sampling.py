"""Latency of one class-conditional 256-px image with the `paper` presets, without Ray:
token sampling (mixer, 50 Euler steps, CFG 1.5 on t in [0.3, 0.9]) + decoder (50 Euler
steps) + SD-VAE decode. p50 / p90 at batch 1 and images/s at batch 32.

    python benchmarks/bench_sampling.py --out sampling.json
    python benchmarks/bench_sampling.py --tiny --device cpu --batches 1,2    # smoke

Modes (all with bf16 weights, the ODE state in fp32, random weights):
- `reference`: the project's generic sampling path (flow.sample with flow.Guidance, one CFG
  branch per forward, eager kernels). The Serve replica's path (reptok_core/serving/inference.py:
  the same calls replayed from CUDA graphs) is measured by bench_serving.py.
- `graph`: the same math with the step schedule decided on the host (t is known in advance),
  the conditional and unconditional CFG branches in one batch, and each stage (mixer loop,
  decoder loop, VAE decode) captured as one CUDA graph; eager kernels.
- `compiled`: as `graph`, with every mixer and decoder block torch.compile'd (regional).
The mixer's token-mixing MLP uses the fused Triton kernels on CUDA unless --matmul-token-mix.
Checks, printed and stored: `graph` in fp32 against `reference` in fp32 (same math: expect
float rounding only), and bf16 `compiled` against fp32 `reference`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _bench_common as bc  # first: puts the repo root on sys.path
import torch

from reptok_core import flow
from reptok_core.config import preset_section
from reptok_core.models.decoder import Decoder
from reptok_core.models.generator import GeneratorConfig
from reptok_core.models.latent_space import SD_VAE_FT_MSE, SDVAESpace
from reptok_core.models.mixer import MixerBlock, MixerGenerator
from reptok_core.models.tokenizer import TokenizerConfig
from reptok_core.perf import synchronize

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 32],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)


def build(tiny: bool, device: torch.device):
    size = "tiny" if tiny else "paper"
    tok_cfg = preset_section(TokenizerConfig, f"tokenizer/{size}")
    gen_cfg = preset_section(GeneratorConfig, f"generator/{size}")
    token_dim = bc.preset_token_dim(size)
    torch.manual_seed(0)
    with torch.device(device):
        mixer = MixerGenerator(gen_cfg.mixer, token_dim)
        vae = SDVAESpace.from_config(TINY_VAE if tiny else SD_VAE_FT_MSE)
        side = tok_cfg.image_size // vae.downsample
        decoder = Decoder(tok_cfg.decoder, token_dim, in_channels=vae.channels, input_size=side)
    # Zero-initialised layers (adaLN, output heads) would make every velocity exactly zero and
    # the comparisons below vacuous: give them small random values, as after training.
    for m in (mixer, decoder):
        for p in m.parameters():
            if p.ndim >= 2 and not p.detach().any():
                torch.nn.init.normal_(p, std=0.02)
    guidance = (gen_cfg.guidance_scale, tuple(gen_cfg.guidance_interval))
    return mixer.to(device).eval(), decoder.to(device).eval(), vae.to(device).eval(), guidance


def cast_params(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters to `dtype`; buffers (Fourier frequencies, RoPE tables) stay fp32."""
    for p in module.parameters():
        p.data = p.data.to(dtype)


class Generator:
    """label -> image with fixed shapes; the math of models.generator.sample_tokens + decode."""

    def __init__(self, mixer, decoder, vae, batch, steps, scale, interval):
        self.mixer, self.decoder, self.vae = mixer, decoder, vae
        self.steps, self.scale, self.interval = steps, scale, interval
        dev = next(mixer.parameters()).device
        self.device = dev
        ts = flow.time_grid(steps)  # fp32 on the host: the schedule is known in advance
        self.dt = [(ts[i + 1] - ts[i]).item() for i in range(steps)]
        # interval in the generator's time s = 1 - t, decided as flow.sample does
        self.guided = flow.guided_points(scale, tuple(interval), steps)[:steps]
        self.t1 = [ts[i].expand(batch).to(dev) for i in range(steps)]
        self.t2 = [ts[i].expand(2 * batch).to(dev) for i in range(steps)]
        self.batch = batch
        self.null = torch.full((batch,), mixer.null_class, device=dev, dtype=torch.long)
        d = mixer.token_dim
        self.token_mean = torch.zeros(d, device=dev)  # the token Parquet's statistics
        self.token_std = torch.ones(d, device=dev)
        self.latent_shape = (decoder.in_channels, decoder.input_size, decoder.input_size)

    def _dtype(self, m: torch.nn.Module) -> torch.dtype:
        return next(m.parameters()).dtype

    # -- fast path: host schedule, CFG pair in one batch ---------------------------------
    def tokens(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dt_m = self._dtype(self.mixer)
        y2 = torch.cat([y, self.null])
        for i in range(self.steps):
            if self.guided[i]:
                v = self.mixer(torch.cat([z, z]).to(dt_m), self.t2[i], y2).float()
                v_c, v_u = v.chunk(2)
                v = v_u + self.scale * (v_c - v_u)
            else:
                v = self.mixer(z.to(dt_m), self.t1[i], y).float()
            z = z + self.dt[i] * v
        return z * self.token_std + self.token_mean

    def latents(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dt_d = self._dtype(self.decoder)
        tok = tokens.to(dt_d)
        for i in range(self.steps):
            x = x + self.dt[i] * self.decoder(x.to(dt_d), self.t1[i], tok).float()
        return x

    def image(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).float()

    def __call__(self, y, z_noise, x_noise) -> torch.Tensor:
        return self.image(self.latents(self.tokens(y, z_noise), x_noise))

    # -- reference: the project's generic path ---------------------------------------------
    def reference(self, y, z_noise, x_noise) -> torch.Tensor:
        dt_m, dt_d = self._dtype(self.mixer), self._dtype(self.decoder)

        def cond(x, t):
            return self.mixer(x.to(dt_m), t, y).float()

        def uncond(x, t):
            return self.mixer(x.to(dt_m), t, self.null).float()

        guidance = flow.Guidance(lambda x, t: (cond(x, t), uncond(x, t)), self.scale, self.interval)
        z = flow.sample(cond, z_noise, self.steps, guidance=guidance)
        tok = (z * self.token_std + self.token_mean).to(dt_d)
        lat = flow.sample(
            lambda x, t: self.decoder(x.to(dt_d), t, tok).float(), x_noise, self.steps
        )
        return self.image(lat)


class Graphed:
    """The three stages of a Generator captured as CUDA graphs over static input buffers."""

    def __init__(self, gen: Generator, y, z_noise, x_noise):
        self.y, self.z, self.x = y.clone(), z_noise.clone(), x_noise.clone()
        self.gen = gen
        stages = [
            lambda: gen.tokens(self.y, self.z),
            lambda: gen.latents(self.tok, self.x),
            lambda: gen.image(self.lat),
        ]
        self.graphs = []
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up (and compilation) outside the capture
            for _ in range(2):
                self.tok = stages[0]()
                self.lat = stages[1]()
                self.img = stages[2]()
        torch.cuda.current_stream().wait_stream(s)
        outs = []
        for fn in stages:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = fn()
            self.graphs.append(g)
            outs.append(out)
            if len(outs) == 1:
                self.tok = out
            elif len(outs) == 2:
                self.lat = out
        self.img = outs[2]

    def __call__(self, y, z_noise, x_noise) -> torch.Tensor:
        self.y.copy_(y)
        self.z.copy_(z_noise)
        self.x.copy_(x_noise)
        for g in self.graphs:
            g.replay()
        return self.img

    def stage_times(self, iters: int) -> list[float]:
        """Median seconds of each captured stage alone."""
        out = []
        for g in self.graphs:
            ts = []
            for _ in range(iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            out.append(statistics.median(ts))
        return out


def inputs(gen: Generator, b: int, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    y = torch.randint(0, gen.mixer.cfg.num_classes, (b,), generator=g).to(gen.device)
    z = torch.randn(b, gen.mixer.token_dim, generator=g).to(gen.device)
    x = torch.randn(b, *gen.latent_shape, generator=g).to(gen.device)
    return y, z, x


def latency(fn, args, device, iters: int) -> list[float]:
    """Wall seconds per call, host to result on the host (what a caller of the model waits)."""
    out = []
    for _ in range(iters):
        synchronize(device)
        t0 = time.perf_counter()
        img = fn(*args)
        img.cpu()
        out.append(time.perf_counter() - t0)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--modes", default="reference,graph,compiled")
    p.add_argument("--batches", default="1,32", help="latency batch, then throughput batch(es)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--iters", type=int, default=30, help="timed calls (reference: a fifth)")
    p.add_argument("--matmul-token-mix", action="store_true", help="mixer without Triton kernels")
    p.add_argument("--out", default="")
    args = p.parse_args()
    device = bc.pick_device(args.device)
    cuda = device.type == "cuda"
    MixerBlock.fused_token_mix = not args.matmul_token_mix
    modes = args.modes.split(",")
    batches = [int(b) for b in args.batches.split(",")]

    mixer, decoder, vae, guidance = build(args.tiny, device)
    res = bc.Results(
        args.out,
        {
            "bench": "sampling",
            "preset": "tiny" if args.tiny else "paper",
            "steps": args.steps,
            "env": bc.environment(device),
        },
    )

    # Same math check in fp32: fast schedule + batched CFG vs the reference path.
    with torch.no_grad():
        gen32 = Generator(mixer, decoder, vae, 1, args.steps, *guidance)
        ins = inputs(gen32, 1, seed=0)
        ref32 = gen32.reference(*ins)
        fast32 = gen32(*ins)
        err_fast = rel_err(fast32, ref32)
        cast_params(mixer, torch.bfloat16)
        cast_params(decoder, torch.bfloat16)
        cast_params(vae.vae, torch.bfloat16)
        res.doc["check"] = {"fast_fp32_vs_reference_fp32": err_fast}
        print(f"fast fp32 vs reference fp32: rel err {err_fast:.2e}")

        for mode in modes:
            if mode == "compiled":
                torch._dynamo.reset()
                bc.compile_blocks([*mixer.blocks, *decoder.blocks])
            for b in batches:
                gen = Generator(mixer, decoder, vae, b, args.steps, *guidance)
                ins_b = inputs(gen, b, seed=0)
                t0 = time.perf_counter()
                if mode == "reference":
                    fn, iters = gen.reference, max(2, args.iters // 5)
                elif cuda:
                    fn, iters = Graphed(gen, *ins_b), args.iters
                else:
                    fn, iters = gen, max(2, args.iters // 5)
                setup_s = time.perf_counter() - t0
                fn(*ins_b)  # warm-up
                times = latency(fn, ins_b, device, iters if b == batches[0] else max(3, iters // 5))
                row = {
                    "mode": mode,
                    "batch": b,
                    "setup_s": setup_s,
                    "p50_s": statistics.median(times),
                    "p90_s": sorted(times)[min(len(times) - 1, round(0.9 * (len(times) - 1)))],
                    "images_per_s": b / statistics.median(times),
                }
                if isinstance(fn, Graphed):
                    row["stage_s"] = dict(
                        zip(("mixer", "decoder", "vae"), fn.stage_times(5), strict=True)
                    )
                if b == 1:
                    row["rel_err_vs_reference_fp32"] = rel_err(fn(*ins_b), ref32)
                res.add(row)
                del fn
            if mode == "compiled":
                bc.uncompile_blocks([*mixer.blocks, *decoder.blocks])
    bc.print_table(res.doc["runs"], ["mode", "batch", "p50_s", "p90_s", "images_per_s", "setup_s"])


if __name__ == "__main__":
    main()
