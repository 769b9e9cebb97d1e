"""Building and starting the Serve application: the graph Api -> Models for a ServeConfig."""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from pipelines.common import resolve_use_gpu
from pipelines.serving.api import Api
from pipelines.serving.config import ServeConfig
from pipelines.serving.models import Models
from reptok_core.config import load_config, to_dict


def bind(cfg: ServeConfig) -> Any:
    """The Serve application (an unstarted graph: Api -> Models) for a filled config."""
    s = cfg.scaling
    _bad_cfg = [
        (s.max_batch_size < 1, "scaling.max_batch_size must be >= 1"),
        (s.min_replicas > s.max_replicas, "scaling.min_replicas must be <= scaling.max_replicas"),
        (
            cfg.limits.default_steps > cfg.limits.max_steps,
            "limits.default_steps exceeds limits.max_steps",
        ),
    ]
    for bad, msg in _bad_cfg:
        if bad:
            raise ValueError(msg)
    models = serve.deployment(Models).options(
        name="Models",
        ray_actor_options={
            "num_cpus": s.model_cpus,
            "num_gpus": 1 if resolve_use_gpu(s.use_gpu, "scaling.use_gpu") else 0,
        },
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        },
        # A replica must accept a full batch (plus the next one queuing) to batch at all.
        max_ongoing_requests=max(2 * s.max_batch_size, int(s.target_ongoing_requests) + 1),
        user_config=to_dict(cfg.model),
    )
    ingress = Api.options(
        num_replicas=s.ingress_replicas, ray_actor_options={"num_cpus": s.ingress_cpus}
    )
    return ingress.bind(models.bind(to_dict(s)), to_dict(cfg.limits))


def build_app(args: dict[str, str] | None = None) -> Any:
    """`serve run pipelines.serve:build_app config=PRESET.yaml model.tokenizer=...` builder."""
    args = dict(args or {})
    http = sorted(k for k in args if k.startswith("http."))
    if http:
        # The builder only returns the application: Serve's proxy is already configured by
        # whoever deploys it, so these would be silently ignored.
        raise ValueError(
            f"{', '.join(http)}: the http section applies only to `python pipelines/serve.py`. "
            "Under `serve run` the proxy address is Serve's: start Serve with it first "
            "(`serve start --http-host H --http-port P` on a running cluster, then `serve run "
            "--address auto ...`, with `--route-prefix` / `--name` for the rest), or put it in "
            "a Serve config file's `http_options` (as cluster/kuberay/rayservice.yaml does)"
        )
    preset = args.pop("config", None) or os.environ.get("REPTOK_SERVE_CONFIG") or None
    return bind(load_config(ServeConfig, preset, [f"{k}={v}" for k, v in args.items()]))


def start(cfg: ServeConfig) -> str:
    """Start Serve's proxy on cfg.http (127.0.0.1 unless told otherwise) and deploy; -> base URL."""
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(bind(cfg), name=cfg.http.app_name, route_prefix=cfg.http.route_prefix, blocking=False)
    prefix = cfg.http.route_prefix.rstrip("/")
    return f"http://{cfg.http.host}:{cfg.http.port}{prefix}"
