"""Helpers shared by the GPU benchmarks (no Ray): device setup, run specs, compilation modes,
OOM-tolerant runs and incremental JSON results."""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reptok_core.config import preset_section  # noqa: E402
from reptok_core.device import resolve_device  # noqa: E402
from reptok_core.models.encoder import EncoderConfig, build_vit  # noqa: E402
from reptok_core.models.latent_space import SD_VAE_FT_MSE, LatentSpaceConfig, PixelSpace  # noqa: E402
from reptok_core.models.layers import compile_blocks  # noqa: E402,F401 - the benchmarks' regional mode


def preset_token_dim(size: str) -> int:
    """The tokens' width at a preset size (tiny, small, paper): its tokenizer's encoder width,
    read off a ViT built on the meta device (no memory, no weights)."""
    enc = preset_section(EncoderConfig, f"tokenizer/{size}", "model.encoder")
    with torch.device("meta"):
        return build_vit(EncoderConfig(**{**enc.__dict__, "weights": "random"})).embed_dim


class PrecomputedLatents(PixelSpace):
    """Stands in for a preset's latent space (pixels, or the paper's SD-VAE by its diffusers
    config): its shape without its weights, for steps that get their latents precomputed (the
    images Parquet's column)."""

    def __init__(self, cfg: LatentSpaceConfig):
        super().__init__()
        if cfg.kind == "sd-vae":
            self.channels = SD_VAE_FT_MSE["latent_channels"]
            self.downsample = 2 ** (len(SD_VAE_FT_MSE["block_out_channels"]) - 1)


@dataclass
class RunSpec:
    """One benchmark configuration, written `mode:batch[:option]` on the command line.

    mode: `eager`, `regional` (torch.compile of every transformer / mixer block, compiled once
    and reused by all blocks of the same shape) or `full` (torch.compile of the whole loss).
    option: a benchmark-specific switch (stage 1: `ac`; stage 2: `mm`).
    """

    mode: str
    batch: int
    option: str = ""

    @classmethod
    def parse(cls, text: str) -> RunSpec:
        parts = text.split(":")
        if len(parts) not in (2, 3) or parts[0] not in ("eager", "regional", "full"):
            raise ValueError(f"run spec {text!r}: expected eager|regional|full:BATCH[:option]")
        return cls(parts[0], int(parts[1]), parts[2] if len(parts) == 3 else "")

    @property
    def name(self) -> str:
        return f"{self.mode}:{self.batch}" + (f":{self.option}" if self.option else "")


def parse_runs(text: str) -> list[RunSpec]:
    return [RunSpec.parse(t) for t in text.split(",") if t]


def pick_device(name: str | None) -> torch.device:
    return resolve_device(name or "auto")


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name, sms=props.multi_processor_count, mem_gb=props.total_memory / 2**30
        )
    return env


def uncompile_blocks(blocks: Iterable[nn.Module]) -> None:
    for blk in blocks:
        blk._compiled_call_impl = None


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class Results:
    """A JSON document rewritten after every run, so a run cut short still leaves its figures."""

    def __init__(self, path: str, header: dict):
        self.path = path
        self.doc = {**header, "runs": []}
        self.t0 = time.perf_counter()
        self.write()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, row: dict) -> None:
        self.doc["runs"].append(row)
        self.write()
        print(json.dumps(row), flush=True)

    def run_specs(
        self,
        specs: list[RunSpec],
        run: Callable[[RunSpec], dict],
        device: torch.device,
        time_budget: float,
        rate: str,
    ) -> None:
        """Each `mode:batch[:option]` spec in turn, guarded; specs past the time budget become
        'skipped' rows. Then the table, with `rate` (images_per_s, samples_per_s) as a column."""
        for spec in specs:
            if time_budget and self.elapsed() > time_budget:
                self.add({"run": spec.name, "status": "skipped (time budget)"})
                continue
            row = guarded(lambda s=spec: run(s), device)
            self.add({"run": spec.name, "batch": spec.batch, **row})
        cols = ["run", "status", "step_s", rate, "tflops_per_s", "mfu", "peak_mem_gb"]
        print_table(self.doc["runs"], cols + ["first_step_s"])

    def write(self) -> None:
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w") as f:
                json.dump(self.doc, f, indent=2)


def guarded(fn: Callable[[], dict], device: torch.device) -> dict:
    """Run one configuration; an error (out of memory or other) becomes a row, not a crash."""
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        return {"status": "oom", "error": str(e).splitlines()[0][:200]}
    except Exception as e:  # noqa: BLE001 - one failed configuration must not lose the others
        return {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        reset_memory(device)


def print_table(rows: list[dict], cols: list[str]) -> None:
    print(" | ".join(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        print(" | ".join(cells))


def profile_to(step: Callable[[], object], path: str, device: torch.device, steps: int = 2) -> None:
    """Top kernels of a few steps (torch.profiler), as a text table in `path`."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))


def step_result(
    times: list[float],
    first_s: float,
    batch: int,
    flops_per_item: float,
    peak: float,
    device: torch.device,
    per_s_key: str,
) -> dict:
    """The JSON row of a timed training step: median / p90 step, throughput, TFLOP/s, MFU, memory."""
    from reptok_core.perf import mfu, summarize

    st = summarize(times)
    step_s = st["median_s"]
    return {
        "status": "ok",
        "first_step_s": first_s,
        "step_s": step_s,
        "step_p90_s": st["p90_s"],
        per_s_key: batch / step_s,
        "tflops_per_s": flops_per_item * batch / step_s / 1e12,
        "mfu": mfu(flops_per_item * batch, step_s, peak),
        "peak_mem_gb": peak_memory_gb(device),
    }
