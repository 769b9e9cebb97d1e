"""Evaluate a tokenizer (reconstruction) and a generator (generation) on a held-out split.

    python pipelines/evaluate.py tokenizer=models:/reptok-tokenizer-tiny@current val=data/fm/val
    python pipelines/evaluate.py tokenizer=runs/t1/export generator=runs/g1/export val=... gen.num_samples=50000
    ray job submit --working-dir . -- python pipelines/evaluate.py --config ...   (runs as one GPU task)

The protocol (reptok_core/evaluation/protocol.py) runs here, or as one GPU task when a Ray
cluster is given; its metrics go into the MLflow run and into <storage>/<name>/metrics.json, with
the protocol version as a tag.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import common, model_uri  # noqa: E402
from reptok_core import storage  # noqa: E402
from reptok_core.config import opt, section  # noqa: E402
from reptok_core.evaluation import protocol  # noqa: E402
from reptok_core.evaluation.protocol import GenSettings, ReconSettings  # noqa: E402


@dataclass
class EvaluateConfig:
    tokenizer: str = opt("", "tokenizer export folder or models:/<name>@<alias>")
    generator: str = opt("", "class-conditional generator ('' = reconstruction only)")
    val: str = opt("", "held-out images Parquet prefix (output of prepare_data)")
    batch_size: int = opt(32, "images per forward pass")
    device: str = opt("auto", "'auto' (cuda when present), 'cuda' or 'cpu'")
    cache_dir: str = opt("", "reference-statistics cache ('' = <run.storage>/fid-cache)")
    recon: ReconSettings = section(ReconSettings, "reconstruction metrics")
    gen: GenSettings = section(GenSettings, "generation metrics (needs generator)")
    run: common.RunSettings = section(common.RunSettings, "run name, storage, MLflow")


def run_protocol(cfg: EvaluateConfig) -> dict[str, float]:
    """The protocol on the models `cfg` names, resolved here: a registry download lands on the
    node that evaluates."""
    tokenizer = model_uri.resolve(cfg.tokenizer, cfg.run.mlflow_uri).folder
    generator = model_uri.resolve(cfg.generator, cfg.run.mlflow_uri).folder if cfg.generator else ""
    return protocol.evaluate(
        tokenizer,
        cfg.val,
        cfg.cache_dir or common.fid_cache_dir(cfg.run),
        cfg.recon,
        cfg.gen,
        generator=generator,
        batch_size=cfg.batch_size,
        device=cfg.device,
    )


def _run_on_cluster(cfg: EvaluateConfig) -> dict[str, float]:
    """Under `ray job submit` the driver sits on the head node: run as one task on a GPU."""
    import ray

    common.init_ray()
    gpu = common.resolve_use_gpu(cfg.run.use_gpu)
    task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=cfg.run.cpus_per_worker)(run_protocol)
    return ray.get(task.remote(cfg))


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = common.parse_cli(EvaluateConfig, argv, __doc__)
    if not cfg.tokenizer or not cfg.val:
        raise SystemExit("error: tokenizer= and val= are required (see --help)")
    if not (cfg.recon.enabled or cfg.generator):
        raise SystemExit("error: nothing to do: recon.enabled=false and no generator=")
    for name, value in (
        ("recon.num_images", cfg.recon.num_images),
        ("gen.num_samples", cfg.gen.num_samples),
    ):
        if value < 2:
            raise SystemExit(f"error: {name}={value}: FID needs at least 2 images")
    metrics = _run_on_cluster(cfg) if os.environ.get("RAY_ADDRESS") else run_protocol(cfg)

    import mlflow

    run_id = common.start_or_resume_mlflow_run(cfg.run, cfg, stage="evaluate")
    client = mlflow.MlflowClient(common.mlflow_uri(cfg.run))
    client.set_tag(run_id, "reptok.eval_protocol", protocol.PROTOCOL_VERSION)
    now = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[mlflow.entities.Metric(k, v, now, 0) for k, v in metrics.items()]
    )
    report = {"metrics": metrics, "protocol": protocol.PROTOCOL_VERSION, "mlflow_run_id": run_id}
    path = storage.join(common.run_dir(cfg.run), "metrics.json")
    storage.write_bytes_atomic(path, json.dumps(report, indent=2).encode())
    common.finish_mlflow_run(cfg.run, run_id)
    for k, v in metrics.items():
        print(f"[evaluate] {k} = {v:.4f}")
    print(f"[evaluate] metrics: {path}  ·  MLflow run {run_id}")
    return metrics


if __name__ == "__main__":
    main()
