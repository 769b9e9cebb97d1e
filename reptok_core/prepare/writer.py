"""The shard worker: fetch, decode into numpy uint8, crop, encode and write one shard.

Runs inside a Ray task (pipelines/prepare_data.py) or inline in this process; Ray-free, so tests
call it directly. Pixels never leave the worker: it writes its Parquet files, its rejects and
finally its marker itself, and returns only a small summary.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reptok_core import storage
from reptok_core.formats.images import images_schema
from reptok_core.images import ImageRejected, encode_image, prepare_array, prepare_bytes
from reptok_core.prepare import fileio
from reptok_core.prepare.fetch import Fetched, Fetcher
from reptok_core.prepare.shards import in_val_split, marker_uri
from reptok_core.prepare.sources import reject_record
from reptok_core.prepare.vae import encode_vae_latents

ROW_GROUP_ROWS = 256  # ~30 MB of 256-px PNGs: big enough for fast scans, small enough to stream


class ShardWriter:
    """Buffers encoded rows per split and writes Parquet files of at most shard_mb."""

    def __init__(self, ctx: dict, name: str) -> None:
        self.ctx, self.name = ctx, name
        self.rows: dict[str, list[dict]] = {}
        self.buffered: dict[str, int] = {}
        self.files: list[dict] = []
        self.latent_shape: list[int] | None = None

    def add(self, split: str, row: dict) -> None:
        self.rows.setdefault(split, []).append(row)
        self.buffered[split] = self.buffered.get(split, 0) + len(row["image"])
        if self.buffered[split] >= self.ctx["shard_mb"] * 2**20:
            self.flush(split)

    def flush(self, split: str) -> None:
        rows = self.rows.pop(split, [])
        self.buffered[split] = 0
        if not rows:
            return
        k = sum(f["split"] == split for f in self.files)
        rel = f"{split + '/' if split else ''}part-{self.name}-{k}.parquet"
        latent = rows[0].get("vae_latent")
        schema = images_schema(int(np.prod(latent.shape)) if latent is not None else 0)
        cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
        if latent is not None:
            cols["vae_latent"] = [r["vae_latent"].ravel() for r in rows]
        table = pa.Table.from_pydict(cols, schema=schema)
        sink = pa.BufferOutputStream()
        small = [c for c in schema.names if c not in ("image", "vae_latent")]
        # Encoded images neither compress nor dictionary-encode; statistics on them are waste.
        pq.write_table(
            table,
            sink,
            row_group_size=ROW_GROUP_ROWS,
            compression={
                c: ("none" if c in ("image", "vae_latent") else "snappy") for c in schema.names
            },
            use_dictionary=small,
            write_statistics=small,
        )
        data = sink.getvalue().to_pybytes()
        storage.write_bytes_atomic(
            storage.join(self.ctx["output"], rel), data, self.ctx["endpoint"] or None
        )
        self.files.append({"path": rel, "split": split, "rows": len(rows), "bytes": len(data)})

    def close(self) -> list[dict]:
        for split in list(self.rows):
            self.flush(split)
        return self.files


def _pixels(payload: bytes | np.ndarray, ctx: dict) -> np.ndarray:
    """Fetched bytes or array -> uint8 (res, res, 3); ImageRejected on bad input."""
    shape = {"min_size": ctx["min_size"], "max_aspect": ctx["max_aspect"]}
    if isinstance(payload, np.ndarray):
        return prepare_array(payload, ctx["resolution"], **shape)
    return prepare_bytes(payload, ctx["resolution"], max_pixels=ctx["max_pixels"], **shape)


def _split_of(item_id: str, val_fraction: float) -> str:
    if val_fraction <= 0:
        return ""
    return "val" if in_val_split(item_id, val_fraction) else "train"


def process_shard(shard: dict, ctx: dict, latent_space: Any = None) -> dict:
    """Fetch, decode (numpy uint8), crop, encode and write one shard; return its summary.

    Per-image failures become rejects; only failures to write the output escape (Ray retries
    the task, and the run fails with a clear message if retries do not help).
    """
    name, items = shard["name"], shard["items"]
    writer, fetch = ShardWriter(ctx, name), Fetcher(ctx)
    rejects: list[dict] = []
    counts: dict[str, int] = {}
    kept = image_bytes = 0
    res = ctx["resolution"]
    pool = concurrent.futures.ThreadPoolExecutor(8) if ctx["threaded_reads"] else None

    def safe_fetch(it: dict) -> tuple[Fetched | None, ImageRejected | None]:
        try:
            return fetch(it), None
        except ImageRejected as e:
            return None, e
        except Exception as e:  # noqa: BLE001
            return None, ImageRejected("unreadable", f"{type(e).__name__}: {e}")

    try:
        for start in range(0, len(items), ctx["batch_size"]):
            batch = items[start : start + ctx["batch_size"]]
            # Reads overlap in threads (S3 latency); decoding stays on this task's one CPU.
            fetched = (
                list(pool.map(safe_fetch, batch)) if pool else [safe_fetch(it) for it in batch]
            )
            good: list[tuple[dict, np.ndarray, int | None, str | None]] = []
            for it, (got, err) in zip(batch, fetched, strict=True):
                try:
                    if err is not None:
                        raise err
                    payload, label, caption = got
                    good.append((it, _pixels(payload, ctx), label, caption))
                except ImageRejected as e:
                    counts[e.reason] = counts.get(e.reason, 0) + 1
                    detail = e.detail[:300]
                    rejects.append(reject_record(it["key"], e.reason, detail, it.get("uri", "")))
            latents = None
            if latent_space is not None and good:
                latents = encode_vae_latents(np.stack([g[1] for g in good]), latent_space)
            for j, (it, pixels, label, caption) in enumerate(good):
                data = encode_image(
                    pixels,
                    ctx["format"],
                    quality=ctx["quality"],
                    png_compress_level=ctx["png_compress_level"],
                )
                row = {
                    "id": it["id"],
                    "image": data,
                    "height": res,
                    "width": res,
                    "label": label,
                    "caption": caption,
                    "source": it["key"],
                }
                if latents is not None:
                    row["vae_latent"] = latents[j]
                    writer.latent_shape = list(latents[j].shape)
                writer.add(_split_of(it["id"], ctx["val_fraction"]), row)
                kept += 1
                image_bytes += len(data)
        files = writer.close()
    finally:
        fetch.close()
        if pool:
            pool.shutdown()
    rejects_rel = None
    if rejects:
        rejects_rel = f"rejects/{name}.jsonl"
        fileio.write_jsonl(storage.join(ctx["output"], rejects_rel), rejects, ctx["endpoint"])
    summary = {
        "shard": name,
        "inputs": len(items),
        "kept": kept,
        "rejected": counts,
        "image_bytes": image_bytes,
        "files": files,
        "rejects_file": rejects_rel,
        "latent_shape": writer.latent_shape,
    }
    # The marker goes last: its presence means every file above is complete.
    storage.write_bytes_atomic(
        marker_uri(ctx["output"], name), json.dumps(summary).encode(), ctx["endpoint"] or None
    )
    return summary
