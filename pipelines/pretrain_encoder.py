"""Stage 0: pretrain the tokenizer's self-supervised ViT encoder (DINO self-distillation) on Ray Train.

    python pipelines/pretrain_encoder.py --config configs/pretrain/tiny.yaml data.train=... run.name=...
    ray job submit --working-dir . -- python pipelines/pretrain_encoder.py --config configs/pretrain/small.yaml ...

For domains without a downloadable SSL encoder. The export is `<run>/export/encoder.safetensors`
(the teacher backbone, timm layout) + `encoder.json` (the `model.encoder` settings that load it,
the k-NN accuracy of exactly those weights, the command); point a tokenizer at it with
`model.encoder.weights=<run>/export/encoder.safetensors` and the same arch. k-NN accuracy of the
teacher's token on a labelled held-out split is logged to MLflow as `eval/knn_acc`. Re-running
the same command (same run.name and run.storage) resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import common, image_data, ray_trainer, train_loop  # noqa: E402
from reptok_core.config import opt, section  # noqa: E402
from reptok_core.formats import images  # noqa: E402
from reptok_core.stages.dino import DinoConfig  # noqa: E402
from reptok_core.training.optim import OptimConfig  # noqa: E402


@dataclass
class DataSettings:
    train: str = opt("", "images Parquet prefix to pretrain on (labels are not used for training)")
    val: str = opt("", "labelled held-out images Parquet: the k-NN queries ('' = no k-NN probe)")
    knn_bank: str = opt(
        "", "labelled images Parquet the k-NN neighbours come from ('' = data.train)"
    )
    knn_bank_size: int = opt(2048, "rows of knn_bank used as neighbours (the first, by id)")
    knn_k: int = opt(20, "neighbours per k-NN vote")


@dataclass
class ExportSettings:
    fp16: bool = opt(True, "store the exported teacher backbone in fp16 (half the size)")


@dataclass
class PretrainEncoderConfig:
    model: DinoConfig = section(DinoConfig, "the ViT backbone and the DINO head / schedules")
    data: DataSettings = section(DataSettings, "input data and the k-NN probe")
    loop: train_loop.LoopConfig = section(train_loop.LoopConfig, "training loop")
    optim: OptimConfig = section(OptimConfig, "optimizer, schedule, clipping (student)")
    export: ExportSettings = section(ExportSettings, "the exported encoder")
    run: common.RunSettings = section(common.RunSettings, "run name, storage, workers, MLflow")


def _labelled(uri: str, n: int) -> dict | None:
    batch = images.heldout_batch(uri, n)
    if "label" not in batch or (batch["label"] < 0).any():
        return None
    return batch


def main(argv: list[str] | None = None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = common.parse_cli(PretrainEncoderConfig, args, __doc__)
    if not cfg.data.train:
        raise SystemExit(
            "error: data.train is required (an images Parquet prefix from prepare_data)"
        )
    cfg.model.total_steps = cfg.model.total_steps or cfg.loop.steps
    common.init_ray(min_cpus=cfg.run.num_workers * cfg.run.cpus_per_worker + 2)
    use_gpu = common.resolve_use_gpu(cfg.run.use_gpu)
    run_id = common.start_or_resume_mlflow_run(cfg.run, cfg, stage="encoder")
    tracking_uri = common.mlflow_uri(cfg.run)
    # The k-NN probe: a fixed labelled bank and fixed labelled queries, read once on the driver.
    queries = _labelled(cfg.data.val, cfg.loop.eval_images) if cfg.data.val else None
    bank = _labelled(cfg.data.knn_bank or cfg.data.train, cfg.data.knn_bank_size)
    if cfg.data.val and (queries is None or bank is None):
        print("[encoder] no labels in data.val / data.knn_bank: k-NN probe disabled", flush=True)
    probe_on = queries is not None and bank is not None
    train_ds = image_data.train_dataset(cfg.data.train)
    out_uri = common.export_uri(cfg.run)
    run_dir = common.run_dir(cfg.run)
    command = "python pipelines/pretrain_encoder.py " + " ".join(args)

    def make_probe():
        import torch

        from reptok_core.stages.dino import ProbeSet

        if not probe_on:
            return None
        return ProbeSet(
            torch.from_numpy(bank["image"]), torch.from_numpy(bank["label"]), k=cfg.data.knn_k
        )

    def train_fn(_: dict) -> None:
        import torch

        from reptok_core.stages.dino import DinoTask, export_encoder

        probe = make_probe()
        q = (
            (torch.from_numpy(queries["image"]), torch.from_numpy(queries["label"]))
            if probe
            else None
        )

        def export(state: dict) -> None:
            meta = export_encoder(
                state,
                cfg.model,
                out_uri,
                fp16=cfg.export.fp16,
                extra={"mlflow_run_id": run_id, "command": command},
                probe=probe,
                queries=q,
            )
            print(
                f"[encoder] exported; k-NN accuracy {meta.get('knn_accuracy', 'n/a')}", flush=True
            )

        train_loop.run(
            lambda device: DinoTask(cfg.model, device, probe),
            cfg.loop,
            cfg.optim,
            eval_batch=queries if probe_on else None,
            run_id=run_id,
            tracking_uri=tracking_uri,
            export_fn=export,
            run_dir=run_dir,
        )

    return ray_trainer.fit(
        train_fn,
        cfg,
        run_id=run_id,
        use_gpu=use_gpu,
        export_uri=out_uri,
        artifact="encoder",
        datasets={"train": train_ds},
    )


if __name__ == "__main__":
    main()
