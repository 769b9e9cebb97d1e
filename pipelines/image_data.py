"""The images Parquet (DESIGN.md §3.1, reptok_core/formats/images.py) as a Ray Dataset: the
streamed training input of stages 0 and 1 under Ray."""

from __future__ import annotations

from typing import Any

from reptok_core import storage
from reptok_core.formats import images


def train_dataset(uri: str, with_latents: bool = True) -> Any:
    import ray.data

    ds_info = images.dataset(uri)
    fs, _ = storage.filesystem(uri)
    ds = ray.data.read_parquet(ds_info.files, filesystem=fs)
    ds = ds.select_columns(images.training_columns(ds_info.schema, with_latents))
    return ds.map_batches(images.decode_batch, batch_format="numpy")
