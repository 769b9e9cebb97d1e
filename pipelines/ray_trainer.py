"""Running a stage's worker loop on Ray Train V2 and closing its MLflow run: the part of every
training entry point after the task is defined (shared by stage 0, 1 and 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines import common


def fit(
    train_fn: Callable[[dict], None],
    cfg: Any,
    *,
    run_id: str,
    use_gpu: bool,
    export_uri: str,
    artifact: str,
    datasets: dict[str, Any] | None = None,
) -> str:
    """TorchTrainer(FSDP workers, FailureConfig, checkpoints in run.storage) -> fit -> register.

    `cfg` is the stage's config: its `run` (RunSettings) and `loop` (LoopConfig) sections are used.

    A stop requested with loop.stop_at_step leaves the MLflow run open for the re-run that
    resumes it; a failure marks it FAILED (a re-run flips it back to RUNNING).
    """
    import ray.train

    run, loop = cfg.run, cfg.loop
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, storage_fs = common.ray_storage(run)
    trainer = TorchTrainer(
        train_fn,
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": run.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train V2 re-routes `print` in workers through its logger and, since a Ray
            # worker's sys.stdout is always a replaced stream, also prints it: every progress
            # line reached the driver twice. Plain print writes it once.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        datasets=datasets,
    )
    try:
        trainer.fit()
    except Exception:
        common.finish_mlflow_run(run, run_id, "FAILED")
        raise
    if loop.stop_at_step and loop.stop_at_step < loop.steps:
        print(
            f"[{artifact}] stopped at step {loop.stop_at_step}; run the same command again to continue"
        )
        return run_id
    version = common.register_export(run, run_id, export_uri, artifact)
    common.finish_mlflow_run(run, run_id)
    print(f"[{artifact}] export: {export_uri}")
    registered = f", registered {run.register_as} v{version}" if version else ""
    print(f"[{artifact}] MLflow run {run_id}{registered}")
    return run_id
