"""Decoding and token sampling as a server runs them: per-request seeds, rows padded to
power-of-two batch buckets, and on a GPU every (bucket, steps, guidance) replayed from a CUDA
graph (graph_cache.py). One class-conditional 256-px image on an H200: 1.65 s eager in fp32,
0.265 s replayed in bf16, 0.155 s with compiled blocks (benchmarks/NOTES.md). The math is
generator_task.sample_tokens and Tokenizer.decode, unchanged; a request's seed fixes its
result, up to the rounding of kernels chosen by batch size (bf16: ~1e-2 relative).
"""

from __future__ import annotations

import torch

from reptok_core.exports.generator import LoadedGenerator
from reptok_core.models.generator import sample_tokens, seeded_token_noise
from reptok_core.serving.graph_cache import GraphCache, bucket


def _padded(x: torch.Tensor, rows: int, fill: float = 0.0) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0], *x.shape[1:]), fill)
    return torch.cat([x, pad])


def cast_weights(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters to `dtype` for inference; buffers stay fp32 (time-embedding frequencies:
    bf16's 8-bit mantissa would shift every sinusoid)."""
    for p in module.parameters():
        p.data = p.data.to(dtype)
    return module


class Inference:
    """Graph-cached decode / sample for one device's models. Keys name the model object (a
    captured graph keeps it alive, so the id is not reused). A Serve replica keeps one per
    loaded generation of models, so a reload frees the old models' graphs."""

    def __init__(self, max_batch: int = 16, max_graphs: int = 32):
        self.max_batch = max_batch
        self.graphs = GraphCache(max_graphs)

    def decode(self, tok, tokens: torch.Tensor, steps: int, seeds: list[int]) -> torch.Tensor:
        """Tokens (n, D) -> images in [-1, 1]; row i starts from `tok.seeded_noise(1, seeds[i])`,
        as `tok.decode(tokens[i:i+1], steps, seed=seeds[i])` would."""
        n = tokens.shape[0]
        device = next(tok.decoder.parameters()).device
        rows = bucket(n, max(self.max_batch, n))
        noise = torch.cat([tok.seeded_noise(1, s) for s in seeds]).to(device)
        z = tokens.to(device, torch.float32)

        def run(z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            return tok.decode(z, steps, noise=noise)

        key = ("decode", id(tok), steps)
        return self.graphs.run(key, run, _padded(z, rows), _padded(noise, rows))[:n]

    def class_tokens(
        self, g: LoadedGenerator, labels: list[int], scale: float, steps: int, seed: int
    ) -> torch.Tensor:
        """Denormalised tokens (n, D), equal to `sample_tokens(labels=..., seed=seed)`."""
        return self.class_tokens_of([(labels, seed)], g, scale, steps)[0]

    def class_tokens_of(
        self, requests: list[tuple[list[int], int]], g: LoadedGenerator, scale: float, steps: int
    ) -> list[torch.Tensor]:
        """Several requests' (labels, seed) sampled as one batch: request i's tokens are those
        of `class_tokens(g, labels_i, scale, steps, seed_i)` (its rows start from its own
        seeded noise), so concurrent requests share one solve."""
        device = next(g.model.parameters()).device
        counts = [len(labels) for labels, _ in requests]
        n = sum(counts)
        rows = bucket(n, max(self.max_batch, n))
        y = torch.as_tensor([v for labels, _ in requests for v in labels], device=device).long()
        noise = torch.cat(
            [seeded_token_noise(len(lab), g.normalizer, seed) for lab, seed in requests]
        ).to(device)
        kw = dict(scale=scale, interval=tuple(g.cfg.cfg_interval), steps=steps)

        def run(y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            return sample_tokens(g.model, g.normalizer, labels=y, noise=noise, **kw)

        key = ("class", id(g), scale, steps, kw["interval"])
        y, noise = _padded(y, rows, g.model.null_class), _padded(noise, rows)
        return list(self.graphs.run(key, run, y, noise)[:n].split(counts))

    def text_tokens(
        self,
        g: LoadedGenerator,
        text: tuple[torch.Tensor, torch.Tensor],
        scale: float,
        steps: int,
        seed: int,
    ) -> torch.Tensor:
        """Denormalised tokens (n, D) for caption states `text` = (states, mask) of n rows."""
        device = next(g.model.parameters()).device
        states, mask = (v.to(device) for v in text)
        n = states.shape[0]
        rows = bucket(n, max(self.max_batch, n))
        noise = seeded_token_noise(n, g.normalizer, seed).to(device)
        kw = dict(scale=scale, interval=tuple(g.cfg.cfg_interval), steps=steps)

        def run(states: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            return sample_tokens(g.model, g.normalizer, text=(states, mask), noise=noise, **kw)

        key = ("text", id(g), scale, steps, kw["interval"])
        padded = (_padded(states, rows), _padded(mask, rows, 1), _padded(noise, rows))
        return self.graphs.run(key, run, *padded)[:n]
