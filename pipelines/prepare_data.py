"""Stage 0: turn raw images into the images Parquet of DESIGN.md §3 with Ray Data.

    python pipelines/prepare_data.py --config configs/prepare/fashion-mnist.yaml output.uri=out/fm
    python pipelines/prepare_data.py source.kind=folder source.uri=s3://raw/imagenet/train \\
        output.uri=s3://prepared/imagenet-256 image.resolution=256 output.val_fraction=0.01
    ray job submit --working-dir . -- python pipelines/prepare_data.py --config ...

Output under `output.uri` (local folder or s3://bucket/prefix):
    part-NNNNN-<hash>-K.parquet  image rows (or train/ and val/ sub-prefixes when
                                 output.val_fraction > 0, so a reader opens one split directly)
    rejects/*.jsonl              one JSON line per dropped input: key, id, uri, reason, detail
    _shards/*.json               per-shard completion markers (files, counts)
    _manifest.json               written last, atomically: counts, class names, settings, command

How it stays idempotent: the driver lists the inputs (keys only, never pixels), sorts them and cuts
them into shards of `output.shard_rows`. A shard's name is a hash of the settings and of its keys,
and its files are written under that name (each one atomically) followed by its marker. A re-run
skips shards whose marker and files exist, rewrites half-done ones under the same names, and
deletes leftovers that belong to no current shard, so the rows are exactly the planned ones no
matter where an earlier run was killed.

Ray Data runs one task per shard (`map_batches` over the shard list): the task reads, decodes into
numpy uint8, crops, encodes and writes its rows itself, so pixels never cross the object store and
memory stays at about one shard per CPU. Only small per-shard summaries flow back to the driver,
which prints progress from them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import json
import logging
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from reptok_core import builtin_datasets, storage
from reptok_core.config import ConfigError, describe, load_config, opt, section, to_dict
from reptok_core.images import (
    IMAGE_FORMATS,
    ImageRejected,
    encode_image,
    prepare_array,
    prepare_bytes,
    stable_id,
)

log = logging.getLogger("reptok.prepare_data")

SOURCE_KINDS = ("folder", "manifest", "parquet", "webdataset", "fashion-mnist", "emoji")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
MANIFEST_NAME = "_manifest.json"
PLAN_REJECTS = "rejects/planning.jsonl"
ROW_GROUP_ROWS = 256  # ~30 MB of 256-px PNGs: big enough for fast scans, small enough to stream
FORMAT_VERSION = "reptok.images/1"


# ----------------------------------------------------------------------------- configuration


@dataclass
class SourceConfig:
    kind: str = opt("folder", f"what the input is: {' | '.join(SOURCE_KINDS)}")
    uri: str = opt(
        "",
        "where it lives (local path or s3://): the image folder; the CSV/JSONL/Parquet manifest; "
        "a Parquet file or prefix; a .tar file or prefix of WebDataset shards; for fashion-mnist "
        "the folder of idx files (empty = Debian's /usr/share/datasets/fashion-mnist); for emoji "
        "the font (empty = Noto Color Emoji)",
    )
    folder_layout: str = opt(
        "auto",
        "folder: 'classes' (ImageNet layout, one sub-folder per class -> label and class names), "
        "'flat' (no labels) or 'auto' (classes when no image sits at the top level)",
    )
    path_column: str = opt("path", "manifest: column with image paths (relative to the manifest)")
    caption_column: str = opt("caption", "manifest/parquet: caption column, used when present")
    label_column: str = opt(
        "label", "manifest/parquet: label column (ints, or strings mapped to sorted class ids)"
    )
    image_column: str = opt(
        "image", "parquet: encoded image bytes (binary, or a struct with a 'bytes' field)"
    )
    id_column: str = opt(
        "", "manifest/parquet: column holding each row's stable key (default: path / file#row)"
    )
    split: str = opt("train", "fashion-mnist: which of its splits to read: train | test | all")
    class_names: list[str] = opt([], "override the class names (label i -> class_names[i])")
    limit: int = opt(0, "keep only the first N inputs after sorting by id (0 = all): smoke runs")


@dataclass
class ImageConfig:
    resolution: int = opt(256, "output side in pixels (ADM centre crop + resize)")
    format: str = opt("png", f"encoding of the stored image: {' | '.join(IMAGE_FORMATS)}")
    quality: int = opt(95, "JPEG/WebP quality (WebP 100 = lossless)")
    png_compress_level: int = opt(6, "PNG zlib level 0-9 (lower = faster, bigger files)")
    min_size: int = opt(0, "reject images whose shorter side is below this (0 = keep all)")
    max_pixels: int = opt(
        89_478_485, "reject images with more pixels than this before decoding (bomb guard)"
    )


@dataclass
class OutputConfig:
    uri: str = opt("data/prepared", "output prefix: local folder or s3://bucket/prefix")
    shard_rows: int = opt(1000, "inputs per shard; one Ray task each, at most this many rows/file")
    shard_mb: float = opt(256.0, "start a new file within a shard once this many MB are buffered")
    val_fraction: float = opt(
        0.0, "fraction of ids (by stable hash) written under val/ instead of train/; 0 = no split"
    )
    overwrite: bool = opt(
        False, "replace an output made with different settings instead of refusing to run"
    )


@dataclass
class VAEConfig:
    enabled: bool = opt(False, "also store SD-VAE latents in a `vae_latent` column")
    model: str = opt("stabilityai/sd-vae-ft-mse", "VAE: diffusers hub id, local folder or s3://")
    actors: int = opt(1, "VAE actors (each loads the model once)")
    num_gpus: float = opt(1.0, "GPUs per VAE actor (0 runs it on CPU)")


@dataclass
class S3Config:
    endpoint: str = opt(
        "", "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL / REPTOK_S3_ENDPOINT)"
    )
    access_key_id: str = opt("", "S3 key id (default: AWS_ACCESS_KEY_ID; prefer the environment)")
    secret_access_key: str = opt("", "S3 secret (default: AWS_SECRET_ACCESS_KEY; never logged)")
    region: str = opt("", "S3 region (default: AWS_REGION / AWS_DEFAULT_REGION / us-east-1)")


@dataclass
class PrepareConfig:
    source: SourceConfig = section(SourceConfig, "input images")
    image: ImageConfig = section(ImageConfig, "per-image processing")
    output: OutputConfig = section(OutputConfig, "where and how the Parquet is written")
    vae: VAEConfig = section(VAEConfig, "optional precomputed SD-VAE latents")
    s3: S3Config = section(S3Config, "S3 access, for inputs and outputs")
    executor: str = opt("ray", "'ray' (Ray Data, honours RAY_ADDRESS) or 'inline' (this process)")
    batch_size: int = opt(64, "images decoded/encoded together inside a shard task")
    task_retries: int = opt(
        3,
        "retries of a shard task that raised (a failed S3 write, say); lost workers are retried by Ray",
    )
    progress_s: float = opt(10.0, "seconds between progress lines")


class PrepareError(Exception):
    """A run-level failure with the exit code the CLI returns (1: nothing usable, 2: setup)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def validate(cfg: PrepareConfig) -> None:
    def bad(msg: str) -> None:
        raise ConfigError(msg)

    if cfg.source.kind not in SOURCE_KINDS:
        bad(f"source.kind={cfg.source.kind!r}; expected one of {SOURCE_KINDS}")
    if cfg.source.kind in ("folder", "manifest", "parquet", "webdataset") and not cfg.source.uri:
        bad(f"source.uri is required for source.kind={cfg.source.kind}")
    if cfg.source.folder_layout not in ("auto", "classes", "flat"):
        bad(f"source.folder_layout={cfg.source.folder_layout!r}; expected auto | classes | flat")
    if cfg.source.split not in ("train", "test", "all"):
        bad(f"source.split={cfg.source.split!r}; expected train | test | all")
    if cfg.image.format not in IMAGE_FORMATS:
        bad(f"image.format={cfg.image.format!r}; expected one of {IMAGE_FORMATS}")
    if cfg.image.resolution <= 0 or cfg.output.shard_rows <= 0 or cfg.batch_size <= 0:
        bad("image.resolution, output.shard_rows and batch_size must be positive")
    if not 0.0 <= cfg.output.val_fraction < 1.0:
        bad(f"output.val_fraction={cfg.output.val_fraction} must be in [0, 1)")
    if cfg.executor not in ("ray", "inline"):
        bad(f"executor={cfg.executor!r}; expected ray | inline")
    if not cfg.output.uri:
        bad("output.uri is required")


