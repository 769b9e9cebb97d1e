"""What every training entry point (stage 0, 1 and 2) does around its task, written once.

    cfg = stage.parse(MyStageConfig, argv, __doc__, data="an images Parquet prefix from prepare_data")
    with common.reading("data.train"):        # stage-specific: read the data, shape cfg.model
        ...
    run = stage.start(cfg, "tokenizer")       # Ray, GPU or not, the MLflow run, the run's folders
    return run.fit(make_task, export, eval_batch=..., dataset=...)

`fit` runs THE training loop (reptok_core/training/loop.py, with the Ray seams of
pipelines/ray_loop.py) on Ray Train workers, then registers the export and closes the MLflow run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipelines import common, ray_loop
from reptok_core.config import opt


@dataclass
class DataSettings:
    """The `data` section every stage has; stages extend it with their own fields."""

    train: str = opt("", "training data: the prefix the previous step wrote (see the stage's doc)")
    val: str = opt("", "held-out split for evaluation ('' = the first rows of data.train)")


def parse(cls: type, argv: list[str] | None, doc: str, data: str) -> Any:
    """The stage's config from the command line; `data` says what data.train must point at."""
    cfg = common.parse_cli(cls, argv, doc)
    if not cfg.data.train:
        raise SystemExit(f"error: data.train is required ({data})")
    return cfg


@dataclass
class StageRun:
    """A started stage: its config, MLflow run and folders. Pickled into every Ray worker."""

    cfg: Any
    stage: str
    run_id: str
    tracking_uri: str
    use_gpu: bool
    run_dir: str
    export_uri: str

    def fit(
        self,
        make_task: Callable[[torch.device], Any],
        export: Callable[[dict[str, torch.Tensor]], None],
        *,
        eval_batch: dict[str, Any] | None,
        dataset: Any = None,
    ) -> str:
        """Train on Ray Train (FSDP workers, FailureConfig, checkpoints in run.storage), then
        register the export. `dataset`: the Ray Dataset the workers stream (None = the task's
        own batches). Returns the MLflow run id.

        A stop requested with loop.stop_at_step leaves the MLflow run open for the re-run that
        resumes it; a failure marks it FAILED (a re-run flips it back to RUNNING).
        """
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        run, loop = self.cfg.run, self.cfg.loop
        from_dataset = dataset is not None

        def train_fn(_: dict) -> None:
            ray_loop.run_worker(
                make_task,
                self.cfg,
                run_id=self.run_id,
                tracking_uri=self.tracking_uri,
                run_dir=self.run_dir,
                eval_batch=eval_batch,
                export=export,
                from_dataset=from_dataset,
            )

        storage_path, storage_fs = common.ray_storage(run)
        trainer = TorchTrainer(
            train_fn,
            scaling_config=ray.train.ScalingConfig(
                num_workers=run.num_workers,
                use_gpu=self.use_gpu,
                resources_per_worker={"CPU": run.cpus_per_worker},
            ),
            torch_config=TorchConfig(backend="nccl" if self.use_gpu else "gloo"),
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
            datasets={"train": dataset} if from_dataset else None,
        )
        try:
            trainer.fit()
        except Exception:
            common.finish_mlflow_run(run, self.run_id, "FAILED")
            raise
        name = self.stage
        if loop.stop_at_step and loop.stop_at_step < loop.steps:
            print(
                f"[{name}] stopped at step {loop.stop_at_step}; run the same command again to continue"
            )
            return self.run_id
        version = common.register_export(run, self.run_id, self.export_uri, name)
        common.finish_mlflow_run(run, self.run_id)
        print(f"[{name}] export: {self.export_uri}")
        registered = f", registered {run.register_as} v{version}" if version else ""
        print(f"[{name}] MLflow run {self.run_id}{registered}")
        return self.run_id


def start(cfg: Any, stage: str, tags: dict[str, str] | None = None) -> StageRun:
    """Ray up (enough CPUs for the workers and the data tasks that feed them), GPU or not, the
    stage's MLflow run (created once per run.storage + run.name, found again on a re-run)."""
    run = cfg.run
    common.init_ray(min_cpus=run.num_workers * run.cpus_per_worker + 2)
    use_gpu = common.resolve_use_gpu(run.use_gpu)
    run_id = common.start_or_resume_mlflow_run(run, cfg, stage=stage, tags=tags)
    return StageRun(
        cfg=cfg,
        stage=stage,
        run_id=run_id,
        tracking_uri=common.mlflow_uri(run),
        use_gpu=use_gpu,
        run_dir=common.run_dir(run),
        export_uri=common.export_uri(run),
    )
