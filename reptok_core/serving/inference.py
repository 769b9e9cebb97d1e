"""Decoding and token sampling as a server runs them: per-request seeds, rows padded to
power-of-two batch buckets, and on a GPU every (bucket, steps, guidance) replayed from a CUDA
graph (graph_cache.py). One class-conditional 256-px image on an H200: 1.65 s eager in fp32,
0.265 s replayed in bf16, 0.155 s with compiled blocks (benchmarks/NOTES.md). The math is
reptok_core/models/generator.py's sampling and Tokenizer.decode, unchanged; a request's seed fixes its
result, up to the rounding of kernels chosen by batch size (bf16: ~1e-2 relative).
"""

from __future__ import annotations

import torch

from reptok_core.exports.generator import LoadedGenerator
from reptok_core.models.generator import Condition, pad_rows, seeded_token_noise
from reptok_core.serving.graph_cache import GraphCache, bucket


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
        return self.graphs.run(key, run, pad_rows(z, rows), pad_rows(noise, rows))[:n]

    def tokens(
        self, g: LoadedGenerator, condition: Condition, scale: float, steps: int, seed: int
    ) -> torch.Tensor:
        """Denormalised tokens (n, D) for the n rows of `condition` (class labels, or caption
        states and mask; reptok_core.models.generator), equal to `sample_tokens(..., seed=seed)`."""
        return self.tokens_of([(condition, seed)], g, scale, steps)[0]

    def tokens_of(
        self, requests: list[tuple[Condition, int]], g: LoadedGenerator, scale: float, steps: int
    ) -> list[torch.Tensor]:
        """Several requests' (condition, seed) sampled as one batch: request i's tokens are
        those of `tokens(g, condition_i, scale, steps, seed_i)` (its rows start from its own
        seeded noise), so concurrent requests share one solve."""
        kind = g.conditioning
        device = next(g.model.parameters()).device
        each = [kind.parts(condition, device) for condition, _ in requests]
        counts = [parts[0].shape[0] for parts in each]
        n = sum(counts)
        rows = bucket(n, max(self.max_batch, n))
        parts = tuple(torch.cat(column) for column in zip(*each, strict=True))
        noise = torch.cat(
            [
                seeded_token_noise(c, g.normalizer, seed)
                for c, (_, seed) in zip(counts, requests, strict=True)
            ]
        ).to(device)
        interval = tuple(g.cfg.guidance_interval)

        def run(noise: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
            return kind.sample(
                g.model,
                g.normalizer,
                kind.joined(parts),
                noise=noise,
                scale=scale,
                interval=interval,
                steps=steps,
            )

        key = (kind.kind, id(g), scale, steps, interval)
        padded = kind.padded(g.model, parts, rows)
        return list(self.graphs.run(key, run, pad_rows(noise, rows), *padded)[:n].split(counts))
