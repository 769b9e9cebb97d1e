"""Caption-only data (the text-to-image case: `label` all null) on every read path.

Arrow hands a null int column to numpy as float NaN, or as None when the column is typed
`null`; every reader must turn both into -1 ("no label") instead of crashing.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import encode_tokens, train_tokenizer
from reptok_core.formats import images, tokens
from reptok_core.images import encode_image, prepare_array
from reptok_core.prepare.builtin_datasets import load_fashion_mnist


@pytest.fixture(scope="module")
def caption_only_parquet(tmp_path_factory):
    """24 images at 16 px with captions and a null `label` column, as prepare_data writes it
    for an emoji or caption-manifest source (DESIGN.md §3.1 schema)."""
    root = tmp_path_factory.mktemp("captions-only")
    pixels, _ = load_fashion_mnist("train")
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("image", pa.binary()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("label", pa.int32()),
            ("caption", pa.string()),
            ("source", pa.string()),
        ]
    )
    rows = [
        dict(
            id=f"c-{i:03d}",
            image=encode_image(prepare_array(pixels[i], 16)),
            height=16,
            width=16,
            label=None,
            caption=f"a grey garment, number {i % 4}",
            source="captions",
        )
        for i in range(24)
    ]
    for f in range(2):
        table = pa.Table.from_pylist(rows[f * 12 : (f + 1) * 12], schema=schema)
        pq.write_table(table, root / f"part-{f}.parquet")
    return root


def test_label_columns_with_nulls_become_minus_one():
    as_float = pa.array([3, None, 1], pa.int32()).to_numpy(zero_copy_only=False)
    assert as_float.dtype.kind == "f"  # what Arrow hands over: NaN for the null
    assert images.labels_or_minus_one(as_float).tolist() == [3, -1, 1]
    as_objects = pa.array([None, None], pa.null()).to_numpy(zero_copy_only=False)
    assert images.labels_or_minus_one(as_objects).tolist() == [-1, -1]
    assert images.labels_or_minus_one(np.array([0, 7], np.int32)).dtype == np.int64


def test_heldout_batch_of_caption_only_data(caption_only_parquet):
    batch = images.heldout_batch(str(caption_only_parquet), 5)
    assert batch["image"].shape == (5, 16, 16, 3)
    assert batch["label"].tolist() == [-1] * 5


@pytest.mark.slow
def test_stage1_then_encode_on_caption_only_data(
    ray_cluster, caption_only_parquet, tmp_path, capfd
):
    """Stage 1 reads the held-out batch and the Ray Data stream; encode and stage 2's token
    reader carry the null labels through as -1 and keep the captions. The logs a user reads
    meanwhile: each worker progress line once, no error-level line from the encoder pool."""
    store = tmp_path / "runs"
    capfd.readouterr()
    train_tokenizer.main(
        [
            "--config",
            "configs/tokenizer/tiny.yaml",
            f"data.train={caption_only_parquet}",
            f"run.storage={store}",
            "run.name=captions",
            "run.register_as=",
            "loop.steps=4",
            "loop.checkpoint_every=4",
            "loop.eval_every=4",
            "loop.log_every=2",
        ]
    )
    time.sleep(2)  # worker lines reach the driver asynchronously
    train_log = capfd.readouterr()
    lines = (train_log.out + train_log.err).splitlines()
    step_lines = [ln for ln in lines if "[train] step 4/4" in ln]
    assert len(step_lines) == 1, step_lines  # Ray Train V2 used to print each one twice
    export = store / "captions" / "export"
    out = tmp_path / "tokens"
    manifest = encode_tokens.main(
        [
            "--config",
            "configs/encode/tiny.yaml",
            f"encode.images={caption_only_parquet}",
            f"encode.output={out}",
            f"encode.tokenizer={export}",
            "encode.flip=false",
            f"run.storage={store}",
        ]
    )
    time.sleep(2)
    encode_log = capfd.readouterr()
    assert "max_restarts > 0" not in encode_log.out + encode_log.err
    assert manifest["rows"] == 24 and manifest["num_classes"] == 0
    assert manifest["captioned_rows"] == 24
    data = tokens.load_tokens(str(out))
    assert data["label"].tolist() == [-1] * 24
    assert all(c.startswith("a grey garment") for c in data["caption"])
