"""gFID of a class-conditional generator: class-balanced samples -> stage-1 decoder -> Inception
features -> Fréchet distance to reference statistics (reptok_core/evaluation/fid.py has the protocol).

The evaluation protocol (protocol.py) generates all its samples in one process. Stage-2 training (`TrainingFid`)
splits them over the ranks, which must all sample anyway because the generator is FSDP-sharded,
and gathers the features on rank 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from reptok_core.evaluation import fid
from reptok_core.formats.token_stats import TokenNormalizer
from reptok_core.models.generator import sample_tokens
from reptok_core.training.distributed import world


@torch.no_grad()
def generated_features(
    model: torch.nn.Module,
    normalizer: TokenNormalizer,
    decoder: Any,
    net: fid.InceptionFeatures,
    *,
    start: int,
    count: int,
    num_classes: int,
    scale: float,
    interval: tuple[float, float],
    steps: int,
    seed: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(count, 2048) Inception features of samples start .. start + count - 1 of a class-balanced
    set: sample i has label i % num_classes, and a batch starting at sample i uses seed + i for
    the token and the decoder, so every call with the same arguments draws the same images.
    `progress(done)` is called after each batch."""
    feats = []
    for lo in range(0, count, batch_size):
        first = start + lo
        labels = torch.arange(first, start + min(lo + batch_size, count)) % num_classes
        z = sample_tokens(
            model,
            normalizer,
            labels=labels,
            scale=scale,
            interval=interval,
            steps=steps,
            seed=seed + first,
        )
        images = decoder.decode(z, steps=steps, seed=seed + first)
        feats.append(fid.extract_features(net, fid.unit_range(images), batch_size))
        if progress is not None:
            progress(lo + len(labels))
    return np.concatenate(feats)


@dataclass
class TrainingFid:
    """gFID at stage-2 evaluations: each rank generates an equal share of `num_samples` (the same
    number of generator calls everywhere, as FSDP needs); rank 0, which alone holds the
    `reference` statistics, gets the value."""

    net: fid.InceptionFeatures
    reference: fid.FeatureStats | None
    num_samples: int
    num_classes: int
    batch_size: int

    def measure(
        self,
        model: torch.nn.Module,
        normalizer: TokenNormalizer,
        decoder: Any,
        *,
        scale: float,
        interval: tuple[float, float],
        steps: int,
        seed: int,
    ) -> float | None:
        """gFID on rank 0, None elsewhere."""
        rank, world_size = world()
        share = -(-self.num_samples // world_size)
        feats = generated_features(
            model,
            normalizer,
            decoder,
            self.net,
            start=rank * share,
            count=share,
            num_classes=self.num_classes,
            scale=scale,
            interval=interval,
            steps=steps,
            seed=seed,
            batch_size=self.batch_size,
        )
        mine = torch.from_numpy(feats).to(next(model.parameters()).device)
        gathered = [mine]
        if world_size > 1:
            gathered = [torch.empty_like(mine) for _ in range(world_size)]
            dist.all_gather(gathered, mine)
        if rank != 0:
            return None
        every = torch.cat(gathered)[: self.num_samples].cpu().numpy()
        return fid.fid(self.reference, fid.FeatureStats.from_features(every))
