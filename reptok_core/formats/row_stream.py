"""This rank's training batches of a Parquet dataset, epoch by epoch, streamed by row group.

Used for the token Parquet (formats/token_stream.py) and the images Parquet
(formats/images.py) when no Ray Dataset feeds the loop. Each epoch puts the row groups in
a (seed, epoch) order that every rank computes alike; laid end to end they form one sequence of
rows, of which rank r takes the r-th of `world_size` equal slices, reading only the row groups
its slice touches (one read ahead of use). Rows then pass through a shuffle pool seeded by
(seed, epoch, rank) and leave as batches. So in an epoch every row goes to exactly one rank (the
few beyond a rank's last full batch wait for a later epoch's order), every rank takes the same
number of batches, and a resumed run that replays an epoch's first k batches gets the very
batches it had before.

Memory: the shuffle pool (up to twice `shuffle_buffer` plus a batch) and two row groups.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

Arrays = dict[str, np.ndarray]


def batches_per_rank(rows: int, batch_size: int, world_size: int) -> int:
    """Batches each rank takes per epoch: the same on every rank, since rank 0's position in the
    epoch is the one a checkpoint keeps for all."""
    count = rows // world_size // batch_size
    if count == 0:
        raise ValueError(
            f"{rows} rows over {world_size} workers is fewer than one batch of {batch_size}"
        )
    return count


class RowGroupStream:
    """`read` turns a slice of a row group (a pyarrow Table) into the batch's numeric columns."""

    def __init__(
        self,
        dataset: pads.Dataset,
        read: Callable[[pa.Table], Arrays],
        shuffle_buffer: int,
        rank: int,
        world_size: int,
    ):
        self.read = read
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.row_groups = [g for part in dataset.get_fragments() for g in part.split_by_row_group()]
        self.sizes = np.array([g.row_groups[0].num_rows for g in self.row_groups])
        self.rows = int(self.sizes.sum())

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[Arrays]:
        count = batches_per_rank(self.rows, batch_size, self.world_size)
        rng = np.random.default_rng([seed, epoch, self.rank])
        pieces = self._slice(np.random.default_rng([seed, epoch]).permutation(len(self.sizes)))
        chunks = _read_ahead(self._read, pieces)
        return itertools.islice(_shuffled(chunks, self.shuffle_buffer, batch_size, rng), count)

    def _slice(self, order: np.ndarray) -> list[tuple[int, int, int]]:
        """(row group, first row, end row) of this rank's slice of the epoch's row sequence."""
        lo = self.rank * self.rows // self.world_size
        hi = (self.rank + 1) * self.rows // self.world_size
        ends = np.cumsum(self.sizes[order])
        pieces = []
        for g, end in zip(order, ends, strict=True):
            start = end - self.sizes[g]
            if start < hi and end > lo:
                pieces.append((int(g), int(max(lo, start) - start), int(min(hi, end) - start)))
        return pieces

    def _read(self, piece: tuple[int, int, int]) -> Arrays:
        g, first, end = piece
        return self.read(self.row_groups[g].to_table().slice(first, end - first))


def _read_ahead(read: Callable[[Any], Arrays], pieces: list) -> Iterator[Arrays]:
    """`read` over `pieces` with the next read running in a thread while the current is used."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for piece in pieces:
            following = pool.submit(read, piece)
            if pending is not None:
                yield pending.result()
            pending = following
        if pending is not None:
            yield pending.result()


def _rows(arrays: Arrays) -> int:
    return len(next(iter(arrays.values())))


def _shuffled(
    chunks: Iterable[Arrays], buffer: int, batch_size: int, rng: np.random.Generator
) -> Iterator[Arrays]:
    """Batches from a shuffle pool: filled to twice `buffer` plus a batch, permuted, then emptied
    down to `buffer` rows, so each row is copied a few times whatever the row-group size."""
    parts: list[Arrays] = []
    n = 0
    for chunk in chunks:
        parts.append(chunk)
        n += _rows(chunk)
        if n >= 2 * buffer + batch_size:
            pool = _permuted(parts, rng)
            cut = (n - buffer) // batch_size * batch_size
            yield from _split(pool, cut, batch_size)
            parts, n = [{k: v[cut:] for k, v in pool.items()}], n - cut
    if parts:
        yield from _split(_permuted(parts, rng), n // batch_size * batch_size, batch_size)


def _permuted(parts: list[Arrays], rng: np.random.Generator) -> Arrays:
    pool = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = rng.permutation(_rows(pool))
    return {k: v[order] for k, v in pool.items()}


def _split(pool: Arrays, end: int, batch_size: int) -> Iterator[Arrays]:
    for i in range(0, end, batch_size):
        yield {k: v[i : i + batch_size] for k, v in pool.items()}
