"""A batch source for data held in memory (training/loop.py's BatchSource seam).

Each epoch is a (seed, epoch) permutation of all rows that every rank computes alike; rank r
takes every world_size-th row of it, and every rank the same number of full batches, so a resumed
run that skips an epoch's first k batches gets the very batches it had before.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from reptok_core.formats.row_stream import batches_per_rank
from reptok_core.training.distributed import world


class TensorBatches:
    """Batches of `data` (equally long tensors by column name), this rank's share of each epoch."""

    def __init__(self, data: dict[str, torch.Tensor], batch_size: int, seed: int):
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"TensorBatches: columns of different lengths {lengths}")
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        rank, world_size = world()
        n = len(next(iter(self.data.values())))
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)
        )
        mine = order[rank::world_size]
        for i in range(batches_per_rank(n, self.batch_size, world_size)):
            idx = mine[i * self.batch_size : (i + 1) * self.batch_size]
            yield {k: v[idx] for k, v in self.data.items()}
