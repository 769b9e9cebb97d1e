"""File access for the prepare stage, on top of reptok_core.storage.

What this adds to storage: one S3 client per process (storage.filesystem builds a new one per
call; the shard workers read thousands of small objects), local listings that keep dangling links
and unreadable entries (so they become `unreadable` rejects instead of vanishing), and the
relative-path helpers that turn file URIs into stable source keys.
"""

from __future__ import annotations

import functools
import json
import os

import pyarrow.fs as pafs

from reptok_core import storage


@functools.lru_cache(maxsize=8)
def _s3fs(endpoint: str, key_id: str) -> pafs.FileSystem:
    # One S3 client per process and endpoint (key_id only keys the cache): connection reuse.
    return storage.filesystem("s3://cache-key", endpoint or None)[0]


def fs_path(uri: str, endpoint: str = "") -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it), as storage.filesystem, with the S3 client cached."""
    if storage.is_s3(uri):
        return _s3fs(
            storage.s3_endpoint(endpoint or None) or "", os.environ.get("AWS_ACCESS_KEY_ID", "")
        ), uri[5:].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def read(uri: str, endpoint: str = "") -> bytes:
    fs, path = fs_path(uri, endpoint)
    with fs.open_input_stream(path) as f:
        return f.read()


def list_files(uri: str, endpoint: str = "") -> list[str]:
    """Files under a prefix (recursive), sorted; a single file lists as itself. Local listings
    keep dangling links and unreadable entries, so they are rejected as `unreadable` instead of
    vanishing silently."""
    if storage.is_s3(uri):
        fs, path = fs_path(uri, endpoint)
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


def write_jsonl(uri: str, records: list[dict], endpoint: str = "") -> None:
    """One JSON object a line, written atomically (rejects files)."""
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    storage.write_bytes_atomic(uri, body, endpoint or None)


def absolute(uri: str) -> str:
    """An S3 prefix without its trailing slash, or an absolute local path."""
    return uri.rstrip("/") if storage.is_s3(uri) else os.path.abspath(uri)


def rel(uri: str, root: str) -> str:
    return uri[len(root.rstrip("/")) + 1 :] if uri.startswith(root.rstrip("/") + "/") else uri


def resolve(path: str, base_dir: str) -> str:
    if storage.is_s3(path) or os.path.isabs(path):
        return path
    return storage.join(base_dir, path)


def parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."