def fingerprint(cfg: PrepareConfig) -> str:
    """Hash of every setting that changes the bytes written (not where, nor how fast)."""
    relevant = {
        "source": to_dict(cfg.source),
        "image": to_dict(cfg.image),
        "output": {
            k: v
            for k, v in to_dict(cfg.output).items()
            if k in ("shard_rows", "shard_mb", "val_fraction")
        },
        "vae": to_dict(cfg.vae) if cfg.vae.enabled else None,
        "format": FORMAT_VERSION,
    }
    return hashlib.blake2b(json.dumps(relevant, sort_keys=True).encode(), digest_size=8).hexdigest()


# ----------------------------------------------------------------------------- filesystem helpers


@functools.lru_cache(maxsize=8)
def _s3fs(endpoint: str, key_id: str) -> pafs.FileSystem:
    # One S3 client per process and endpoint (key_id only keys the cache): connection reuse.
    return storage.filesystem("s3://cache-key", endpoint or None)[0]


def _fs_path(uri: str, endpoint: str = "") -> tuple[pafs.FileSystem, str]:
    if storage.is_s3(uri):
        return _s3fs(
            storage.s3_endpoint(endpoint or None) or "", os.environ.get("AWS_ACCESS_KEY_ID", "")
        ), uri[5:].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _read(uri: str, endpoint: str = "") -> bytes:
    fs, path = _fs_path(uri, endpoint)
    with fs.open_input_stream(path) as f:
        return f.read()


