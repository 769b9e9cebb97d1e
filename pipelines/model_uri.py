"""Model references used by the stages, Serve and evaluation: an export folder or an MLflow
registry entry.

    runs/tokenizer-tiny/export            a folder written by export_tokenizer / export_generator
    s3://bucket/runs/t1/export            the same on S3
    models:/reptok-tokenizer@current      a registered-model alias (moves when a run registers)
    models:/reptok-tokenizer/3            a fixed registered version
    builtin:NAME                          an export shipped in reptok_core/pretrained/NAME/

Registry entries are downloaded to a local folder (the version's `source` is the run's logged
artifact folder, see common.register_export), so core loaders only ever see plain folders.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass

from reptok_core import storage
from reptok_core.weights import resolve_builtin

_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ResolvedModel:
    uri: str  # what the user gave
    folder: str  # local folder or storage URI the core loader reads
    version: str  # registry version number, or '' for a plain folder


def is_registry(uri: str) -> bool:
    return uri.startswith("models:/")


def tracking_uri(explicit: str = "") -> str | None:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or None


def _parse(uri: str) -> tuple[str, str | None, str | None]:
    m = _MODELS.match(uri)
    if not m:
        raise ValueError(
            f"model reference {uri!r} is not models:/<name>@<alias> or models:/<name>/<version>"
        )
    return m["name"], m["alias"], m["version"]


def registry_version(uri: str, mlflow_uri: str = "") -> str:
    """The version number a registry reference points at now (cheap: no download)."""
    import mlflow

    name, alias, version = _parse(uri)
    client = mlflow.MlflowClient(tracking_uri(mlflow_uri))
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(f"cannot resolve {uri!r} in the MLflow registry: {e}") from None
    return str(mv.version)


def resolve(uri: str, mlflow_uri: str = "", cache_dir: str | None = None) -> ResolvedModel:
    """Turn a reference into a folder the core loaders read; downloads registry versions."""
    if not uri:
        raise ValueError("empty model reference")
    if not is_registry(uri):
        return ResolvedModel(uri, resolve_builtin(uri), "")
    import mlflow

    name, _, _ = _parse(uri)
    version = registry_version(uri, mlflow_uri)
    client = mlflow.MlflowClient(tracking_uri(mlflow_uri))
    source = client.get_model_version(name, version).source
    dst = os.path.join(cache_dir or tempfile.gettempdir(), "reptok-models", name, version)
    os.makedirs(dst, exist_ok=True)
    folder = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=dst, tracking_uri=tracking_uri(mlflow_uri)
    )
    return ResolvedModel(uri, folder, version)


def resolve_export(spec: str, mlflow_uri: str, config_file: str) -> tuple[str, str | None]:
    """(folder, MLflow run id of the training run) of an export folder or a models:/ reference.

    Registry references are downloaded (on whichever node calls this); the run id is the one the
    training stage wrote into the export's `config_file`.
    """
    folder = resolve(spec, mlflow_uri).folder
    path = storage.join(folder, config_file)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} not found: {spec!r} is not an export folder")
    return folder, json.loads(storage.read_bytes(path)).get("mlflow_run_id")
