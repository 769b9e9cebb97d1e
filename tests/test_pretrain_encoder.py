"""Stage 0 end to end: DINO pretraining on a real local Ray cluster and MLflow SQLite store, and
the export loading as the tokenizer's encoder."""

import json

import mlflow
import pytest
import torch

from pipelines import pretrain_encoder

pytestmark = pytest.mark.slow


def test_pretrain_export_loads_as_tokenizer_encoder(ray_cluster, fashion_parquet, tmp_path):
    store = tmp_path / "runs"
    run_id = pretrain_encoder.main(
        [
            "--config",
            "configs/pretrain/tiny.yaml",
            f"data.train={fashion_parquet / 'train'}",
            f"data.val={fashion_parquet / 'val'}",
            f"run.storage={store}",
            "run.name=e1",
            "run.num_workers=2",  # replicated students: grads and the centre are all-reduced
        ]
    )
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    dino = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "dino"))
    assert [s for s, _ in dino] == [5, 10, 15, 20]
    assert all(v == v and v < 1e4 for _, v in dino)  # finite
    knn = client.get_metric_history(run_id, "eval/knn_acc")
    assert sorted(m.step for m in knn) == [10, 20] and all(0 <= m.value <= 1 for m in knn)

    export = store / "e1" / "export"
    meta = json.loads((export / "encoder.json").read_text())
    assert 0 <= meta["knn_accuracy"] <= 1 and meta["command"].startswith("python pipelines/")
    assert meta["encoder"]["weights"] == str(export / "encoder.safetensors")

    # The tokenizer builds its encoder from the export exactly like from DINOv2 weights.
    from pipelines.train_tokenizer import TrainTokenizerConfig
    from reptok_core.config import load_config
    from reptok_core.models.tokenizer import Tokenizer
    from reptok_core.weights import load_state_dict_file

    cfg = load_config(
        TrainTokenizerConfig,
        "configs/tokenizer/tiny.yaml",
        [f"model.encoder.weights={meta['encoder']['weights']}"],
    ).model
    tok = Tokenizer(cfg).eval()
    saved = load_state_dict_file(meta["encoder"]["weights"])
    vit = tok.encoder.vit.state_dict()
    assert all(torch.equal(vit[k], v.to(vit[k].dtype)) for k, v in saved.items())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = tok.encoder(x)
    assert z.shape == (2, 32) and torch.isfinite(z).all()
    assert torch.equal(z, tok.encoder.target(x))
