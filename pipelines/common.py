"""What every Ray entry point shares: Ray start-up, run settings, storage for Ray Train,
MLflow run creation / resumption, and model registration. Core code never imports this."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reptok_core import storage
from reptok_core.config import (
    ConfigError,
    Switch,
    choice,
    describe,
    flatten,
    load_config,
    opt,
    to_dict,
)


@dataclass
class RunSettings:
    name: str = opt(
        "reptok-run", "run name; re-running with the same name (and storage) resumes it"
    )
    storage: str = opt(
        "runs", "where checkpoints, exports and the default MLflow store go (path or s3://)"
    )
    num_workers: int = opt(1, "Ray Train workers (one per GPU on a GPU cluster)")
    use_gpu: Switch = opt(Switch.AUTO, "train on GPUs: auto (when the cluster has one), on, off")
    cpus_per_worker: int = opt(1, "CPUs reserved per training worker")
    max_failures: int = opt(
        2, "worker-group restarts from the last checkpoint before the run fails"
    )
    mlflow_uri: str = opt(
        "", "MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite under storage"
    )
    experiment: str = opt(
        "reptok", "MLflow experiment prefix: stage S logs to the experiment '<experiment>-<S>'"
    )
    register_as: str = opt("", "MLflow registered-model name for the export ('' = do not register)")
    alias: str = opt(
        "current",
        "registry alias moved to the newly registered version ('latest' is reserved by MLflow)",
    )


def parse_cli(cls: type, argv: list[str] | None, description: str) -> Any:
    """`--config preset.yaml`, `--help`, and `key=value` overrides -> a filled dataclass."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(
            f"{description}\n\nusage: python {sys.argv[0]} [--config PRESET.yaml] [key=value ...]\n"
        )
        print("options (dotted key=value overrides; defaults shown):")
        print(describe(cls))
        sys.exit(0)
    preset = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SystemExit("--config needs a YAML file")
        preset = argv[i + 1]
        del argv[i : i + 2]
    try:
        return load_config(cls, preset, argv)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


@contextmanager
def reading(option: str) -> Iterator[None]:
    """Around the data an entry point reads BEFORE it starts Ray or an MLflow run: a missing or
    malformed input ends the command with an error naming the option, leaving neither behind."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {option}: {e}") from None


def init_ray(min_cpus: int = 0) -> None:
    """Connect to RAY_ADDRESS when set (ray job submit sets it), else start a local Ray.

    A local Ray gets at least `min_cpus` logical CPUs so that training workers never take every
    CPU slot and starve the Ray Data tasks that feed them (a deadlock on a 2-core laptop).
    """
    import ray

    if not ray.is_initialized():
        local = not os.environ.get("RAY_ADDRESS")
        ray.init(
            num_cpus=max(os.cpu_count() or 1, min_cpus) if local else None,
            runtime_env={
                "env_vars": {
                    k: v
                    for k, v in os.environ.items()
                    if k.startswith(("AWS_", "REPTOK_", "MLFLOW_"))
                }
            },
        )


def gpus_available() -> bool:
    """Whether the Ray cluster has a GPU; before Ray is started, whether this machine has one."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def resolve_use_gpu(setting: Switch | str, option: str = "run.use_gpu") -> bool:
    """A `use_gpu` Switch decided: on, off, or auto = `gpus_available()`."""
    return choice(Switch, setting, option).decide(gpus_available())


def run_dir(run: RunSettings) -> str:
    return storage.join(run.storage, run.name)


def export_uri(run: RunSettings) -> str:
    """Where a training stage writes its consolidated EMA export (safetensors + JSON)."""
    return storage.join(run_dir(run), "export")


def fid_cache_dir(run: RunSettings) -> str:
    """The default reference-statistics cache of a run store, shared by evaluate and training."""
    return storage.join(run.storage, "fid-cache")


