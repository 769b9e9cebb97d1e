"""Shards: planning, deterministic names, completion markers, and cleaning up leftovers.

A shard's name is its position plus a hash of the settings fingerprint and of its keys, and every
file it writes carries that name. Its marker (`_shards/<name>.json`, the shard's summary) is
written after its files, so "marker present and all its files exist" means the shard is done.
Anything of ours under the output that no current shard claims is a leftover of a killed run or of
other settings, and is deleted.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json

from reptok_core import storage
from reptok_core.prepare import fileio

MANIFEST_NAME = "_manifest.json"
PLAN_REJECTS = "rejects/planning.jsonl"


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


def marker_rel(name: str) -> str:
    return f"_shards/{name}.json"


def marker_uri(output: str, name: str) -> str:
    return storage.join(output, marker_rel(name))


def existing_markers(output: str, names: set[str], endpoint: str) -> dict[str, dict]:
    """Summaries of planned shards already complete (marker present and all its files exist)."""
    existing = set(storage.list_files(output, endpoint=endpoint or None))
    markers = [u for u in existing if u.endswith(".json") and "/_shards/" in u]
    wanted = [u for u in markers if u.rsplit("/", 1)[-1][: -len(".json")] in names]

    def load(u: str) -> dict | None:
        try:
            s = json.loads(fileio.read(u, endpoint))
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


def claimed_files(summaries: list[dict], plan_rejects: bool) -> set[str]:
    """Relative paths the current shards own (their files, rejects and markers)."""
    keep = {PLAN_REJECTS} if plan_rejects else set()
    for s in summaries:
        keep.update(f["path"] for f in s["files"])
        keep.add(marker_rel(s["shard"]))
        if s["rejects_file"]:
            keep.add(s["rejects_file"])
    return keep


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


def clean(output: str, keep: set[str], endpoint: str) -> int:
    """Delete our own files that no current shard claims (from killed or differently-set runs)."""
    removed = 0
    for uri in storage.list_files(output, endpoint=endpoint or None):
        rel = fileio.rel(uri, output)
        if rel not in keep and _is_ours(rel):
            storage.delete(uri, endpoint or None)
            removed += 1
    return removed
