"""Stage-2 training batches streamed from a token Parquet too large for memory (DESIGN.md §3;
read through tokens.py).

Each epoch puts the row groups of the manifest's parts in a (seed, epoch) order that every rank
computes alike; laid end to end they form one sequence of rows, of which rank r takes the r-th of
`world_size` equal slices, reading only the row groups its slice touches (one read ahead of use).
Rows then pass through a shuffle pool seeded by (seed, epoch, rank) and leave as batches. So in
an epoch every row goes to exactly one rank (the few beyond a rank's last full batch wait for a
later epoch's order), every rank takes the same number of batches, and a resumed run that replays
an epoch's first k batches gets the very batches it had before.

Batches hold the raw tokens, as the in-memory set does: the task normalises both alike.
Memory: the shuffle pool (up to twice `shuffle_buffer` plus a batch) and two row groups.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from reptok_core.formats import tokens
from reptok_core.stages.generator import batches_per_rank

Arrays = dict[str, np.ndarray]


class TokenStream:
    """This rank's batches of a token Parquet, epoch by epoch, read from storage (local or S3).

    `convert` turns `tokens.table_arrays` rows into the numeric batch columns the task reads
    (train_generator.batch_arrays).
    """

    def __init__(
        self,
        uri: str,
        convert: Callable[[dict[str, Any]], Arrays],
        shuffle_buffer: int,
        rank: int,
        world_size: int,
    ):
        manifest = tokens.read_manifest(uri)
        self.dim = manifest["dim"]
        self.convert = convert
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        dataset = tokens.parts_dataset(uri, manifest)
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
        table = self.row_groups[g].to_table().slice(first, end - first)
        return self.convert(tokens.table_arrays(table, self.dim))


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


def _shuffled(
    chunks: Iterable[Arrays], buffer: int, batch_size: int, rng: np.random.Generator
) -> Iterator[Arrays]:
    """Batches from a shuffle pool: filled to twice `buffer` plus a batch, permuted, then emptied
    down to `buffer` rows, so each row is copied a few times whatever the row-group size."""
    parts: list[Arrays] = []
    n = 0
    for chunk in chunks:
        parts.append(chunk)
        n += len(chunk["token"])
        if n >= 2 * buffer + batch_size:
            pool = _permuted(parts, rng)
            cut = (n - buffer) // batch_size * batch_size
            yield from _split(pool, cut, batch_size)
            parts, n = [{k: v[cut:] for k, v in pool.items()}], n - cut
    if parts:
        yield from _split(_permuted(parts, rng), n // batch_size * batch_size, batch_size)


def _permuted(parts: list[Arrays], rng: np.random.Generator) -> Arrays:
    pool = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = rng.permutation(len(pool["token"]))
    return {k: v[order] for k, v in pool.items()}


def _split(pool: Arrays, end: int, batch_size: int) -> Iterator[Arrays]:
    for i in range(0, end, batch_size):
        yield {k: v[i : i + batch_size] for k, v in pool.items()}
