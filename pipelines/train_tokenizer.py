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

from pipelines import common, image_data, model_uri, stage  # noqa: E402
from reptok_core.config import from_dict, opt, section  # noqa: E402
from reptok_core.formats import images  # noqa: E402
from reptok_core.models.tokenizer import TokenizerConfig  # noqa: E402
from reptok_core.training.loop import LoopConfig  # noqa: E402
from reptok_core.training.optim import OptimConfig  # noqa: E402


@dataclass
class TrainTokenizerConfig:
    model: TokenizerConfig = section(
        TokenizerConfig, "the tokenizer (encoder, decoder, latent space, flow)"
    )
    data: stage.DataSettings = section(
        stage.DataSettings, "input data: images Parquet prefixes from prepare_data"
    )
    loop: LoopConfig = section(LoopConfig, "training loop")
    optim: OptimConfig = section(OptimConfig, "optimizer, schedule, clipping, EMA")
    run: common.RunSettings = section(common.RunSettings, "run name, storage, workers, MLflow")
    init_from: str = opt(
        "",
        "fine-tune an exported tokenizer (folder, s3://, models:/NAME@ALIAS, builtin:NAME, or "
        "an imported official checkpoint): its architecture and weights, with this config's "
        "model.encoder.finetune / cos_weight and model.flow; '' trains from model.* as given",
    )


def main(argv: list[str] | None = None) -> str:
    cfg = stage.parse(
        TrainTokenizerConfig, argv, __doc__, data="an images Parquet prefix from prepare_data"
    )
    tracking_uri = common.mlflow_uri(cfg.run)
    vae_config = None
    if cfg.init_from:
        from reptok_core.exports.tokenizer import read_tokenizer_meta
        from reptok_core.stages.tokenizer import finetune_config

        meta = read_tokenizer_meta(model_uri.resolve(cfg.init_from, tracking_uri).folder)
        cfg.model = finetune_config(cfg.model, from_dict(TokenizerConfig, meta["config"]))
        vae_config = meta.get("vae_config")
    with common.reading("data.val" if cfg.data.val else "data.train"):
        eval_batch = images.heldout_batch(cfg.data.val or cfg.data.train, cfg.loop.eval_images)
    run = stage.start(cfg, "tokenizer")
    out_uri = run.export_uri

    built = []  # the worker's task: the export records the sizes its parts gave the decoder

    def make_task(device):
        from reptok_core.stages.tokenizer import TokenizerTask

        # Resolved again here: a registry download on the driver is not on the worker's node.
        init = model_uri.resolve(cfg.init_from, tracking_uri).folder if cfg.init_from else ""
        built.append(TokenizerTask(cfg.model, device, init_from=init))
        return built[-1]

    def export(state: dict) -> None:
        from reptok_core.exports.tokenizer import export_tokenizer

        export_tokenizer(
            state,
            cfg.model,
            built[-1].model.decoder.sizes,
            out_uri,
            {"mlflow_run_id": run.run_id},
            vae_config,
        )

    return run.fit(
        make_task, export, eval_batch=eval_batch, dataset=image_data.train_dataset(cfg.data.train)
    )


if __name__ == "__main__":
    main()
