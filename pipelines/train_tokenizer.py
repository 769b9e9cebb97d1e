"""Stage 1: train the RepTok tokenizer ([cls] embedding + projection + decoder) on Ray Train.

    python pipelines/train_tokenizer.py --config configs/tokenizer/tiny.yaml data.train=... run.name=...
    ray job submit --working-dir . -- python pipelines/train_tokenizer.py --config configs/tokenizer/paper.yaml ...

Re-running the same command (same run.name and run.storage) resumes from the last checkpoint
and continues the same MLflow run.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import common, image_data, model_uri, ray_trainer, train_loop  # noqa: E402
from reptok_core.config import from_dict, opt, section  # noqa: E402
from reptok_core.models.tokenizer import TokenizerConfig  # noqa: E402
from reptok_core.training.optim import OptimConfig  # noqa: E402


@dataclass
class DataSettings:
    train: str = opt("", "images Parquet prefix to train on (output of prepare_data)")
    val: str = opt("", "held-out images Parquet for evaluation ('' = the first rows of data.train)")


@dataclass
class TrainTokenizerConfig:
    model: TokenizerConfig = section(
        TokenizerConfig, "the tokenizer (encoder, decoder, latent space, flow)"
    )
    data: DataSettings = section(DataSettings, "input data")
    loop: train_loop.LoopConfig = section(train_loop.LoopConfig, "training loop")
    optim: OptimConfig = section(OptimConfig, "optimizer, schedule, clipping, EMA")
    run: common.RunSettings = section(common.RunSettings, "run name, storage, workers, MLflow")
    init_from: str = opt(
        "",
        "fine-tune an exported tokenizer (folder, s3://, models:/NAME@ALIAS, builtin:NAME, or "
        "an imported official checkpoint): its architecture and weights, with this config's "
        "model.encoder.finetune / cos_weight and model.flow; '' trains from model.* as given",
    )


def main(argv: list[str] | None = None) -> str:
    cfg = common.parse_cli(TrainTokenizerConfig, argv, __doc__)
    if not cfg.data.train:
        raise SystemExit(
            "error: data.train is required (an images Parquet prefix from prepare_data)"
        )
    common.init_ray(min_cpus=cfg.run.num_workers * cfg.run.cpus_per_worker + 2)
    use_gpu = common.resolve_use_gpu(cfg.run.use_gpu)
    tracking_uri = common.mlflow_uri(cfg.run)
    vae_config = None
    if cfg.init_from:
        from reptok_core.exports.tokenizer import read_tokenizer_meta
        from reptok_core.stages.tokenizer import finetune_config

        meta = read_tokenizer_meta(model_uri.resolve(cfg.init_from, tracking_uri).folder)
        cfg.model = finetune_config(cfg.model, from_dict(TokenizerConfig, meta["config"]))
        vae_config = meta.get("vae_config")
    run_id = common.start_or_resume_mlflow_run(cfg.run, cfg, stage="tokenizer")
    eval_batch = image_data.heldout_batch(cfg.data.val or cfg.data.train, cfg.loop.eval_images)
    train_ds = image_data.train_dataset(cfg.data.train)
    out_uri = common.export_uri(cfg.run)
    run_dir = common.run_dir(cfg.run)

    def train_fn(_: dict) -> None:
        from reptok_core.exports.tokenizer import export_tokenizer
        from reptok_core.stages.tokenizer import TokenizerTask

        # Resolved again here: a registry download on the driver is not on the worker's node.
        init = model_uri.resolve(cfg.init_from, tracking_uri).folder if cfg.init_from else ""
        built = []  # the task, for the decoder sizes its encoder and latent space gave

        def make_task(device):
            built.append(TokenizerTask(cfg.model, device, init_from=init))
            return built[-1]

        train_loop.run(
            make_task,
            cfg.loop,
            cfg.optim,
            eval_batch=eval_batch,
            run_id=run_id,
            tracking_uri=tracking_uri,
            export_fn=lambda state: export_tokenizer(
                state,
                cfg.model,
                built[-1].model.decoder.sizes,
                out_uri,
                {"mlflow_run_id": run_id},
                vae_config,
            ),
            run_dir=run_dir,
        )

    return ray_trainer.fit(
        train_fn,
        cfg,
        run_id=run_id,
        use_gpu=use_gpu,
        export_uri=out_uri,
        artifact="tokenizer",
        datasets={"train": train_ds},
    )


if __name__ == "__main__":
    main()
