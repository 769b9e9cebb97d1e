"""Fetching one planned item's pixels inside a shard worker, for every source kind.

The counterpart of sources.py: planning records where an input lives (see the item layout there),
the Fetcher reads it back, keeping the open Parquet row group or tar file between consecutive
items of the same container.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from reptok_core.images import ImageRejected
from reptok_core.prepare import builtin_datasets, fileio

Fetched = tuple[bytes | np.ndarray, int | None, str | None]  # (pixels, label, caption)


class Fetcher:
    """Gets one item's pixels (bytes or an array) plus label/caption found in the data."""

    def __init__(self, ctx: dict) -> None:
        self.ctx = ctx
        self.endpoint = ctx["endpoint"]
        self._rg_key: tuple | None = None
        self._rg: dict | None = None
        self._tar_uri: str | None = None
        self._tar: Any = None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def __call__(self, it: dict) -> Fetched:
        if "cp" in it:
            return (
                builtin_datasets.render_emoji(it["cp"], self.ctx["source_uri"]),
                None,
                it["caption"],
            )
        if "index" in it:
            images, _ = builtin_datasets.load_fashion_mnist(it["split"], self.ctx["source_uri"])
            return images[it["index"]], it["label"], None
        if "rg" in it:
            return self._parquet_row(it)
        if "img" in it:
            return self._tar_sample(it)
        try:
            return fileio.read(it["uri"], self.endpoint), it["label"], it["caption"]
        except Exception as e:  # noqa: BLE001 - missing file, dangling link, I/O error
            raise ImageRejected("unreadable", f"{type(e).__name__}: {e}") from None

    def _parquet_row(self, it: dict) -> Fetched:
        key = (it["uri"], it["rg"])
        if key != self._rg_key:  # items are in file order, so one row group is read once
            fs, path = fileio.fs_path(it["uri"], self.endpoint)
            pf = pq.ParquetFile(fs.open_input_file(path))
            names = pf.schema_arrow.names
            cols = [
                c
                for c in (
                    self.ctx["image_column"],
                    self.ctx["label_column"],
                    self.ctx["caption_column"],
                )
                if c and c in names
            ]
            self._rg = pf.read_row_group(it["rg"], columns=cols).to_pydict()
            self._rg_key = key
        assert self._rg is not None
        data = self._rg[self.ctx["image_column"]][it["row"]]
        if isinstance(data, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
            data = data.get("bytes")
        label = self._rg.get(self.ctx["label_column"], [None] * (it["row"] + 1))[it["row"]]
        caption = self._rg.get(self.ctx["caption_column"], [None] * (it["row"] + 1))[it["row"]]
        if data is None:
            raise ImageRejected("no_image", "the image cell is null")
        return data, None if label is None else int(label), caption

    def _tar_sample(self, it: dict) -> Fetched:
        if it["uri"] != self._tar_uri:
            self.close()
            fs, path = fileio.fs_path(it["uri"], self.endpoint)
            self._tar, self._tar_uri = fs.open_input_file(path), it["uri"]

        def member(rng: list | None) -> bytes | None:
            return None if rng is None else self._tar.read_at(rng[1], rng[0])

        data = member(it["img"])
        label, caption = None, None
        meta = member(it["json"])
        if meta:
            try:
                obj = json.loads(meta)
                caption = obj.get("caption", obj.get("text"))
                label = obj.get("label", obj.get("cls"))
            except (ValueError, AttributeError):
                pass  # unreadable side metadata: keep the image without it
        txt, cls = member(it["txt"]), member(it["cls"])
        if txt is not None:
            caption = txt.decode("utf-8", "replace").strip()
        if cls is not None and cls.strip().isdigit():
            label = int(cls.strip())
        return data, None if label is None else int(label), caption