def _list(uri: str, endpoint: str = "") -> list[str]:
    """Files under a prefix (recursive), sorted. Local listings keep dangling links and
    unreadable entries, so they are rejected as `unreadable` instead of vanishing silently."""
    if storage.is_s3(uri):
        fs, path = _fs_path(uri, endpoint)
        if fs.get_file_info(path).type == pafs.FileType.File:
            return [uri.rstrip("/")]
        return storage.list_files(uri, endpoint=endpoint or None)
    root = os.path.abspath(uri)
    if os.path.isfile(root):
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in filenames)
    return sorted(out)


def _rel(uri: str, root: str) -> str:
    return uri[len(root.rstrip("/")) + 1 :] if uri.startswith(root.rstrip("/") + "/") else uri


def _resolve(path: str, base_dir: str) -> str:
    if storage.is_s3(path) or os.path.isabs(path):
        return path
    return storage.join(base_dir, path)


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


# ----------------------------------------------------------------------------- planning (driver)
#
# An item is a small dict: "key" (stable source key), "id", "label", "caption", plus what the
# worker needs to fetch its pixels ("uri"; "uri"+"rg"+"row"; "uri"+"img"/"txt"/"json"/"cls"
# byte ranges; "split"+"index"; "cp"). Planning never reads pixels.


@dataclass
class Plan:
    items: list[dict]
    rejects: list[dict]
    class_names: list[str] | None
    ignored: int = 0  # files skipped by name (hidden, non-image extensions), not by content
    keep_order: bool = False  # container sources: keep file order so shards read sequentially


def _item(key: str, **kw: Any) -> dict:
    return {"key": key, "id": stable_id(key), "label": None, "caption": None, **kw}


def _reject(key: str, reason: str, detail: str = "", uri: str = "") -> dict:
    return {"key": key, "id": stable_id(key), "reason": reason, "detail": detail, "uri": uri}


def _plan_folder(src: SourceConfig, endpoint: str) -> Plan:
    root = src.uri.rstrip("/") if storage.is_s3(src.uri) else os.path.abspath(src.uri)
    files, ignored = [], 0
    for uri in _list(root, endpoint):
        rel = _rel(uri, root)
        if any(p.startswith(".") for p in rel.split("/")) or not rel.lower().endswith(
            IMAGE_EXTENSIONS
        ):
            ignored += 1  # .DS_Store, ._AppleDouble, labels.txt, ...
            continue
        files.append((rel, uri))
    layout = src.folder_layout
    if layout == "auto":
        layout = "classes" if files and all("/" in rel for rel, _ in files) else "flat"
    items, class_names = [], None
    if layout == "classes":
        class_names = sorted({rel.split("/", 1)[0] for rel, _ in files if "/" in rel})
        index = {c: i for i, c in enumerate(class_names)}
        for rel, uri in files:
            if "/" not in rel:
                ignored += 1  # a stray file at the top of a class layout has no class
                continue
            items.append(_item(rel, uri=uri, label=index[rel.split("/", 1)[0]]))
    else:
        items = [_item(rel, uri=uri) for rel, uri in files]
    return Plan(items, [], class_names, ignored)


def _read_table(uri: str, endpoint: str) -> pa.Table:
    data = _read(uri, endpoint)
    low = uri.lower()
    if low.endswith(".csv"):
        import pyarrow.csv as pacsv

        return pacsv.read_csv(pa.BufferReader(data))
    if low.endswith((".jsonl", ".json", ".ndjson")):
        import pyarrow.json as pajson

        return pajson.read_json(pa.BufferReader(data))
    if low.endswith(".parquet"):
        return pq.read_table(pa.BufferReader(data))
    raise ConfigError(f"manifest {uri!r}: expected a .csv, .jsonl or .parquet file")


def _labels_to_ints(values: list, class_names: list[str]) -> tuple[list, list[str] | None]:
    """Int labels pass through; string labels become indices into sorted class names."""
    present = [v for v in values if v is not None]
    if not present or all(isinstance(v, int | np.integer) for v in present):
        return [None if v is None else int(v) for v in values], (class_names or None)
    names = class_names or sorted({str(v) for v in present})
    index = {n: i for i, n in enumerate(names)}
    return [None if v is None else index.get(str(v)) for v in values], names


