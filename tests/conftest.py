"""Shared pytest fixtures: one local Ray cluster and one S3-compatible server per session."""

from __future__ import annotations

import os
import socket
import uuid

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by the whole session (starting one costs ~10 s here)."""
    import ray

    started = not ray.is_initialized()
    if started:
        # 4 logical CPUs on 2 cores: 2 training workers must leave slots for the Ray Data tasks.
        ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1; the AWS env vars point every client (boto3, pyarrow,
    s3fs, reptok_core.storage) at it. Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; yields 's3://<name>'."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def fashion_parquet(tmp_path_factory):
    """128 Fashion-MNIST images at 16 px: an images Parquet (DESIGN.md §3.1) written directly."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reptok_core.images import encode_image, prepare_array
    from reptok_core.prepare.builtin_datasets import load_fashion_mnist

    root = tmp_path_factory.mktemp("fashion16")
    pixels, labels = load_fashion_mnist("train")
    for part, (lo, hi) in enumerate([(0, 112), (112, 128)]):
        rows = [
            dict(
                id=f"fm-{i:05d}",
                image=encode_image(prepare_array(pixels[i], 16)),
                height=16,
                width=16,
                label=int(labels[i]),
                caption=None,
                source="fashion-mnist",
            )
            for i in range(lo, hi)
        ]
        split = "train" if part == 0 else "val"
        (root / split).mkdir()
        pq.write_table(pa.Table.from_pylist(rows), root / split / "part-0.parquet")
    assert np.all(labels[:128] >= 0)
    return root


@pytest.fixture(scope="session")
def captioned_parquet(tmp_path_factory):
    """48 Fashion-MNIST images (classes 0 and 1) at 16 px in 6 files, with repeating captions
    (6 distinct): an images Parquet for encode_tokens / train_generator tests."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reptok_core.images import encode_image, prepare_array
    from reptok_core.prepare.builtin_datasets import load_fashion_mnist

    root = tmp_path_factory.mktemp("captioned16")
    pixels, labels = load_fashion_mnist("train")
    names = ["t-shirt", "trouser"]
    picks = [i for i in range(len(labels)) if labels[i] in (0, 1)][:48]
    rows = [
        dict(
            id=f"fm-{i:05d}",
            image=encode_image(prepare_array(pixels[i], 16)),
            height=16,
            width=16,
            label=int(labels[i]),
            caption=f"a {names[labels[i]]}, style {k % 3}",
            source="fashion-mnist",
        )
        for k, i in enumerate(picks)
    ]
    for f in range(6):
        pq.write_table(pa.Table.from_pylist(rows[f * 8 : (f + 1) * 8]), root / f"part-{f}.parquet")
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer_export(tmp_path_factory):
    """A randomly initialised `tiny` tokenizer (configs/tokenizer/tiny.yaml), exported."""
    import torch

    from pipelines.train_tokenizer import TrainTokenizerConfig
    from reptok_core.config import load_config
    from reptok_core.exports.tokenizer import export_tokenizer
    from reptok_core.models.tokenizer import Tokenizer

    cfg = load_config(TrainTokenizerConfig, "configs/tokenizer/tiny.yaml").model
    uri = str(tmp_path_factory.mktemp("tokenizer") / "export")
    torch.manual_seed(0)
    tok = Tokenizer(cfg)
    # A made-up run id: encode_tokens copies it into its lineage tag and manifest.
    export_tokenizer(tok.state_dict(), cfg, tok.decoder.sizes, uri, {"mlflow_run_id": "tok-run-0"})
    return uri
