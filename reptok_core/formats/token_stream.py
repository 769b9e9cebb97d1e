"""Stage-2 training batches streamed from a token Parquet (DESIGN.md §3.2) too large for memory.

The rank sharding, row-group order and shuffle pool are formats/row_stream.py's; this file only
says how token rows become a batch. Batches hold the raw tokens, as the in-memory set does: the
task normalises both alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reptok_core.formats import tokens
from reptok_core.formats.row_stream import Arrays, RowGroupStream


class TokenStream(RowGroupStream):
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
        dim = manifest["dim"]
        super().__init__(
            tokens.parts_dataset(uri, manifest),
            lambda table: convert(tokens.table_arrays(table, dim)),
            shuffle_buffer,
            rank,
            world_size,
        )