def _plan_manifest(src: SourceConfig, endpoint: str) -> Plan:
    table = _read_table(src.uri, endpoint)
    cols = table.column_names
    if src.path_column not in cols:
        raise ConfigError(f"manifest {src.uri!r} has no column {src.path_column!r} (has {cols})")
    base = _parent(src.uri if storage.is_s3(src.uri) else os.path.abspath(src.uri))
    paths = table.column(src.path_column).to_pylist()
    captions = (
        table.column(src.caption_column).to_pylist()
        if src.caption_column in cols
        else [None] * len(paths)
    )
    labels, names = _labels_to_ints(
        table.column(src.label_column).to_pylist()
        if src.label_column in cols
        else [None] * len(paths),
        list(src.class_names),
    )
    keys = table.column(src.id_column).to_pylist() if src.id_column else paths
    items, rejects = [], []
    for i, (path, key) in enumerate(zip(paths, keys, strict=True)):
        key = str(key) if key not in (None, "") else f"row{i}"
        if not path:
            rejects.append(_reject(key, "no_image", f"row {i} has an empty {src.path_column!r}"))
            continue
        uri = _resolve(str(path), base)
        cap = None if captions[i] is None else str(captions[i])
        items.append(_item(key, uri=uri, caption=cap, label=labels[i]))
    return Plan(items, rejects, names)


def _hf_class_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    """Class names that Hugging Face `datasets` stores in Parquet metadata (ClassLabel)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feat = json.loads(meta)["info"]["features"][label_column]
        return list(feat["names"]) if feat.get("_type") == "ClassLabel" else None
    except (KeyError, TypeError, ValueError):
        return None


def _plan_parquet(src: SourceConfig, endpoint: str) -> Plan:
    root = src.uri.rstrip("/")
    files = [u for u in _list(root, endpoint) if u.lower().endswith(".parquet")]
    items, rejects, names = [], [], list(src.class_names) or None
    for uri in files:
        rel = _rel(uri, root if not uri == root else _parent(root))
        fs, path = _fs_path(uri, endpoint)
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
            ids = pf.read(columns=[src.id_column]).column(0).to_pylist() if src.id_column else None
        except Exception as e:  # noqa: BLE001 - a broken file is one reject, not a failed run
            rejects.append(_reject(rel, "unreadable", f"{type(e).__name__}: {e}", uri))
            continue
        if src.image_column not in pf.schema_arrow.names:
            raise ConfigError(f"{uri!r} has no image column {src.image_column!r}")
        names = names or _hf_class_names(pf.schema_arrow, src.label_column)
        n = 0
        for rg in range(pf.metadata.num_row_groups):
            for row in range(pf.metadata.row_group(rg).num_rows):
                key = str(ids[n]) if ids is not None and ids[n] is not None else f"{rel}#{n}"
                items.append(_item(key, uri=uri, rg=rg, row=row))
                n += 1
    return Plan(items, rejects, names, keep_order=True)


def _plan_webdataset(src: SourceConfig, endpoint: str) -> Plan:
    """WebDataset: samples are tar members sharing a key (path up to the first dot of the name).
    Only tar headers are read here; workers fetch member bytes by range later."""
    root = src.uri.rstrip("/")
    tars = [u for u in _list(root, endpoint) if u.lower().endswith(".tar")]
    items, rejects = [], []
    for uri in tars:
        fs, path = _fs_path(uri, endpoint)
        samples: dict[str, dict] = {}
        try:
            with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    d, _, base = m.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    key = f"{d}/{stem}" if d else stem
                    samples.setdefault(key, {})[ext.lower()] = [m.offset_data, m.size]
        except (tarfile.TarError, OSError) as e:
            # Samples before the damage are still usable; the rest of the tar is one reject.
            rejects.append(_reject(_rel(uri, root), "unreadable", f"tar: {e}", uri))
        for key, members in samples.items():
            img_ext = next(
                (e for e in members if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None
            )
            if img_ext is None:
                rejects.append(_reject(key, "no_image", f"members {sorted(members)}", uri))
                continue
            items.append(
                _item(
                    key,
                    uri=uri,
                    img=members[img_ext],
                    txt=members.get("txt"),
                    json=members.get("json"),
                    cls=members.get("cls"),
                )
            )
    return Plan(items, rejects, list(src.class_names) or None, keep_order=True)


def _plan_fashion_mnist(src: SourceConfig, endpoint: str) -> Plan:
    splits = ["train", "test"] if src.split == "all" else [src.split]
    items = []
    for split in splits:
        _, labels = builtin_datasets.load_fashion_mnist(split, src.uri)
        items.extend(
            _item(f"fashion-mnist/{split}/{i}", split=split, index=i, label=int(y))
            for i, y in enumerate(labels)
        )
    return Plan(items, [], list(builtin_datasets.FASHION_MNIST_CLASSES))


def _plan_emoji(src: SourceConfig, endpoint: str) -> Plan:
    items = [
        _item(f"emoji/U+{cp:04X}", cp=cp, caption=builtin_datasets.emoji_caption(cp))
        for cp in builtin_datasets.emoji_codepoints(src.uri)
    ]
    return Plan(items, [], None)


_PLANNERS = {
    "folder": _plan_folder,
    "manifest": _plan_manifest,
    "parquet": _plan_parquet,
    "webdataset": _plan_webdataset,
    "fashion-mnist": _plan_fashion_mnist,
    "emoji": _plan_emoji,
}


def plan_source(src: SourceConfig, endpoint: str = "") -> Plan:
    """List the inputs, drop duplicate ids (first one wins), order them, apply the limit."""
    try:
        plan = _PLANNERS[src.kind](src, endpoint)
    except ConfigError:
        raise
    except (FileNotFoundError, OSError, ValueError) as e:
        raise PrepareError(f"cannot read source {src.kind} {src.uri!r}: {e}", exit_code=1) from None
    seen: set[str] = set()
    items = []
    for it in plan.items:
        if it["id"] in seen:
            plan.rejects.append(
                _reject(
                    it["key"], "duplicate_id", "an earlier input has this id", it.get("uri", "")
                )
            )
            continue
        seen.add(it["id"])
        items.append(it)
    if not plan.keep_order:
        # Sorting by the hashed id mixes classes within every shard and makes `limit` a random
        # (yet reproducible) subset.
        items.sort(key=lambda it: it["id"])
    if src.limit > 0:
        items = items[: src.limit]
    plan.items = items
    if src.class_names:
        plan.class_names = list(src.class_names)
    return plan


def make_shards(items: list[dict], shard_rows: int, fp: str) -> list[dict]:
    """Cut items into shards named by position and a hash of (settings, keys)."""
    shards = []
    for n, start in enumerate(range(0, len(items), shard_rows)):
        chunk = items[start : start + shard_rows]
        h = hashlib.blake2b(fp.encode(), digest_size=6)
        for it in chunk:
            h.update(it["key"].encode() + b"\0")
        shards.append({"name": f"{n:05d}-{h.hexdigest()}", "items": chunk})
    return shards


def in_val_split(item_id: str, val_fraction: float) -> bool:
    """Stable train/val assignment from the id alone (salted, so it is independent of sorting)."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(b"split:" + item_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < val_fraction


