"""Every cluster manifest parses and agrees with the code: scripts exist, overrides and Serve
arguments load into the scripts' config dataclasses, images carry the pinned Ray version."""

from __future__ import annotations

import gzip
import importlib
import json
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
    """The dataclass a stage script parses its command line into (found in its source, then
    imported): `common.parse_cli(X, ...)` or, for the training stages, `stage.parse(X, ...)`."""
    name = re.search(r"(?:parse_cli|stage\.parse)\(\s*(\w+)", script.read_text())[1]
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
    stages = ["prepare-data", "train-tokenizer", "encode-tokens", "train-generator", "evaluate"]
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
    preset = _local(args.pop("config"))
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


# ------------------------------------------------------------------ what KubeRay and Ray check


def test_rayservice_serve_config_passes_rays_own_schema():
    """KubeRay PUTs serveConfigV2 to the dashboard's /api/serve/applications/, which applies
    Ray's ServeDeploySchema: a local working_dir there fails the deployment."""
    from ray.serve.schema import ServeDeploySchema

    (svc,) = _docs(CLUSTER / "kuberay" / "rayservice.yaml")
    ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    bad = yaml.safe_load(svc["spec"]["serveConfigV2"])
    bad["applications"][0]["runtime_env"] = {"working_dir": "/app"}
    with pytest.raises(ValueError, match="remote URIs"):
        ServeDeploySchema.model_validate(bad)


CRDS = ROOT / "tests" / "data" / "kuberay-crds"


def _strict(schema):
    """kubectl's strict field validation: a field the CRD does not define is an error."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_validator(version: str, kind: str):
    import jsonschema

    schema = json.loads(gzip.decompress((CRDS / version / f"{kind}.json.gz").read_bytes()))
    return jsonschema.Draft7Validator(_strict(schema))


KUBERAY_DOCS = [
    (p, d)
    for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))
    for d in _docs(p)
    if d["apiVersion"] == "ray.io/v1"
]


@pytest.mark.parametrize("version", sorted(p.name for p in CRDS.iterdir() if p.is_dir()))
def test_manifests_validate_against_kuberay_crds(version):
    assert len(KUBERAY_DOCS) == 7
    for path, doc in KUBERAY_DOCS:
        errors = list(_crd_validator(version, doc["kind"]).iter_errors(doc))
        where = [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors]
        assert not where, (path.name, version, where[:5])
    # The check itself bites: a misspelt field is refused.
    path, doc = next((p, d) for p, d in KUBERAY_DOCS if d["kind"] == "RayCluster")
    typo = json.loads(json.dumps(doc))
    typo["spec"]["workerGroupSpecs"][0]["replica"] = 1
    assert list(_crd_validator(version, "RayCluster").iter_errors(typo))


def test_service_names_in_docs_are_the_ones_kuberay_creates():
    """KubeRay names a RayService's Services `<name>-serve-svc` and `<name>-head-svc`, and a
    RayCluster's head Service `<name>-head-svc`."""
    names = set()
    for _, doc in KUBERAY_DOCS:
        if doc["kind"] == "RayService":
            names |= {f"{doc['metadata']['name']}-serve-svc", f"{doc['metadata']['name']}-head-svc"}
        elif doc["kind"] == "RayCluster":
            names.add(f"{doc['metadata']['name']}-head-svc")
    texts = [ROOT / "README.md", CLUSTER / "README.md", *sorted(CLUSTER.rglob("*.yaml"))]
    mentioned = {m for p in texts for m in re.findall(r"svc/([\w-]+)", p.read_text())}
    assert mentioned and mentioned <= names, mentioned - names
    assert "reptok-serve-serve-svc" in mentioned


def test_every_configured_env_var_is_read_by_something():
    env = {d["kind"]: d for d in _docs(CLUSTER / "kuberay" / "env.yaml")}
    keys = set(env["ConfigMap"]["data"]) | set(env["Secret"]["stringData"])
    code = "\n".join(
        p.read_text() for d in ("pipelines", "reptok_core") for p in (ROOT / d).rglob("*.py")
    )
    unread = {k for k in keys if f'"{k}"' not in code}
    assert not unread, f"{unread}: set in env.yaml, read by nothing"


def test_secrets_the_docs_call_optional_are_optional():
    """cluster/README.md says the S3 Secret may be dropped (IRSA on EKS): pods must start
    without it, so every reference to it is `optional: true`."""
    assert "drop it" in (CLUSTER / "README.md").read_text()
    refs = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in _docs(path):
            refs += [(path.name, r) for r in _find(doc, "secretRef")]
    assert len(refs) == 10
    assert all(r.get("optional") is True for _, r in refs), refs


def _find(node, key: str) -> list:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [
            x for v in node.values() for x in _find(v, key)
        ]
    if isinstance(node, list):
        return [x for v in node for x in _find(v, key)]
    return []
