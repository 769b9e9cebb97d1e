"""Local paths and `s3://bucket/key` URIs behind one small API (pyarrow.fs, no Ray).

S3 settings come from arguments or the standard environment: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION / AWS_REGION, and AWS_ENDPOINT_URL (or
REPTOK_S3_ENDPOINT) for S3-compatible servers such as MinIO or a local test server.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_endpoint(endpoint: str | None = None) -> str | None:
    return endpoint or os.environ.get("REPTOK_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(uri: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        parsed = urlparse(uri)
        ep = s3_endpoint(endpoint)
        kwargs: dict = {
            "region": os.environ.get(
                "AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
            )
        }
        if ep:
            p = urlparse(ep if "://" in ep else f"http://{ep}")
            kwargs["endpoint_override"] = p.netloc
            kwargs["scheme"] = p.scheme or "http"
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
            kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(uri: str, endpoint: str | None = None) -> bool:
    fs, path = filesystem(uri, endpoint)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, endpoint: str | None = None) -> bytes:
    fs, path = filesystem(uri, endpoint)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes, endpoint: str | None = None) -> None:
    """Write so that readers see the old object or the whole new one, never a partial file.

    Locally: write a temp file beside it and rename. On S3 a single PUT is already atomic.
    """
    fs, path = filesystem(uri, endpoint)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_files(uri: str, suffix: str = "", endpoint: str | None = None) -> list[str]:
    """Files under a prefix (recursive), as URIs of the same kind as `uri`, sorted."""
    fs, path = filesystem(uri, endpoint)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    paths = sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
    )
    return [f"s3://{p}" for p in paths] if is_s3(uri) else paths


def delete(uri: str, endpoint: str | None = None) -> None:
    fs, path = filesystem(uri, endpoint)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
