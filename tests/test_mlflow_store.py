"""MLflow runs, artifacts and registered versions live with the run store the user chose
(pipelines/common.py), never in the process's working directory; experiments are typed for
model training, one per stage."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pipelines import common, model_uri


def _export(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"kind": "test"}')
    (folder / "weights.safetensors").write_bytes(b"\0" * 64)
    return folder


def _register(run: common.RunSettings, export, stage="tokenizer") -> str:
    run_id = common.start_or_resume_mlflow_run(run, run, stage=stage)
    common.register_export(run, run_id, str(export), stage)
    return run_id


def test_sqlite_store_keeps_artifacts_beside_it_not_in_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "job-working-dir"  # what `ray job submit --working-dir` runs in
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "runs"
    run = common.RunSettings(name="t", storage=str(store), register_as="tok")
    run_id = _register(run, _export(tmp_path / "export"))

    assert not any(cwd.iterdir()), list(cwd.iterdir())  # no ./mlruns
    client = mlflow.MlflowClient(common.mlflow_uri(run))
    artifacts = (store / "mlartifacts").as_uri()
    assert client.get_run(run_id).info.artifact_uri.startswith(artifacts)
    mv = client.get_model_version_by_alias("tok", "current")
    assert mv.source.startswith(artifacts)
    local = model_uri.resolve("models:/tok@current", common.mlflow_uri(run), str(tmp_path / "c"))
    assert (Path(local.folder) / "config.json").read_text() == '{"kind": "test"}'


def test_experiment_per_stage_typed_for_training(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = common.RunSettings(name="t", storage=str(tmp_path))
    client = mlflow.MlflowClient(common.mlflow_uri(run))
    tok = common.start_or_resume_mlflow_run(run, run, stage="tokenizer")
    gen = common.start_or_resume_mlflow_run(run, run, stage="generator")
    assert common.start_or_resume_mlflow_run(run, run, stage="tokenizer") == tok  # resumes
    tok_exp = client.get_experiment(client.get_run(tok).info.experiment_id)
    gen_exp = client.get_experiment(client.get_run(gen).info.experiment_id)
    assert (tok_exp.name, gen_exp.name) == ("reptok-tokenizer", "reptok-generator")
    for exp in (tok_exp, gen_exp):
        # The MLflow 3 UI opens training-run experiments in the runs table, not the GenAI view.
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # An experiment an older version created untyped gets the tag on its next run.
    old = client.create_experiment("reptok-encode")
    common.start_or_resume_mlflow_run(run, run, stage="encode")
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_tracking_server_keeps_its_own_artifact_root(tmp_path):
    run = common.RunSettings(storage=str(tmp_path), mlflow_uri="http://mlflow.internal:5000")
    assert common.artifact_location(run) is None
    db = tmp_path / "elsewhere" / "mlflow.db"
    run = common.RunSettings(storage=str(tmp_path / "runs"), mlflow_uri=f"sqlite:///{db}")
    assert common.artifact_location(run) == (db.parent / "mlartifacts").as_uri()


def test_s3_storage_keeps_artifacts_on_s3(tmp_path, monkeypatch, s3_bucket):
    from reptok_core import storage

    monkeypatch.chdir(tmp_path)
    runs = f"{s3_bucket}/runs"
    run = common.RunSettings(
        name="s3", storage=runs, mlflow_uri=f"sqlite:///{tmp_path / 'tracking.db'}", register_as="t"
    )
    run_id = _register(run, _export(tmp_path / "export"))
    client = mlflow.MlflowClient(run.mlflow_uri)
    assert client.get_run(run_id).info.artifact_uri.startswith(f"{runs}/mlartifacts/")
    assert any(f.endswith("/config.json") for f in storage.list_files(f"{runs}/mlartifacts"))
    assert not (tmp_path / "mlruns").exists()
    local = model_uri.resolve("models:/t@current", run.mlflow_uri, str(tmp_path / "cache"))
    assert (Path(local.folder) / "config.json").is_file()


@pytest.mark.parametrize("stage", ["tokenizer", "generator"])
def test_experiment_prefix_is_configurable(tmp_path, stage, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = common.RunSettings(name="x", storage=str(tmp_path), experiment="lab")
    client = mlflow.MlflowClient(common.mlflow_uri(run))
    run_id = common.start_or_resume_mlflow_run(run, run, stage=stage)
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).name == f"lab-{stage}"