# ----------------------------------------------------------------------------- shard worker
#
# Runs inside a Ray task (or inline). Ray-free on purpose: tests call it directly.


def _schema(latent_size: int = 0) -> pa.Schema:
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


IMAGES_SCHEMA = _schema()


class _Fetcher:
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

    def __call__(self, it: dict) -> tuple[bytes | np.ndarray, int | None, str | None]:
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
            return _read(it["uri"], self.endpoint), it["label"], it["caption"]
        except Exception as e:  # noqa: BLE001 - missing file, dangling link, I/O error
            raise ImageRejected("unreadable", f"{type(e).__name__}: {e}") from None

    def _parquet_row(self, it: dict) -> tuple[bytes, int | None, str | None]:
        key = (it["uri"], it["rg"])
        if key != self._rg_key:  # items are in file order, so one row group is read once
            fs, path = _fs_path(it["uri"], self.endpoint)
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

    def _tar_sample(self, it: dict) -> tuple[bytes, int | None, str | None]:
        if it["uri"] != self._tar_uri:
            self.close()
            fs, path = _fs_path(it["uri"], self.endpoint)
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
        schema = _schema(int(np.prod(latent.shape)) if latent is not None else 0)
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


def load_vae(model: str) -> Any:
    """The frozen SD-VAE latent space (reptok_core.latent_space), on the GPU when there is one.

    Latents are the posterior mean, not a sample, so re-running a shard writes identical bytes
    (idempotence) and training can add its own noise; they are scaled by the VAE's factor.
    """
    import torch

    from reptok_core.latent_space import SDVAESpace  # lazy: diffusers is heavy

    space = SDVAESpace.from_pretrained(model, sample=False)
    return space.to("cuda" if torch.cuda.is_available() else "cpu")


