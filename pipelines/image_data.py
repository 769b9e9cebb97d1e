"""Reading the images Parquet (DESIGN.md §3.1) for training: a Ray Dataset for the train stream
and a small fixed held-out batch for evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.dataset as pads

from reptok_core import storage
from reptok_core.images import decode_rgb


def _parquet_dataset(uri: str) -> pads.Dataset:
    fs, path = storage.filesystem(uri)
    files = [
        f
        for f in storage.list_files(uri, ".parquet")
        if "/rejects/" not in f and "/_" not in f.rsplit("/", 1)[-1]
    ]
    if not files:
        raise FileNotFoundError(
            f"no Parquet files under {uri!r}: run prepare_data first or fix data.train / data.val"
        )
    paths = [storage.filesystem(f)[1] for f in files]
    return pads.dataset(paths, filesystem=fs, format="parquet")


def labels_or_minus_one(values: np.ndarray | list) -> np.ndarray:
    """A label column -> int64 with -1 for "no label" (DESIGN.md §3.1: `label: int32 null`).

    Arrow hands a partly null int column to numpy as float with NaN, and an all-null column
    typed `null` as objects holding None; caption-only datasets have nothing but nulls.
    """
    values = np.asarray(values)
    if values.dtype == object:
        values = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if values.dtype.kind == "f":
        values = np.where(np.isnan(values), -1, values)
    return values.astype(np.int64)


def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PNG/JPEG bytes -> (B, H, W, 3) uint8, inside Ray Data workers (no PIL objects in blocks)."""
    out: dict[str, np.ndarray] = {"image": np.stack([decode_rgb(b) for b in batch["image"]])}
    if "vae_latent" in batch:
        out["vae_latent"] = np.stack([np.asarray(v, dtype=np.float32) for v in batch["vae_latent"]])
    if "label" in batch:
        out["label"] = labels_or_minus_one(batch["label"])
    return out


def train_dataset(uri: str, with_latents: bool = True) -> Any:
    import ray.data

    ds_info = _parquet_dataset(uri)
    columns = ["image"] + [
        c
        for c in ("vae_latent", "label")
        if c in ds_info.schema.names and (c != "vae_latent" or with_latents)
    ]
    fs, _ = storage.filesystem(uri)
    ds = ray.data.read_parquet(ds_info.files, filesystem=fs).select_columns(columns)
    return ds.map_batches(decode_batch, batch_format="numpy")


def heldout_batch(uri: str, n: int) -> dict[str, np.ndarray]:
    """The first `n` rows (sorted by id, so every evaluation sees the same images), decoded."""
    ds = _parquet_dataset(uri)
    cols = ["id", "image"] + [c for c in ("vae_latent", "label") if c in ds.schema.names]
    table = ds.to_table(columns=cols)
    if table.num_rows == 0:
        raise ValueError(f"held-out set {uri!r} is empty")
    table = table.sort_by("id").slice(0, n)
    return decode_batch(
        {c: table.column(c).to_numpy(zero_copy_only=False) for c in cols if c != "id"}
    )
