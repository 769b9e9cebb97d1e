"""Ray Serve application: RepTok generation, reconstruction, token encode / decode, interpolation.

    python pipelines/serve.py --config configs/serve/tiny.yaml model.tokenizer=models:/reptok-tokenizer-tiny@current
    serve run pipelines.serve:build_app config=configs/serve/tiny.yaml model.tokenizer=runs/t1/export
    serve run pipelines.serve:app            # preset from $REPTOK_SERVE_CONFIG, else defaults

Two deployments. `Api` is the FastAPI ingress: it parses and validates every request (types,
ranges, upload size and pixel count, undecodable images) and encodes PNGs, so bad input is
answered with a 4xx JSON error long before it reaches a model. `Models` holds the tokenizer
and the optional class / text generators (one GPU per replica when the cluster has GPUs) and
batches `encode` and `decode` calls across concurrent requests with @serve.batch; decoding (the
50-step flow decoder) is where almost all the time goes, so that is what must batch.

Models come from an export folder (path or s3://) or the MLflow registry (`models:/name@alias`).
The references travel as the deployment's `user_config`: changing it (`serve deploy` with a new
config, or a RayService edit) calls `reconfigure`, which reloads only what changed, without a
restart. With `model.reload_poll_s > 0` replicas also notice on their own when an alias moves.

Endpoints (the contract: GET /openapi.json, or /docs; JSON errors look like
{"error": "...", "detail": [{"field", "problem"}]}: 400 body not JSON or not an image,
404 no model for this endpoint, 413 too large, 422 invalid value, 503 models not loaded yet):
  POST /generate        {"label": 3 | [3, 7], "n": 4, "guidance_scale": 1.5, "steps": 50, "seed": 0,
                         "format": "png" | "json"}      -> PNG (a row for n > 1) or base64 PNGs
  POST /text-to-image   {"prompt": "a red boot", "n", "guidance_scale", "steps", "seed", "format"}
  POST /reconstruct     raw image bytes; ?steps=&seed=  -> PNG at the model's resolution
  POST /encode          raw image bytes                 -> {"token": [floats], "dim": D}
  POST /decode          {"token": [floats], "steps", "seed"} -> PNG
  POST /interpolate     {"a": <base64 image> | [token], "b": ..., "n": 8, "steps", "seed"} -> PNG row
  GET  /healthz, GET /info (model versions, presets, limits, batching counters)

The code lives in pipelines/serving/: config.py (ServeConfig), loading.py and models.py (the
`Models` replica), validation.py and api.py (the `Api` ingress), app.py (bind / build_app / start).
This file is the entry point: the CLI, and the names `serve run` and other scripts import.
"""

import os
import sys
import threading
from typing import Any

from ray import serve

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.serving.app import bind, build_app, start  # noqa: E402
from pipelines.serving.config import ServeConfig  # noqa: E402

__all__ = ["ServeConfig", "bind", "build_app", "main", "start"]


def __getattr__(name: str) -> Any:
    # `serve run pipelines.serve:app` without building at import time (tests import this module).
    if name == "app":
        return build_app()
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> None:
    from pipelines import common

    cfg = common.parse_cli(ServeConfig, argv, __doc__)
    if not cfg.model.tokenizer:
        raise SystemExit(
            "error: model.tokenizer is required (an export folder or models:/name@alias)"
        )
    common.init_ray()
    url = start(cfg)
    print(f"[serve] {url}/info  ·  {url}/docs  ·  Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        serve.delete(cfg.http.app_name)


if __name__ == "__main__":
    main()