def ray_storage(run: RunSettings) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for ray.train.RunConfig, S3 endpoint included."""
    if storage.is_s3(run.storage):
        fs, path = storage.filesystem(run.storage)
        return path, fs
    return os.path.abspath(run.storage), None


def mlflow_uri(run: RunSettings) -> str:
    if run.mlflow_uri:
        return run.mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if storage.is_s3(run.storage):
        raise ConfigError(
            "run.storage is on S3: set run.mlflow_uri (or MLFLOW_TRACKING_URI) to a tracking server"
        )
    os.makedirs(run.storage, exist_ok=True)
    return f"sqlite:///{os.path.abspath(os.path.join(run.storage, 'mlflow.db'))}"


def artifact_location(run: RunSettings) -> str | None:
    """Where a new experiment keeps its artifacts: always with the run store the user chose.

    MLflow's own default for a SQLite store is `./mlruns` in the process's working directory,
    which under `ray job submit --working-dir` is Ray's temporary copy, deleted after the job:
    registered versions would point at nothing. None = the tracking server's artifact root.
    """
    if storage.is_s3(run.storage):
        return storage.join(run.storage, "mlartifacts")
    uri = mlflow_uri(run)
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    folder = run.storage
    if uri.startswith("sqlite:///"):  # next to the database file
        folder = os.path.dirname(uri.removeprefix("sqlite:///"))
    return Path(os.path.abspath(folder), "mlartifacts").as_uri()


# Tells the MLflow 3 UI this experiment holds training runs, so it opens the runs table and
# charts instead of the GenAI (traces) view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(run: RunSettings, stage: str) -> str:
    """The stage's experiment ('<run.experiment>-<stage>'), created typed for model training
    with its artifacts under `artifact_location(run)`."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri(run))
    name = f"{run.experiment}-{stage}"
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location(run), tags=EXPERIMENT_KIND
            )
        except mlflow.exceptions.MlflowException:
            exp = client.get_experiment_by_name(name)  # a concurrent run created it first
            if exp is None:
                raise
    if exp.tags.get("mlflow.experimentKind") is None:
        client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return exp.experiment_id


def start_or_resume_mlflow_run(
    run: RunSettings, cfg: Any, stage: str, tags: dict[str, str] | None = None
) -> str:
    """The MLflow run for (storage, name): created once, found again on every re-run."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri(run))
    exp_id = experiment_id(run, stage)
    key = run_dir(run)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`reptok.run_key` = '{key}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    created = client.create_run(
        exp_id,
        run_name=run.name,
        tags={"reptok.run_key": key, "reptok.stage": stage, **(tags or {})},
    )
    params = {k: str(v)[:500] for k, v in flatten(to_dict(cfg)).items()}
    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(
            created.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]]
        )
    return created.info.run_id


def finish_mlflow_run(run: RunSettings, run_id: str, status: str = "FINISHED") -> None:
    import mlflow

    mlflow.MlflowClient(mlflow_uri(run)).set_terminated(run_id, status)


def register_export(
    run: RunSettings, run_id: str, export_uri: str, artifact_name: str
) -> str | None:
    """Log the exported folder to the run and register it; move `run.alias` to the new version."""
    import mlflow

    if storage.is_s3(export_uri):
        local = os.path.join(
            os.path.abspath(run.storage if not storage.is_s3(run.storage) else "/tmp"),
            "export-cache",
            run.name,
        )
        os.makedirs(local, exist_ok=True)
        for f in storage.list_files(export_uri):
            with open(os.path.join(local, f.rsplit("/", 1)[1]), "wb") as out:
                out.write(storage.read_bytes(f))
        export_uri = local
    client = mlflow.MlflowClient(mlflow_uri(run))
    client.log_artifacts(run_id, export_uri, artifact_path=artifact_name)
    if not run.register_as:
        return None
    try:
        client.create_registered_model(run.register_as)
    except mlflow.exceptions.MlflowException:
        pass  # already registered: add a version
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_name}"
    mv = client.create_model_version(run.register_as, source=source, run_id=run_id)
    if run.alias:
        client.set_registered_model_alias(run.register_as, run.alias, mv.version)
    return mv.version
