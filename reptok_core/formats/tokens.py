"""The token Parquet (DESIGN.md §3.2): layout, writing parts and the manifest, reading it back,
caption cache. pipelines/encode_tokens.py is the Ray job that writes one; stage 2 reads it.

    <prefix>/part-00000-<fp>.parquet   id, label, caption, token: fixed_size_list<float32>[D]
                                       (+ token_flip, the mirrored image's token, when asked)
    <prefix>/_parts/<part>.json        per-part completion marker with its (n, mean, M2) stats
    <prefix>/_captions/                caption states: captions.json + captions.safetensors
    <prefix>/_manifest.json            written last: tokenizer, D, mean, std, rows, parts

One part per input file, named by its index and a fingerprint of everything that shapes it; a
part counts as written once its marker exists (written after it). Readers trust only the parts
the manifest lists, so leftovers of a killed run are never read.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from reptok_core import storage
from reptok_core.formats.token_stats import RunningStats, TokenNormalizer

FORMAT = "reptok-tokens/1"
MANIFEST = "_manifest.json"
PARTS_DIR = "_parts"
CAPTIONS_DIR = "_captions"


def token_schema(dim: int, flip: bool) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("caption", pa.string()),
        pa.field("token", pa.list_(pa.float32(), dim), nullable=False),
    ]
    if flip:
        fields.append(pa.field("token_flip", pa.list_(pa.float32(), dim), nullable=False))
    return pa.schema(fields)


def _fixed_list(x: np.ndarray) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def tokens_table(
    ids: list[str],
    labels: list[int | None],
    captions: list[str | None],
    tokens: np.ndarray,
    flipped: np.ndarray | None = None,
) -> pa.Table:
    cols = [
        pa.array(ids, pa.string()),
        pa.array(labels, pa.int32()),
        pa.array(captions, pa.string()),
        _fixed_list(tokens),
    ]
    if flipped is not None:
        cols.append(_fixed_list(flipped))
    return pa.Table.from_arrays(cols, schema=token_schema(tokens.shape[1], flipped is not None))


def plan_parts(inputs: list[str], tokenizer_id: str, flip: bool) -> list[dict[str, str]]:
    """One part per input file: [{"input": file, "part": name}]. The names carry a fingerprint of
    the inputs (and their sizes), the tokenizer and `flip`, so a changed input or tokenizer never
    reuses a stale part."""
    fs, _ = storage.filesystem(inputs[0])
    sizes = [fs.get_file_info(storage.filesystem(f)[1]).size for f in inputs]
    key = json.dumps([tokenizer_id, flip, [[f, z] for f, z in zip(inputs, sizes, strict=True)]])
    fp = hashlib.blake2b(key.encode(), digest_size=4).hexdigest()
    return [{"input": f, "part": f"part-{i:05d}-{fp}"} for i, f in enumerate(inputs)]


def _marker(uri: str, part: str) -> str:
    return storage.join(uri, PARTS_DIR, f"{part}.json")


def part_done(uri: str, part: str) -> bool:
    return storage.exists(_marker(uri, part))


def write_part(
    uri: str,
    part: str,
    ids: list[str],
    labels: list[int | None],
    captions: list[str | None],
    tokens: np.ndarray,
    flipped: np.ndarray | None = None,
) -> None:
    """One part and then its marker, each atomically: the marker is the part's commit."""
    buf = io.BytesIO()
    pq.write_table(tokens_table(ids, labels, captions, tokens, flipped), buf)
    storage.write_bytes_atomic(storage.join(uri, f"{part}.parquet"), buf.getvalue())
    stats = RunningStats(tokens.shape[1])
    stats.update(torch.from_numpy(tokens))
    marker = {
        "rows": len(ids),
        "mean": stats.mean.tolist(),
        "m2": stats.m2.tolist(),
        "max_label": max((v for v in labels if v is not None), default=-1),
        "captioned": sum(c is not None for c in captions),
    }
    storage.write_bytes_atomic(_marker(uri, part), json.dumps(marker).encode())


