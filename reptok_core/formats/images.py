"""The images Parquet (DESIGN.md §3.1): its schema, its data files, and reading rows back decoded.

reptok_core/prepare writes it (writer.py the Parquet files, manifest.py `_manifest.json`); the
tokenizer and encoder stages, encode_tokens and evaluation read it through here; `ImageBatches`
is the training loop's batch source over it under python/torchrun (the Ray Dataset in
pipelines/image_data.py maps `decode_batch` over its blocks instead).

    <prefix>/part-*.parquet      rows of `images_schema` (or under train/ and val/ when split)
    <prefix>/rejects/*.jsonl     the dropped inputs, with reasons
    <prefix>/_shards/, _*.json   completion markers and the manifest: never data
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from reptok_core import storage
from reptok_core.formats.row_stream import RowGroupStream
from reptok_core.images import decode_rgb
from reptok_core.training.distributed import world

FORMAT = "reptok.images/1"  # the manifest's "format"; part of every prepare run's fingerprint


def images_schema(latent_size: int = 0) -> pa.Schema:
    """The row schema (plus `vae_latent` when latent_size > 0)."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("caption", pa.string()),
        pa.field("source", pa.string(), nullable=False),
    ]
    if latent_size:
        fields.append(pa.field("vae_latent", pa.list_(pa.float32(), latent_size)))
    return pa.schema(fields)


def data_files(uri: str) -> list[str]:
    """The Parquet files holding rows under `uri` (a prefix or one split of it)."""
    files = [
        f
        for f in storage.list_files(uri, ".parquet")
        if "/rejects/" not in f and not f.rsplit("/", 1)[-1].startswith("_")
    ]
    if not files:
        raise FileNotFoundError(f"no images Parquet files under {uri!r}: run prepare_data first")
    return files


def dataset(uri: str) -> pads.Dataset:
    """The data files as one pyarrow dataset (local or S3), read lazily."""
    fs, _ = storage.filesystem(uri)
    paths = [storage.filesystem(f)[1] for f in data_files(uri)]
    return pads.dataset(paths, filesystem=fs, format="parquet")


def training_columns(schema: pa.Schema, with_latents: bool = True) -> list[str]:
    """The columns a training batch reads: image, and vae_latent / label where present."""
    wanted = ("vae_latent", "label") if with_latents else ("label",)
    return ["image"] + [c for c in wanted if c in schema.names]


def labels_or_minus_one(values: np.ndarray | list) -> np.ndarray:
    """A label column -> int64 with -1 for "no label" (the schema's `label: int32 null`).

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
    """Rows -> image (B, H, W, 3) uint8 [, vae_latent float32, label int64 with -1 = none]."""
    out: dict[str, np.ndarray] = {"image": np.stack([decode_rgb(b) for b in batch["image"]])}
    if "vae_latent" in batch:
        out["vae_latent"] = np.stack([np.asarray(v, dtype=np.float32) for v in batch["vae_latent"]])
    if "label" in batch:
        out["label"] = labels_or_minus_one(batch["label"])
    return out


def _table_columns(table: pa.Table, columns: list[str]) -> dict[str, np.ndarray]:
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


def heldout_batch(uri: str, n: int) -> dict[str, np.ndarray]:
    """The first `n` rows (sorted by id, so every evaluation sees the same images), decoded."""
    ds = dataset(uri)
    cols = ["id", *training_columns(ds.schema)]
    table = ds.to_table(columns=cols)
    if table.num_rows == 0:
        raise ValueError(f"held-out set {uri!r} is empty")
    table = table.sort_by("id").slice(0, n)
    return decode_batch(_table_columns(table, cols[1:]))


class ImageBatches:
    """The loop's batch source over an images Parquet (local or s3://) without Ray: this rank's
    rows of each epoch (formats/row_stream.py), decoded, as torch tensors. The rank is read at
    the first epoch, so the source may be built before the process group exists."""

    def __init__(
        self, uri: str, batch_size: int, seed: int, shuffle_buffer: int, with_latents: bool = True
    ):
        self.dataset = dataset(uri)
        self.columns = training_columns(self.dataset.schema, with_latents)
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.stream: RowGroupStream | None = None

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        if self.stream is None:
            columns = self.columns
            self.stream = RowGroupStream(
                self.dataset,
                lambda table: decode_batch(_table_columns(table, columns)),
                self.shuffle_buffer,
                *world(),
            )
        for batch in self.stream.epoch_batches(epoch, self.batch_size, self.seed):
            yield {k: torch.from_numpy(v) for k, v in batch.items()}
