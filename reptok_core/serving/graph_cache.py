"""Inference calls replayed from CUDA graphs, one graph per key (shapes and settings).

Why: sampling is 50-100 small network calls in a row (mixer, then decoder), each a few hundred
kernels at batch 1, so eager sampling is bound by kernel launches: one 256-px image took 1.65 s
on an H200 eagerly, 0.27 s replayed from graphs (benchmarks/NOTES.md).

`GraphCache.run(key, fn, *inputs)` runs `fn(*inputs)` (tensors in, one tensor out). On CUDA the
first calls with a key run `fn` eagerly on a side stream (which also warms up lazily
initialised kernels and compilations), the second one is then captured; later calls copy their
inputs into the captured buffers and replay. `fn` must have no host syncs and no randomness of its own
(pass the noise in). Elsewhere `fn` simply runs. One lock serialises the calls, since a graph's
buffers are shared and a capture must not see other threads' kernels.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)


class _Captured:
    def __init__(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]):
        self.fn = fn  # keeps the models it closes over alive, so their ids in keys stay unique
        self.inputs = tuple(x.clone() for x in inputs)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = fn(*self.inputs)

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for buf, x in zip(self.inputs, inputs, strict=True):
            buf.copy_(x)
        self.graph.replay()
        return self.output.clone()


class GraphCache:
    """Up to `max_graphs` captured calls, least recently used evicted (each holds its memory).

    A key is captured the second time it is seen: one-off settings (an unusual step count or
    guidance scale from a request) run eagerly instead of filling the cache. A key whose capture
    failed runs eagerly from then on.
    """

    def __init__(self, max_graphs: int = 16, capture_after: int = 2):
        self.max_graphs, self.capture_after = max_graphs, capture_after
        self.graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        self.seen: dict[Hashable, int] = {}
        self.failed: set[Hashable] = set()
        self.lock = threading.Lock()
        self.captures = 0
        self.replays = 0

    @torch.no_grad()
    def run(self, key: Hashable, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor):
        if not (inputs and all(x.is_cuda for x in inputs)) or self.max_graphs <= 0:
            return fn(*inputs)
        key = (key, *((tuple(x.shape), x.dtype, x.device) for x in inputs))
        with self.lock:
            captured = self.graphs.get(key)
            if captured is not None:
                self.graphs.move_to_end(key)
                self.replays += 1
                return captured.replay(inputs)
            device = inputs[0].device
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                out = fn(*inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            out.record_stream(torch.cuda.current_stream(device))
            if len(self.seen) >= 4096:  # keys come from requests: keep the tally bounded
                self.seen.clear()
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] >= self.capture_after and key not in self.failed:
                self._capture(key, fn, inputs)
            return out

    def _capture(self, key: Hashable, fn: Callable[..., torch.Tensor], inputs) -> None:
        try:
            captured = _Captured(fn, inputs)
        except Exception:  # noqa: BLE001 - the call itself just worked eagerly; stay eager
            log.warning("CUDA graph capture failed for %s; it runs eagerly", key, exc_info=True)
            self.failed.add(key)
            return
        if len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        self.graphs[key] = captured
        self.captures += 1


def bucket(n: int, largest: int) -> int:
    """The batch size `n` rows are padded to: the next power of two, at most `largest` (so a
    server captures ~log2(max batch) graphs per setting instead of one per batch size)."""
    if n < 1:
        raise ValueError(f"batch of {n} rows")
    size = 1
    while size < n:
        size *= 2
    return max(min(size, largest), n)