def write_manifest(
    uri: str, parts: list[str], images: str, flip: bool, lineage: dict[str, Any]
) -> dict[str, Any]:
    """The manifest of finished `parts` (in order), their markers' statistics merged; `lineage`
    (tokenizer, runs, config) is recorded as given. Written last: it makes the set readable."""
    stats, rows, max_label, captioned = None, 0, -1, 0
    for part in parts:
        m = json.loads(storage.read_bytes(_marker(uri, part)))
        stats = stats or RunningStats(len(m["mean"]))
        stats.merge(m["rows"], torch.tensor(m["mean"]), torch.tensor(m["m2"]))
        rows += m["rows"]
        max_label = max(max_label, m["max_label"])
        captioned += m["captioned"]
    manifest = {
        "format": FORMAT,
        "images": images,
        "dim": int(stats.mean.numel()),
        "rows": rows,
        "mean": stats.mean.tolist(),
        "std": stats.std.tolist(),
        "num_classes": max_label + 1,
        "captioned_rows": captioned,
        "flip": flip,
        "parts": [f"{part}.parquet" for part in parts],
        **lineage,
    }
    storage.write_bytes_atomic(storage.join(uri, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def remove_stale(uri: str, parts: list[str]) -> int:
    """Delete the parts and markers not in `parts` (an earlier plan: another tokenizer or input);
    returns how many files went."""
    keep = set(parts)
    n = 0
    for f in storage.list_files(uri):
        name = f.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if name.startswith("part-") and name not in keep:
            storage.delete(f)
            n += 1
    return n


def read_manifest(uri: str) -> dict[str, Any]:
    path = storage.join(uri, MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {uri!r} is not a finished token Parquet (run encode_tokens)"
        )
    return json.loads(storage.read_bytes(path))


def normalizer_from_manifest(manifest: dict[str, Any], token_scale: float = 0.0) -> TokenNormalizer:
    """The manifest's per-dimension statistics, or with `token_scale` > 0 the official scalar
    scaling (GeneratorConfig.token_scale)."""
    if token_scale > 0:
        return TokenNormalizer.scalar(len(manifest["mean"]), token_scale)
    return TokenNormalizer(torch.tensor(manifest["mean"]), torch.tensor(manifest["std"]))


def _matrix(col: pa.ChunkedArray, dim: int) -> np.ndarray:
    flat = pa.concat_arrays([c.flatten() for c in col.chunks]) if col.num_chunks else []
    return np.asarray(flat, dtype=np.float32).reshape(-1, dim)


def parts_dataset(uri: str, manifest: dict[str, Any]) -> pads.Dataset:
    """The manifest's parts as one pyarrow dataset (local or S3): read lazily, by row group."""
    fs, _ = storage.filesystem(uri)
    paths = [storage.filesystem(storage.join(uri, p))[1] for p in manifest["parts"]]
    return pads.dataset(paths, filesystem=fs, format="parquet")


def table_arrays(table: pa.Table, dim: int) -> dict[str, Any]:
    """Token rows as arrays: id, label (int64, -1 = none), caption, token (N, D) [, token_flip]."""
    out: dict[str, Any] = {
        "id": table.column("id").to_pylist(),
        "label": np.asarray(table.column("label").fill_null(-1), dtype=np.int64),
        "caption": table.column("caption").to_pylist(),
        "token": _matrix(table.column("token"), dim),
    }
    if "token_flip" in table.column_names:
        out["token_flip"] = _matrix(table.column("token_flip"), dim)
    return out


def load_tokens(uri: str, limit: int = 0) -> dict[str, Any]:
    """The manifest's parts as `table_arrays`, rows sorted by id so every reader sees the same
    order. `limit` keeps the first rows (by id) only."""
    manifest = read_manifest(uri)
    if not manifest["rows"]:
        raise ValueError(f"token Parquet {uri!r} has no rows")
    ds = parts_dataset(uri, manifest)
    first = None
    if limit:
        # Only the ids are read whole, then a filtered scan: a held-out batch from a token set
        # too large for memory (a streamed one) costs little memory.
        ids = ds.to_table(columns=["id"]).column("id")
        first = pc.field("id").isin(ids.take(pc.sort_indices(ids)[:limit]).combine_chunks())
    table = ds.to_table(filter=first).sort_by("id")
    return table_arrays(table, manifest["dim"])


def write_caption_cache(
    uri: str, captions: list[str], states: torch.Tensor, mask: torch.Tensor, encoder: str
) -> None:
    """States are trimmed to the longest real caption and kept in fp16 (they only condition)."""
    length = max(int(mask.sum(1).max()), 1)
    tensors = {
        "states": states[:, :length].to(torch.float16).contiguous().cpu(),
        "mask": mask[:, :length].to(torch.uint8).contiguous().cpu(),
    }
    folder = storage.join(uri, CAPTIONS_DIR)
    storage.write_bytes_atomic(
        storage.join(folder, "captions.safetensors"), save_safetensors_bytes(tensors)
    )
    meta = {
        "encoder": encoder,
        "dim": int(states.shape[-1]),
        "length": length,
        "captions": captions,
    }
    # The JSON is the cache's completion marker: written after the tensors.
    storage.write_bytes_atomic(storage.join(folder, "captions.json"), json.dumps(meta).encode())


def read_caption_cache(uri: str) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor] | None:
    """(meta with 'captions' and 'encoder', states (U, L, E) fp16, mask (U, L) bool) or None."""
    folder = storage.join(uri, CAPTIONS_DIR)
    if not storage.exists(storage.join(folder, "captions.json")):
        return None
    meta = json.loads(storage.read_bytes(storage.join(folder, "captions.json")))
    tensors = load_safetensors_bytes(
        storage.read_bytes(storage.join(folder, "captions.safetensors"))
    )
    return meta, tensors["states"], tensors["mask"].bool()


def caption_index(captions: list[str | None], cached: list[str]) -> np.ndarray:
    """Row of each caption in the cache; a missing or empty caption is an error naming it."""
    where = {c: i for i, c in enumerate(cached)}
    missing = [c for c in captions if c not in where]
    if missing:
        raise ValueError(
            f"{len(missing)} rows have no cached caption state (e.g. {missing[0]!r}); "
            "text generators need a caption on every row: re-run encode_tokens with text_encoder set"
        )
    return np.asarray([where[c] for c in captions], dtype=np.int64)