def encode_vae_latents(images_uint8: np.ndarray, latent_space: Any) -> np.ndarray:
    """(B,H,W,3) uint8 -> float32 (B,C,H/8,W/8) latents from `latent_space.encode`."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2)
    x = x.float() / 127.5 - 1.0
    device = next(latent_space.parameters()).device
    with torch.no_grad():
        z = latent_space.encode(x.to(device))
    return z.float().cpu().numpy()


def process_shard(shard: dict, ctx: dict, latent_space: Any = None) -> dict:
    """Fetch, decode (numpy uint8), crop, encode and write one shard; return its summary.

    Per-image failures become rejects; only failures to write the output escape (Ray retries
    the task, and the run fails with a clear message if retries do not help).
    """
    name, items = shard["name"], shard["items"]
    writer, fetch = ShardWriter(ctx, name), _Fetcher(ctx)
    rejects: list[dict] = []
    counts: dict[str, int] = {}
    kept = image_bytes = 0
    res = ctx["resolution"]
    pool = concurrent.futures.ThreadPoolExecutor(8) if ctx["threaded_reads"] else None

    def safe_fetch(it: dict) -> tuple:
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
                    if isinstance(payload, np.ndarray):
                        pixels = prepare_array(payload, res, min_size=ctx["min_size"])
                    else:
                        pixels = prepare_bytes(
                            payload, res, min_size=ctx["min_size"], max_pixels=ctx["max_pixels"]
                        )
                    good.append((it, pixels, label, caption))
                except ImageRejected as e:
                    counts[e.reason] = counts.get(e.reason, 0) + 1
                    rejects.append(
                        {
                            "key": it["key"],
                            "id": it["id"],
                            "uri": it.get("uri", ""),
                            "reason": e.reason,
                            "detail": e.detail[:300],
                        }
                    )
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
                split = (
                    ("val" if in_val_split(it["id"], ctx["val_fraction"]) else "train")
                    if ctx["val_fraction"] > 0
                    else ""
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
                writer.add(split, row)
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
        body = "".join(json.dumps(r) + "\n" for r in rejects).encode()
        storage.write_bytes_atomic(
            storage.join(ctx["output"], rejects_rel), body, ctx["endpoint"] or None
        )
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
        _marker_uri(ctx["output"], name), json.dumps(summary).encode(), ctx["endpoint"] or None
    )
    return summary


def _marker_uri(output: str, name: str) -> str:
    return storage.join(output, f"_shards/{name}.json")


# ----------------------------------------------------------------------------- Ray execution


def _shard_task(batch: dict[str, np.ndarray], ctx: dict) -> dict[str, np.ndarray]:
    summaries = [json.dumps(process_shard(json.loads(s), ctx)) for s in batch["shard"]]
    return {"summary": np.array(summaries, dtype=object)}


class _VAEShardActor:
    """Same as _shard_task, in an actor that loads the SD-VAE once."""

    def __init__(self, ctx: dict) -> None:
        self.ctx = ctx
        self.space = load_vae(ctx["vae_model"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = [
            json.dumps(process_shard(json.loads(s), self.ctx, self.space)) for s in batch["shard"]
        ]
        return {"summary": np.array(summaries, dtype=object)}


_S3_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "REPTOK_S3_ENDPOINT",
)


def _run_ray(todo: list[dict], ctx: dict, cfg: PrepareConfig):
    import ray

    from pipelines.common import init_ray

    init_ray()  # RAY_ADDRESS -> join that cluster; otherwise start a local one
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False  # ours print rows/s and ETA
    # A shard rewrites the same files under the same names, so retrying any failure (a flaky
    # S3 PUT, say) is safe; lost workers are retried by Ray itself.
    data_ctx.retried_map_errors = True
    data_ctx.max_map_retries = cfg.task_retries
    # Workers of an already-running cluster do not see this process's environment: pass on
    # the S3 settings explicitly.
    env = {k: os.environ[k] for k in _S3_ENV if os.environ.get(k)}
    ds = ray.data.from_items(
        [{"shard": json.dumps(s)} for s in todo], override_num_blocks=len(todo)
    )
    common: dict[str, Any] = {"batch_size": 1, "batch_format": "numpy"}
    if env:
        common["runtime_env"] = {"env_vars": env}
    if ctx["vae_model"]:
        ds = ds.map_batches(
            _VAEShardActor,
            fn_constructor_kwargs={"ctx": ctx},
            num_cpus=1,
            num_gpus=cfg.vae.num_gpus or None,
            compute=ray.data.ActorPoolStrategy(size=cfg.vae.actors),
            **common,
        )
    else:
        ds = ds.map_batches(_shard_task, fn_kwargs={"ctx": ctx}, num_cpus=1, **common)
    for row in ds.iter_rows():
        yield json.loads(row["summary"])


def _run_inline(todo: list[dict], ctx: dict, cfg: PrepareConfig):
    space = load_vae(ctx["vae_model"]) if ctx["vae_model"] else None
    for shard in todo:
        yield process_shard(shard, ctx, space)


# ----------------------------------------------------------------------------- the run


class _Progress:
    def __init__(self, total_rows: int, every_s: float) -> None:
        self.total, self.every = total_rows, every_s
        self.done = self.kept = 0
        self.t0 = self.last = time.monotonic()

    def update(self, summary: dict, force: bool = False) -> None:
        self.done += summary["inputs"]
        self.kept += summary["kept"]
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info(
                "progress: %d/%d inputs (%d kept), %.1f rows/s, ETA %.0fs",
                self.done,
                self.total,
                self.kept,
                rate,
                eta,
            )


def _existing_markers(output: str, names: set[str], endpoint: str) -> dict[str, dict]:
    """Summaries of planned shards already complete (marker present and all its files exist)."""
    existing = set(storage.list_files(output, endpoint=endpoint or None))
    markers = [u for u in existing if u.endswith(".json") and "/_shards/" in u]
    wanted = [u for u in markers if u.rsplit("/", 1)[-1][: -len(".json")] in names]

    def load(u: str) -> dict | None:
        try:
            s = json.loads(_read(u, endpoint))
        except (OSError, ValueError):
            return None
        paths = [f["path"] for f in s["files"]] + (
            [s["rejects_file"]] if s.get("rejects_file") else []
        )
        ok = all(storage.join(output, p) in existing for p in paths)
        return s if ok else None

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        loaded = list(pool.map(load, wanted))
    return {s["shard"]: s for s in loaded if s is not None}


def _is_ours(rel: str) -> bool:
    base = rel.rsplit("/", 1)[-1]
    top = rel.split("/", 1)[0] if "/" in rel else ""
    in_data_dir = top in ("", "train", "val")
    return (
        (
            in_data_dir
            and base.startswith("part-")
            and (base.endswith(".parquet") or ".tmp-" in base)
        )
        or (top == "rejects" and (base.endswith(".jsonl") or ".tmp-" in base))
        or (top == "_shards" and (base.endswith(".json") or ".tmp-" in base))
        or (top == "" and base.startswith(MANIFEST_NAME))
    )


def _clean(output: str, keep: set[str], endpoint: str) -> int:
    """Delete our own files that no current shard claims (from killed or differently-set runs)."""
    removed = 0
    for uri in storage.list_files(output, endpoint=endpoint or None):
        rel = _rel(uri, output)
        if rel not in keep and _is_ours(rel):
            storage.delete(uri, endpoint or None)
            removed += 1
    return removed


def _check_writable(output: str, endpoint: str) -> None:
    probe = storage.join(output, f"_write_probe-{os.getpid()}-{time.time_ns()}")
    try:
        storage.write_bytes_atomic(probe, b"ok", endpoint or None)
        storage.delete(probe, endpoint or None)
    except Exception as e:  # noqa: BLE001
        raise PrepareError(f"output {output!r} is not writable: {type(e).__name__}: {e}") from None


def _redacted(cfg: PrepareConfig) -> dict:
    d = to_dict(cfg)
    for k in ("access_key_id", "secret_access_key"):
        if d["s3"][k]:
            d["s3"][k] = "***"
    return d


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reptok")
    except PackageNotFoundError:
        return "unknown"


def run(cfg: PrepareConfig) -> dict:
    """Prepare the dataset; return the manifest. Raises PrepareError (with an exit code)."""
    validate(cfg)
    t0 = time.monotonic()
    if cfg.s3.access_key_id:  # storage (and the Ray workers, via runtime_env) read the env
        os.environ["AWS_ACCESS_KEY_ID"] = cfg.s3.access_key_id
        os.environ["AWS_SECRET_ACCESS_KEY"] = cfg.s3.secret_access_key
    if cfg.s3.region:
        os.environ["AWS_REGION"] = cfg.s3.region
    endpoint = cfg.s3.endpoint
    output = (
        cfg.output.uri.rstrip("/")
        if storage.is_s3(cfg.output.uri)
        else os.path.abspath(cfg.output.uri)
    )
    fp = fingerprint(cfg)

    _check_writable(output, endpoint)
    manifest_uri = storage.join(output, MANIFEST_NAME)
    if storage.exists(manifest_uri, endpoint or None):
        old = json.loads(_read(manifest_uri, endpoint))
        if cfg.output.overwrite and old.get("fingerprint") != fp:
            log.info("overwrite: removing the previous dataset under %s", output)
            _clean(output, set(), endpoint)
        elif old.get("fingerprint") != fp:
            raise PrepareError(
                f"output {output!r} already holds a dataset made with other settings "
                f"(fingerprint {old.get('fingerprint')} vs {fp} now); pass output.overwrite=true "
                "to replace it, or choose another output.uri"
            )

    plan = plan_source(cfg.source, endpoint)
    shards = make_shards(plan.items, cfg.output.shard_rows, fp)
    if not plan.items and not plan.rejects:
        raise PrepareError(
            f"no inputs found in {cfg.source.kind} source {cfg.source.uri!r}", exit_code=1
        )
    if plan.rejects:
        body = "".join(json.dumps(r) + "\n" for r in plan.rejects).encode()
        storage.write_bytes_atomic(storage.join(output, PLAN_REJECTS), body, endpoint or None)

    done = _existing_markers(output, {s["name"] for s in shards}, endpoint)
    todo = [s for s in shards if s["name"] not in done]
    log.info(
        "%d inputs in %d shards (%d already done), %d rejected while listing",
        len(plan.items),
        len(shards),
        len(done),
        len(plan.rejects),
    )
    ctx = {
        "output": output,
        "endpoint": endpoint,
        "resolution": cfg.image.resolution,
        "format": cfg.image.format,
        "quality": cfg.image.quality,
        "png_compress_level": cfg.image.png_compress_level,
        "min_size": cfg.image.min_size,
        "max_pixels": cfg.image.max_pixels,
        "val_fraction": cfg.output.val_fraction,
        "shard_mb": cfg.output.shard_mb,
        "batch_size": cfg.batch_size,
        "source_uri": cfg.source.uri,
        "image_column": cfg.source.image_column,
        "label_column": cfg.source.label_column,
        "caption_column": cfg.source.caption_column,
        "threaded_reads": cfg.source.kind in ("folder", "manifest"),
        "vae_model": cfg.vae.model if cfg.vae.enabled else "",
    }
    summaries = dict(done)
    progress = _Progress(sum(len(s["items"]) for s in todo), cfg.progress_s)
    if todo:
        runner = _run_ray if cfg.executor == "ray" else _run_inline
        try:
            for s in runner(todo, ctx, cfg):
                summaries[s["shard"]] = s
                progress.update(s)
        except Exception as e:  # noqa: BLE001 - surface as a run failure with the cause
            raise PrepareError(
                f"processing failed (output {output!r}): {type(e).__name__}: {e}"
            ) from e

    ordered = [summaries[s["name"]] for s in shards]
    keep = {PLAN_REJECTS} if plan.rejects else set()
    for s in ordered:
        keep.update(f["path"] for f in s["files"])
        keep.add(f"_shards/{s['shard']}.json")
        if s["rejects_file"]:
            keep.add(s["rejects_file"])
    removed = _clean(output, keep | {MANIFEST_NAME}, endpoint)

    by_reason: dict[str, int] = {}
    for r in plan.rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    for s in ordered:
        for reason, n in s["rejected"].items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    kept = sum(s["kept"] for s in ordered)
    files = [f for s in ordered for f in s["files"]]
    splits: dict[str, dict] = {}
    for f in files:
        sp = splits.setdefault(f["split"] or "all", {"rows": 0, "bytes": 0, "files": []})
        sp["rows"] += f["rows"]
        sp["bytes"] += f["bytes"]
        sp["files"].append(f["path"])
    elapsed = time.monotonic() - t0
    processed = sum(len(s["items"]) for s in todo)
    latent_shape = next((s["latent_shape"] for s in ordered if s.get("latent_shape")), None)
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": sys.argv,
        "version": _version(),
        "source": {"kind": cfg.source.kind, "uri": cfg.source.uri},
        "resolution": cfg.image.resolution,
        "image_format": cfg.image.format,
        "schema": {
            f.name: str(f.type) for f in _schema(int(np.prod(latent_shape)) if latent_shape else 0)
        },
        "class_names": plan.class_names,
        "num_classes": len(plan.class_names) if plan.class_names else None,
        "rows": kept,
        "inputs": len(plan.items) + len(plan.rejects),
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "ignored_files": plan.ignored,
        "image_bytes": sum(s["image_bytes"] for s in ordered),
        "splits": splits,
        "files": [f["path"] for f in files],
        "rejects_files": sorted(k for k in keep if k.startswith("rejects/")),
        "vae_latent": (
            {
                "model": cfg.vae.model,
                "shape": latent_shape,
                "kind": "posterior mean x scaling factor",
            }
            if latent_shape
            else None
        ),
        "config": _redacted(cfg),
        "run": {
            "shards": len(shards),
            "shards_skipped": len(done),
            "shards_processed": len(todo),
            "stale_files_removed": removed,
            "elapsed_s": round(elapsed, 2),
            "images_per_s": round(processed / elapsed, 1) if processed else None,
        },
    }
    if kept == 0:
        raise PrepareError(
            f"no usable images: 0 kept of {manifest['inputs']} inputs "
            f"(rejected by reason: {manifest['rejected_by_reason']}; see {output}/rejects/)",
            exit_code=1,
        )
    # Written last and atomically: its presence means the dataset is complete.
    storage.write_bytes_atomic(
        manifest_uri, json.dumps(manifest, indent=1).encode(), endpoint or None
    )
    log.info(
        "done: kept %d of %d inputs, rejected %d %s, %d files, %.1f MB of images, %.1f s (%s img/s) -> %s",
        kept,
        manifest["inputs"],
        manifest["rejected"],
        manifest["rejected_by_reason"],
        len(files),
        manifest["image_bytes"] / 1e6,
        elapsed,
        manifest["run"]["images_per_s"],
        manifest_uri,
    )
    return manifest


USAGE = """usage: python pipelines/prepare_data.py [--config preset.yaml] [key=value ...]

Prepares images into sharded Parquet (DESIGN.md §3). Options (key=default):
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.help:
        print(USAGE + describe(PrepareConfig))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s prepare_data %(message)s")
    try:
        cfg = load_config(PrepareConfig, args.config, args.overrides)
        run(cfg)
    except ConfigError as e:
        print(f"prepare_data: bad configuration: {e}", file=sys.stderr)
        return 2
    except PrepareError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    # Run the copy imported as `pipelines.prepare_data`, not this `__main__` one: Ray workers
    # unpickle task functions by module name, and `__main__` is not importable there.
    from pipelines.prepare_data import main as _main

    sys.exit(_main())
