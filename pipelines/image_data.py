"""The images Parquet (DESIGN.md §3.1) as a Ray Dataset: the streamed training input of stages 0
and 1 under Ray. Reading and decoding rows is reptok_core/formats/image_parquet.py's."""

from __future__ import annotations

from typing import Any

from reptok_core import storage
from reptok_core.formats.image_parquet import decode_batch, parquet_dataset, training_columns


def train_dataset(uri: str, with_latents: bool = True) -> Any:
    import ray.data

    ds_info = parquet_dataset(uri)
    fs, _ = storage.filesystem(uri)
    ds = ray.data.read_parquet(ds_info.files, filesystem=fs)
    ds = ds.select_columns(training_columns(ds_info.schema, with_latents))
    return ds.map_batches(decode_batch, batch_format="numpy")
