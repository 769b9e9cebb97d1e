"""Performance accounting shared by the benchmarks: counted FLOPs, a measured matmul peak, MFU.

MFU here = model FLOPs actually executed per second / the bf16 matmul rate measured on the same
device in the same run (not the datasheet). FLOPs are counted by `FlopCounterMode` on one eager
call (matmuls, convolutions and attention; elementwise work is not counted).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one eager call of `fn` (forward and, if `fn` calls it, backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], device: torch.device | str, iters: int, warmup: int = 0
) -> list[float]:
    """Seconds per call of `fn`, one entry per call (CUDA events on GPU, host clock on CPU)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(iters)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def measure_matmul_peak(
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    sizes: tuple[int, ...] = (8192, 16384),
    iters: int = 20,
) -> float:
    """Best median FLOP/s of large square matmuls on random data (the MFU denominator).

    Random inputs, not zeros (zeros run faster on some GPUs); several operand pairs rotate so
    the measured rate is not a cache artefact; each size is warmed up before timing.
    """
    device = torch.device(device)
    if device.type != "cuda":
        sizes = tuple(min(s, 1024) for s in sizes)
        iters = min(iters, 3)
    best = 0.0
    for n in sizes:
        gen = torch.Generator(device=device).manual_seed(0)
        pairs = [
            (
                torch.randn(n, n, device=device, dtype=dtype, generator=gen),
                torch.randn(n, n, device=device, dtype=dtype, generator=gen),
            )
            for _ in range(2)
        ]
        out = torch.empty(n, n, device=device, dtype=dtype)
        calls = iter(range(10**9))

        def mm(pairs=pairs, out=out, calls=calls) -> None:
            a, b = pairs[next(calls) % len(pairs)]
            torch.mm(a, b, out=out)

        times = time_calls(mm, device, iters=iters, warmup=3)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


def mfu(flops_per_step: float, step_time: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s."""
    return flops_per_step / step_time / peak


def summarize(times: list[float]) -> dict[str, float]:
    """Median, p10 and p90 of a list of seconds."""
    s = sorted(times)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]

    return {"median_s": statistics.median(s), "p10_s": q(0.1), "p90_s": q(0.9)}
