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

from pipelines import common, image_data, stage  # noqa: E402
from reptok_core.config import opt, section  # noqa: E402
from reptok_core.formats import images  # noqa: E402
from reptok_core.stages.dino import DinoConfig  # noqa: E402
from reptok_core.training.loop import LoopConfig  # noqa: E402
from reptok_core.training.optim import OptimConfig  # noqa: E402


@dataclass
class DataSettings(stage.DataSettings):
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
    data: DataSettings = section(
        DataSettings, "input data (images Parquet; labels are not used for training), k-NN probe"
    )
    loop: LoopConfig = section(LoopConfig, "training loop")
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
    cfg = stage.parse(
        PretrainEncoderConfig, args, __doc__, data="an images Parquet prefix from prepare_data"
    )
    cfg.model.total_steps = cfg.model.total_steps or cfg.loop.steps
    # The k-NN probe: a fixed labelled bank and fixed labelled queries, read once on the driver.
    with common.reading("data.val"):
        queries = _labelled(cfg.data.val, cfg.loop.eval_images) if cfg.data.val else None
    with common.reading("data.knn_bank" if cfg.data.knn_bank else "data.train"):
        bank = _labelled(cfg.data.knn_bank or cfg.data.train, cfg.data.knn_bank_size)
    if cfg.data.val and (queries is None or bank is None):
        print("[encoder] no labels in data.val / data.knn_bank: k-NN probe disabled", flush=True)
    probe_on = queries is not None and bank is not None
    run = stage.start(cfg, "encoder")
    out_uri = run.export_uri
    command = "python pipelines/pretrain_encoder.py " + " ".join(args)

    def probe_and_queries():
        import torch

        from reptok_core.stages.dino import ProbeSet

        if not probe_on:
            return None, None
        probe = ProbeSet(
            torch.from_numpy(bank["image"]), torch.from_numpy(bank["label"]), k=cfg.data.knn_k
        )
        return probe, (torch.from_numpy(queries["image"]), torch.from_numpy(queries["label"]))

    def make_task(device):
        from reptok_core.stages.dino import DinoTask

        return DinoTask(cfg.model, device, probe_and_queries()[0])

    def export(state: dict) -> None:
        from reptok_core.stages.dino import export_encoder

        probe, q = probe_and_queries()
        meta = export_encoder(
            state,
            cfg.model,
            out_uri,
            fp16=cfg.export.fp16,
            extra={"mlflow_run_id": run.run_id, "command": command},
            probe=probe,
            queries=q,
        )
        print(f"[encoder] exported; k-NN accuracy {meta.get('knn_accuracy', 'n/a')}", flush=True)

    return run.fit(
        make_task,
        export,
        eval_batch=queries if probe_on else None,
        dataset=image_data.train_dataset(cfg.data.train),
    )


if __name__ == "__main__":
    main()
