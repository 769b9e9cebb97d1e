"""Data preparation: turn raw images into the images Parquet of DESIGN.md §3.1 with Ray Data.

    python pipelines/prepare_data.py --config configs/prepare/fashion-mnist.yaml output.uri=out/fm
    python pipelines/prepare_data.py source.kind=folder source.uri=s3://raw/imagenet/train \\
        output.uri=s3://prepared/imagenet-256 image.resolution=256 output.val_fraction=0.01
    ray job submit --working-dir . -- python pipelines/prepare_data.py --config ...

The work itself (sources, shards, the shard writer, the manifest; output layout and idempotence)
is in reptok_core/prepare/. Here Ray Data runs one task per shard (`map_batches` over the shard
list): the task reads, decodes into numpy uint8, crops, encodes and writes its rows itself, so
pixels never cross the object store and memory stays at about one shard per CPU. Only small
per-shard summaries flow back to the driver, which prints progress from them. executor=inline
runs the same shard code in this process instead. Exit codes: 0 done, 1 nothing usable,
2 bad configuration or an output that cannot be written.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from pipelines.common import init_ray, parse_cli  # noqa: E402
from reptok_core import prepare  # noqa: E402
from reptok_core.config import ConfigError  # noqa: E402
from reptok_core.prepare import PrepareConfig, PrepareError  # noqa: E402

# Workers of an already-running cluster do not see this process's environment: these are passed
# on to the shard tasks explicitly.
_S3_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "REPTOK_S3_ENDPOINT",
)


def _summaries(shards: np.ndarray, ctx: dict, space: Any = None) -> dict[str, np.ndarray]:
    out = [json.dumps(prepare.process_shard(json.loads(s), ctx, space)) for s in shards]
    return {"summary": np.array(out, dtype=object)}


def _shard_task(batch: dict[str, np.ndarray], ctx: dict) -> dict[str, np.ndarray]:
    return _summaries(batch["shard"], ctx)


class _VAEShardActor:
    """Same as _shard_task, in an actor that loads the SD-VAE once."""

    def __init__(self, ctx: dict) -> None:
        self.ctx = ctx
        self.space = prepare.load_vae(ctx["vae_model"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _summaries(batch["shard"], self.ctx, self.space)


def run_ray(todo: list[dict], ctx: dict, cfg: PrepareConfig) -> Iterator[dict]:
    """Process the shards as Ray Data tasks (one per shard); yield their summaries."""
    import ray

    init_ray()  # RAY_ADDRESS -> join that cluster; otherwise start a local one
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False  # ours print rows/s and ETA
    # A shard rewrites the same files under the same names, so retrying any failure (a flaky
    # S3 PUT, say) is safe; lost workers are retried by Ray itself.
    data_ctx.retried_map_errors = True
    data_ctx.max_map_retries = cfg.task_retries
    env = {k: os.environ[k] for k in _S3_ENV if os.environ.get(k)}
    ds = ray.data.from_items(
        [{"shard": json.dumps(s)} for s in todo], override_num_blocks=len(todo)
    )
    common: dict[str, Any] = {"batch_size": 1, "batch_format": "numpy"}
    if env:
        common["runtime_env"] = {"env_vars": env}
    if ctx["vae_model"]:
        ds = ds.map_batches(
            _VAEShardActor,
            fn_constructor_kwargs={"ctx": ctx},
            num_cpus=1,
            num_gpus=cfg.vae.num_gpus or None,
            compute=ray.data.ActorPoolStrategy(size=cfg.vae.actors),
            **common,
        )
    else:
        ds = ds.map_batches(_shard_task, fn_kwargs={"ctx": ctx}, num_cpus=1, **common)
    for row in ds.iter_rows():
        yield json.loads(row["summary"])


def run(cfg: PrepareConfig) -> dict:
    """Prepare the dataset with the configured executor; return the manifest.

    Raises PrepareError (with an exit code) or ConfigError."""
    return prepare.run(cfg, run_ray if cfg.executor == "ray" else prepare.run_inline)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_cli(PrepareConfig, argv, __doc__ or "")  # --help prints and exits 0
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(f"prepare_data: bad configuration: {e.code.removeprefix('error: ')}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s prepare_data %(message)s")
    try:
        run(cfg)
    except ConfigError as e:
        print(f"prepare_data: bad configuration: {e}", file=sys.stderr)
        return 2
    except PrepareError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    # Run the copy imported as `pipelines.prepare_data`, not this `__main__` one: Ray workers
    # unpickle task functions by module name, and `__main__` is not importable there.
    from pipelines.prepare_data import main as _main

    sys.exit(_main())
