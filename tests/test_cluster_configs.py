"""Every cluster manifest parses and agrees with the code: scripts exist, overrides and Serve
arguments load into the scripts' config dataclasses, images carry the pinned Ray version."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from reptok_core.config import load_config, read_yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
APP = "/app/"  # where cluster/Dockerfile puts the repository


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _ray_pin() -> str:
    return re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text())[1]


def _local(path: str) -> Path:
    return ROOT / path.removeprefix(APP)


def _config_class(script: Path) -> type:
    """The dataclass a stage script hands to parse_cli (found in its source, then imported)."""
    name = re.search(r"parse_cli\(\s*(\w+)", script.read_text())[1]
    module = importlib.import_module(f"pipelines.{script.stem}")
    return getattr(module, name)


def _check_entrypoint(command: str) -> None:
    argv = shlex.split(command)
    assert argv[0] == "python", command
    script = _local(argv[1])
    assert script.is_file() and script.parent.name == "pipelines", f"no such stage script {argv[1]}"
    args = argv[2:]
    preset = None
    if "--config" in args:
        i = args.index("--config")
        preset = _local(args[i + 1])
        assert preset.is_file(), f"{command}: preset {args[i + 1]} missing"
        del args[i : i + 2]
    assert all("=" in a for a in args), args
    load_config(_config_class(script), preset, args)  # raises ConfigError on any unknown key


ALL_YAML = sorted(CLUSTER.rglob("*.yaml"))


def test_cluster_folder_is_complete():
    names = {p.relative_to(CLUSTER).as_posix() for p in ALL_YAML}
    stages = ["prepare-data", "train-tokenizer", "encode-latents", "train-generator", "evaluate"]
    expected = {
        "aws.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayservice.yaml",
        "kuberay/env.yaml",
    }
    expected |= {f"kuberay/rayjob-{s}.yaml" for s in stages}
    assert expected <= names, expected - names
    assert (CLUSTER / "README.md").is_file() and (CLUSTER / "Dockerfile").is_file()


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_yaml_parses(path):
    assert _docs(path)


def test_aws_launcher():
    cfg = _docs(CLUSTER / "aws.yaml")[0]
    assert cfg["provider"]["type"] == "aws"
    assert cfg["docker"]["image"] == f"rayproject/ray:{_ray_pin()}-py311-gpu"
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    gpu = [n for n in nodes.values() if n["resources"].get("GPU", 0) > 0]
    assert gpu, "no GPU worker type"
    assert any(
        n["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for n in gpu
    )
    assert sum(n.get("max_workers", 0) for n in nodes.values()) <= cfg["max_workers"] + 1
    mount = next(iter(cfg["file_mounts"]))
    setup = " ".join(cfg["setup_commands"])
    assert f"{mount}[pipelines,models]" in setup  # our extras, as pyproject names them
    extras = (ROOT / "pyproject.toml").read_text()
    assert "pipelines = [" in extras and "models = [" in extras


def _pod_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _env_refs(container: dict) -> set[str]:
    return {next(iter(r.values()))["name"] for r in container.get("envFrom", [])}


def test_raycluster_and_env():
    env = {d["kind"]: d for d in _docs(CLUSTER / "kuberay" / "env.yaml")}
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_REGION"} <= set(
        env["ConfigMap"]["data"]
    )
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env["Secret"]["stringData"])
    (rc,) = _docs(CLUSTER / "kuberay" / "raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["spec"]["rayVersion"] == _ray_pin()
    for c in _pod_containers(rc["spec"]):
        assert _env_refs(c) == {
            env["ConfigMap"]["metadata"]["name"],
            env["Secret"]["metadata"]["name"],
        }
    gpus = [g for g in rc["spec"]["workerGroupSpecs"] if "nvidia.com/gpu" in str(g)]
    assert gpus and gpus[0]["maxReplicas"] >= 1
    docker = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_ray_pin()}" in docker and "WORKDIR /app" in docker


@pytest.mark.parametrize(
    "path", sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml")), ids=lambda p: p.stem
)
def test_rayjob_entrypoint_matches_its_script(path):
    (job,) = _docs(path)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    rc = _docs(CLUSTER / "kuberay" / "raycluster.yaml")[0]
    assert (
        job["spec"]["clusterSelector"]["ray.io/cluster"]
        == rc["metadata"]["labels"]["ray.io/cluster"]
    )
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == APP.rstrip("/")
    _check_entrypoint(job["spec"]["entrypoint"])
    stage = path.stem.removeprefix("rayjob-").replace("-", "_")
    assert f"pipelines/{stage}.py" in job["spec"]["entrypoint"]


def test_rayservice_matches_serve_app():
    from pipelines import serve as serve_app

    (svc,) = _docs(CLUSTER / "kuberay" / "rayservice.yaml")
    assert (
        svc["kind"] == "RayService" and svc["spec"]["rayClusterConfig"]["rayVersion"] == _ray_pin()
    )
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert serve_cfg["http_options"]["port"] == 8000
    (app,) = serve_cfg["applications"]
    module, attr = app["import_path"].split(":")
    assert module == "pipelines.serve" and callable(getattr(serve_app, attr))
    args = dict(app["args"])
    preset = ROOT / args.pop("config")
    assert preset.is_file()
    cfg = load_config(serve_app.ServeConfig, preset, [f"{k}={v}" for k, v in args.items()])
    assert cfg.model.tokenizer.startswith("models:/")
    assert cfg.scaling.max_replicas == 8
    gpu_groups = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    cpus = float(gpu_groups[0]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
    assert cfg.scaling.model_cpus <= cpus  # a model replica fits on a GPU worker


def test_serve_presets_are_valid():
    from pipelines import serve as serve_app

    for preset in sorted((ROOT / "configs" / "serve").glob("*.yaml")):
        assert read_yaml(preset)
        load_config(serve_app.ServeConfig, preset)
