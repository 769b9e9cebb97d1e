"""Listing the inputs of each source kind (runs on the driver; never reads pixels).

An item is a small dict: "key" (stable source key), "id", "label", "caption", plus what the shard
worker needs to fetch its pixels (see fetch.py): "uri" (a file); "uri"+"rg"+"row" (a Parquet
cell); "uri"+"img"/"txt"/"json"/"cls" (byte ranges of tar members); "split"+"index"
(fashion-mnist); "cp" (an emoji code point).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reptok_core.config import ConfigError
from reptok_core.images import stable_id
from reptok_core.prepare import builtin_datasets, fileio
from reptok_core.prepare.config import PrepareError, SourceConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


@dataclass
class Plan:
    items: list[dict]
    rejects: list[dict]
    class_names: list[str] | None
    ignored: int = 0  # files skipped by name (hidden, non-image extensions), not by content
    keep_order: bool = False  # container sources: keep file order so shards read sequentially


def _item(key: str, **kw: Any) -> dict:
    return {"key": key, "id": stable_id(key), "label": None, "caption": None, **kw}


def reject_record(key: str, reason: str, detail: str = "", uri: str = "") -> dict:
    """One line of rejects/*.jsonl: the dropped input's key, id, reason, detail and uri."""
    return {"key": key, "id": stable_id(key), "reason": reason, "detail": detail, "uri": uri}


def _plan_folder(src: SourceConfig, endpoint: str) -> Plan:
    root = fileio.absolute(src.uri)
    files, ignored = [], 0
    for uri in fileio.list_files(root, endpoint):
        rel = fileio.rel(uri, root)
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
    data = fileio.read(uri, endpoint)
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
    base = fileio.parent(fileio.absolute(src.uri))

    def column(name: str) -> list:
        return table.column(name).to_pylist() if name in cols else [None] * table.num_rows

    paths = column(src.path_column)
    captions = column(src.caption_column)
    labels, names = _labels_to_ints(column(src.label_column), list(src.class_names))
    keys = table.column(src.id_column).to_pylist() if src.id_column else paths
    items, rejects = [], []
    for i, (path, key) in enumerate(zip(paths, keys, strict=True)):
        key = str(key) if key not in (None, "") else f"row{i}"
        if not path:
            rejects.append(
                reject_record(key, "no_image", f"row {i} has an empty {src.path_column!r}")
            )
            continue
        uri = fileio.resolve(str(path), base)
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
    files = [u for u in fileio.list_files(root, endpoint) if u.lower().endswith(".parquet")]
    items, rejects, names = [], [], list(src.class_names) or None
    for uri in files:
        rel = fileio.rel(uri, root if not uri == root else fileio.parent(root))
        fs, path = fileio.fs_path(uri, endpoint)
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
            ids = pf.read(columns=[src.id_column]).column(0).to_pylist() if src.id_column else None
        except Exception as e:  # noqa: BLE001 - a broken file is one reject, not a failed run
            rejects.append(reject_record(rel, "unreadable", f"{type(e).__name__}: {e}", uri))
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
    tars = [u for u in fileio.list_files(root, endpoint) if u.lower().endswith(".tar")]
    items, rejects = [], []
    for uri in tars:
        fs, path = fileio.fs_path(uri, endpoint)
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
            rejects.append(reject_record(fileio.rel(uri, root), "unreadable", f"tar: {e}", uri))
        for key, members in samples.items():
            img_ext = next(
                (e for e in members if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None
            )
            if img_ext is None:
                rejects.append(reject_record(key, "no_image", f"members {sorted(members)}", uri))
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
                reject_record(
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
