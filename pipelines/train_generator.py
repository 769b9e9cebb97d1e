"""Stage 2: train the token generator (class-conditional MLP-Mixer or text-conditioned) on Ray Train.

    python pipelines/train_generator.py --config configs/generator/tiny.yaml data.train=<token Parquet>
    python pipelines/train_generator.py --config configs/generator/tiny.yaml model.kind=text data.train=...
    ray job submit --working-dir . -- python pipelines/train_generator.py --config configs/generator/paper.yaml ...

Same loop, checkpoints, resume, fault drill, MLflow and export as stage 1 (pipelines/train_loop.py).
Each worker holds the whole token set in memory when it fits `data.memory_budget_gb` and streams
its share from storage otherwise (reptok_core/formats/token_stream.py; `data.in_memory` forces either);
tokens are normalised by the manifest's statistics either way, and text generators read the
cached caption states, so no encoder runs per step. With `eval.fid_samples` set, every
evaluation also measures gFID against a held-out images Parquet (the protocol of
pipelines/evaluate.py). Re-running the same command (same run.name and run.storage) resumes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from pipelines import common, model_uri, ray_trainer, train_loop  # noqa: E402
from reptok_core.config import opt, section  # noqa: E402
from reptok_core.formats import tokens as token_data  # noqa: E402
from reptok_core.models.generator import GeneratorConfig  # noqa: E402
from reptok_core.training.optim import OptimConfig  # noqa: E402


@dataclass
class DataSettings:
    train: str = opt("", "token Parquet prefix to train on (output of encode_tokens)")
    val: str = opt("", "held-out token Parquet for evaluation ('' = the first rows of data.train)")
    tokenizer: str = opt(
        "",
        "tokenizer whose decoder draws the sample grids: export folder or models:/NAME@ALIAS "
        "('' = the one recorded in the token manifest, 'none' = no grids)",
    )
    in_memory: str = opt(
        "auto",
        "'true': each worker holds the whole token set; 'false': it streams its share from "
        "storage through a loop.shuffle_buffer-row shuffle; 'auto': holds it when it fits "
        "data.memory_budget_gb",
    )
    memory_budget_gb: float = opt(
        16.0,
        "largest token set a worker holds in memory under data.in_memory=auto, in GB of float32 "
        "tokens (token_flip included); loading briefly needs about twice that",
    )


@dataclass
class EvalSettings:
    fid_samples: int = opt(
        0,
        "generated images for a gFID at every evaluation, split over the workers (0 = off; "
        "needs model.kind=class and a tokenizer)",
    )
    fid_reference: str = opt(
        "", "held-out images Parquet (output of prepare_data) that gFID is measured against"
    )
    fid_reference_images: int = opt(
        10_000, "reference images (the first by id) for the gFID statistics, at most"
    )


@dataclass
class TrainGeneratorConfig:
    model: GeneratorConfig = section(GeneratorConfig, "the generator and its sampling defaults")
    data: DataSettings = section(DataSettings, "input tokens")
    eval: EvalSettings = section(EvalSettings, "gFID during training (loop.eval_every)")
    loop: train_loop.LoopConfig = section(train_loop.LoopConfig, "training loop")
    optim: OptimConfig = section(OptimConfig, "optimizer, schedule, clipping, EMA")
    run: common.RunSettings = section(common.RunSettings, "run name, storage, workers, MLflow")
    init_from: str = opt(
        "",
        "fine-tune an exported generator (folder, s3://, models:/NAME@ALIAS, builtin:NAME, or an "
        "imported official checkpoint): its model and token normalisation, with this config's "
        "model.flow / cfg_scale / cfg_interval; '' trains model.* from scratch",
    )


def fit_to_tokens(
    cfg: TrainGeneratorConfig, manifest: dict[str, Any], captions: dict[str, Any] | None
) -> dict[str, int]:
    """The model's data-given sizes (`build_model`'s token_dim, text_dim) from the manifest and
    caption cache; the class count checked."""
    m = cfg.model
    if m.kind == "class":
        if manifest["num_classes"] < 1:
            raise SystemExit(f"error: {cfg.data.train!r} has no labels; use model.kind=text")
        if manifest["num_classes"] > m.mixer.num_classes:
            raise SystemExit(
                f"error: the tokens have labels up to {manifest['num_classes'] - 1} but "
                f"model.mixer.num_classes={m.mixer.num_classes}"
            )
        return {"token_dim": manifest["dim"]}
    if m.kind == "text":
        if captions is None:
            raise SystemExit(
                f"error: {cfg.data.train!r} has no caption cache; run encode_tokens with "
                "encode.text_encoder set"
            )
        return {"token_dim": manifest["dim"], "text_dim": captions["dim"]}
    raise SystemExit(f"error: model.kind={m.kind!r}; expected 'class' or 'text'")


def check_fits_tokens(cfg: TrainGeneratorConfig, manifest: dict[str, Any], init: Any) -> None:
    """A generator to fine-tune must already fit the tokens: same width, enough classes."""
    if init.model.token_dim != manifest["dim"]:
        raise SystemExit(
            f"error: init_from={cfg.init_from!r} generates {init.model.token_dim}-dim tokens but "
            f"{cfg.data.train!r} holds {manifest['dim']}-dim tokens"
        )
    if cfg.model.kind == "class" and manifest["num_classes"] > cfg.model.mixer.num_classes:
        raise SystemExit(
            f"error: the tokens have labels up to {manifest['num_classes'] - 1} but "
            f"init_from={cfg.init_from!r} knows {cfg.model.mixer.num_classes} classes"
        )


def batch_arrays(
    data: dict[str, Any], kind: str, captions: list[str] | None
) -> dict[str, np.ndarray]:
    """Loaded token rows -> the numeric batch a GeneratorTask reads."""
    out = {"token": data["token"]}
    if "token_flip" in data:
        out["token_flip"] = data["token_flip"]
    if kind == "class":
        if (data["label"] < 0).any():
            raise ValueError("some token rows have no label; a class-conditional model needs all")
        out["label"] = data["label"]
    else:
        out["caption_idx"] = token_data.caption_index(data["caption"], captions or [])
    return out


def streams_tokens(data: DataSettings, manifest: dict[str, Any]) -> bool:
    """`data.in_memory` resolved: whether the workers stream the token set instead of holding it."""
    if data.in_memory not in ("auto", "true", "false"):
        raise SystemExit(f"error: data.in_memory={data.in_memory!r}; expected auto, true or false")
    if data.in_memory != "auto":
        return data.in_memory == "false"
    copies = 2 if manifest.get("flip") else 1
    return manifest["rows"] * manifest["dim"] * 4 * copies > data.memory_budget_gb * 2**30


def check_fid(cfg: TrainGeneratorConfig, tokenizer: str) -> None:
    e = cfg.eval
    if not e.fid_samples:
        return
    if e.fid_samples < 2:
        raise SystemExit(f"error: eval.fid_samples={e.fid_samples}: FID needs at least 2 images")
    if cfg.model.kind != "class" or tokenizer == "none":
        raise SystemExit("error: eval.fid_samples needs model.kind=class and a tokenizer")
    if not e.fid_reference:
        raise SystemExit("error: eval.fid_samples needs eval.fid_reference (held-out images)")


def training_fid(cfg: TrainGeneratorConfig, num_classes: int, decoder: Any, device: Any) -> Any:
    """A worker's gFID probe: Inception on every rank; the reference statistics on rank 0 only,
    computed once and cached where pipelines/evaluate.py caches them (under run.storage)."""
    from pipelines import evaluate
    from reptok_core.evaluation.fid import InceptionFeatures
    from reptok_core.evaluation.gfid import TrainingFid
    from reptok_core.training.distributed import world

    e = cfg.eval
    net = InceptionFeatures().to(device)
    reference = None
    if world()[0] == 0:
        real = evaluate.heldout_images(
            e.fid_reference, e.fid_reference_images, decoder.cfg.image_size
        )
        reference = evaluate.reference_stats(
            e.fid_reference,
            real["image"],
            net,
            evaluate.fid_cache_dir(cfg.run),
            "gen",
            cfg.loop.batch_size,
        )
    return TrainingFid(net, reference, e.fid_samples, num_classes, cfg.loop.batch_size)


def main(argv: list[str] | None = None) -> str:
    cfg = common.parse_cli(TrainGeneratorConfig, argv, __doc__)
    if not cfg.data.train:
        raise SystemExit("error: data.train is required (a token Parquet from encode_tokens)")
    manifest = token_data.read_manifest(cfg.data.train)
    cache = token_data.read_caption_cache(cfg.data.train) if cfg.model.kind == "text" else None
    captions = cache[0] if cache else None  # the driver keeps the names, workers the states
    del cache
    init = None
    if cfg.init_from:
        from reptok_core.exports.generator import load_generator
        from reptok_core.stages.generator import finetune_generator_config

        init = load_generator(model_uri.resolve(cfg.init_from, common.mlflow_uri(cfg.run)).folder)
        cfg.model = finetune_generator_config(cfg.model, init.cfg)
        check_fits_tokens(cfg, manifest, init)
        sizes = init.model.sizes
    else:
        sizes = fit_to_tokens(cfg, manifest, captions)
    caption_list = captions["captions"] if captions else None
    tokenizer = cfg.data.tokenizer or manifest["tokenizer"]
    check_fid(cfg, tokenizer)
    streamed = streams_tokens(cfg.data, manifest)
    where = "streamed from storage" if streamed else "held in memory"
    print(f"[data] {manifest['rows']} tokens, {where} by each worker", flush=True)
    common.init_ray(min_cpus=cfg.run.num_workers * cfg.run.cpus_per_worker + 2)
    use_gpu = common.resolve_use_gpu(cfg.run.use_gpu)
    tags = {
        "reptok.tokens": cfg.data.train,
        "reptok.encode_run_id": manifest.get("mlflow_run_id") or "",
        "reptok.tokenizer_run_id": manifest.get("tokenizer_run_id") or "",
    }
    run_id = common.start_or_resume_mlflow_run(cfg.run, cfg, stage="generator", tags=tags)
    tracking_uri = common.mlflow_uri(cfg.run)
    held_out = token_data.load_tokens(cfg.data.val or cfg.data.train, limit=cfg.loop.eval_images)
    eval_batch = batch_arrays(held_out, cfg.model.kind, caption_list)
    eval_batch.pop("token_flip", None)
    out_uri = common.export_uri(cfg.run)
    run_dir = common.run_dir(cfg.run)
    # A fine-tuned generator keeps the normalisation its weights were trained with.
    normalizer = (
        init.normalizer
        if init is not None
        else token_data.normalizer_from_manifest(manifest, cfg.model.token_scale)
    )
    init_folder = cfg.init_from
    del init
    encode_cfg = manifest.get("config", {}).get("encode", {})
    lineage = {
        "mlflow_run_id": run_id,
        "tokens": cfg.data.train,
        "tokenizer": manifest["tokenizer"],
        "tokenizer_run_id": manifest.get("tokenizer_run_id"),
        "text_encoder": captions["encoder"] if captions else None,
        "text_max_length": encode_cfg.get("text_max_length"),
    }

    def task_factory(device):
        import torch

        from pipelines.encode_tokens import resolve_export
        from reptok_core.exports.generator import load_generator
        from reptok_core.exports.tokenizer import EXPORT_CONFIG, load_tokenizer
        from reptok_core.formats.token_stream import TokenStream
        from reptok_core.stages.generator import GeneratorTask
        from reptok_core.training.distributed import world

        # Every worker reads the tokens and caption states itself: no copy rides in the closure.
        cache = token_data.read_caption_cache(cfg.data.train) if captions else None

        def convert(rows: dict[str, Any]) -> dict[str, np.ndarray]:
            return batch_arrays(rows, cfg.model.kind, caption_list)

        data = stream = None
        if streamed:
            stream = TokenStream(cfg.data.train, convert, cfg.loop.shuffle_buffer, *world())
        else:
            train = convert(token_data.load_tokens(cfg.data.train))
            data = {k: torch.from_numpy(v) for k, v in train.items()}
        decoder = None
        if tokenizer != "none":
            decoder = load_tokenizer(
                resolve_export(tokenizer, tracking_uri, EXPORT_CONFIG)[0], device
            )
        fid = None
        if cfg.eval.fid_samples:
            fid = training_fid(cfg, manifest["num_classes"], decoder, device)
        init_state = None
        if init_folder:  # resolved here: a registry download on the driver is not on this node
            folder = model_uri.resolve(init_folder, tracking_uri).folder
            init_state = load_generator(folder).model.state_dict()
        return GeneratorTask(
            cfg.model,
            normalizer,
            device,
            data=data,
            stream=stream,
            captions=(cache[1].float(), cache[2]) if cache else None,
            decoder=decoder,
            fid=fid,
            init_state=init_state,
        )

    def train_fn(_: dict) -> None:
        from reptok_core.exports.generator import export_generator

        train_loop.run(
            task_factory,
            cfg.loop,
            cfg.optim,
            eval_batch=eval_batch,
            run_id=run_id,
            tracking_uri=tracking_uri,
            export_fn=lambda state: export_generator(
                state, cfg.model, sizes, normalizer, out_uri, lineage
            ),
            run_dir=run_dir,
            local_batches=True,
        )

    return ray_trainer.fit(
        train_fn,
        cfg,
        run_id=run_id,
        use_gpu=use_gpu,
        export_uri=out_uri,
        artifact="generator",
    )


if __name__ == "__main__":
    main()
