"""The images Parquet (reptok_core/formats/images.py) as a Ray Dataset: the training stream."""

from __future__ import annotations

from typing import Any

from reptok_core import storage
from reptok_core.formats import images


def train_dataset(uri: str, with_latents: bool = True) -> Any:
    import ray.data

    ds_info = images.dataset(uri)
    columns = ["image"] + [
        c
        for c in ("vae_latent", "label")
        if c in ds_info.schema.names and (c != "vae_latent" or with_latents)
    ]
    fs, _ = storage.filesystem(uri)
    ds = ray.data.read_parquet(ds_info.files, filesystem=fs).select_columns(columns)
    return ds.map_batches(images.decode_batch, batch_format="numpy")
