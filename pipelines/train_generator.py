"""Stage 2: train the token generator (class-conditional MLP-Mixer or text-conditioned) on Ray Train.

    python pipelines/train_generator.py --config configs/generator/tiny.yaml data.train=<token Parquet>
    python pipelines/train_generator.py --config configs/generator/tiny.yaml model.kind=text data.train=...
    ray job submit --working-dir . -- python pipelines/train_generator.py --config configs/generator/paper.yaml ...

Same loop, checkpoints, resume, fault drill, MLflow and export as stage 1 (reptok_core/training/loop.py).
Each worker holds the whole token set in memory when it fits `data.memory_budget_gb` and streams
its share from storage otherwise (reptok_core/formats/token_stream.py; `data.in_memory` forces either);
tokens are normalised by the manifest's statistics either way, and text generators read the
cached caption states, so no encoder runs per step. With `eval.fid_samples` set, every
evaluation also measures gFID against a held-out images Parquet (the protocol of
reptok_core/evaluation/protocol.py). Re-running the same command (same run.name and run.storage)
resumes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from pipelines import common, model_uri, stage  # noqa: E402
from reptok_core.config import ConfigError, Switch, choice, opt, section  # noqa: E402
from reptok_core.formats import tokens  # noqa: E402
from reptok_core.models.generator import Conditioning, GeneratorConfig, conditioning  # noqa: E402
from reptok_core.training.loop import LoopConfig  # noqa: E402
from reptok_core.training.optim import OptimConfig  # noqa: E402


@dataclass
class DataSettings(stage.DataSettings):
    tokenizer: str = opt(
        "",
        "tokenizer whose decoder draws the sample grids: export folder or models:/NAME@ALIAS "
        "('' = the one recorded in the token manifest, 'none' = no grids)",
    )
    in_memory: Switch = opt(
        Switch.AUTO,
        "on: each worker holds the whole token set; off: it streams its share from storage "
        "through a loop.shuffle_buffer-row shuffle; auto: holds it when it fits "
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
    data: DataSettings = section(
        DataSettings, "input tokens: token Parquet prefixes from encode_tokens"
    )
    eval: EvalSettings = section(EvalSettings, "gFID during training (loop.eval_every)")
    loop: LoopConfig = section(LoopConfig, "training loop")
    optim: OptimConfig = section(OptimConfig, "optimizer, schedule, clipping, EMA")
    run: common.RunSettings = section(common.RunSettings, "run name, storage, workers, MLflow")
    init_from: str = opt(
        "",
        "fine-tune an exported generator (folder, s3://, models:/NAME@ALIAS, builtin:NAME, or an "
        "imported official checkpoint): its model and token normalisation, with this config's "
        "model.flow / guidance_scale / guidance_interval; '' trains model.* from scratch",
    )


def generator_conditioning(cfg: TrainGeneratorConfig) -> Conditioning:
    try:
        return conditioning(cfg.model)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def check_tokens(cfg: TrainGeneratorConfig, manifest: dict[str, Any]) -> None:
    try:
        generator_conditioning(cfg).check_tokens(cfg.model, manifest, cfg.data.train)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def fit_to_tokens(
    cfg: TrainGeneratorConfig, manifest: dict[str, Any], captions: dict[str, Any] | None
) -> dict[str, int]:
    """The model's data-given sizes (`build_model`'s token_dim, text_dim) from the manifest and
    caption cache, once the tokens are checked to train it."""
    kind = generator_conditioning(cfg)
    if kind.uses_captions and captions is None:
        raise SystemExit(
            f"error: {cfg.data.train!r} has no caption cache; run encode_tokens with "
            "encode.text_encoder set"
        )
    check_tokens(cfg, manifest)
    return kind.sizes(manifest, captions)


def check_fits_tokens(cfg: TrainGeneratorConfig, manifest: dict[str, Any], init: Any) -> None:
    """A generator to fine-tune must already fit the tokens: same width, enough classes."""
    if init.model.token_dim != manifest["dim"]:
        raise SystemExit(
            f"error: init_from={cfg.init_from!r} generates {init.model.token_dim}-dim tokens but "
            f"{cfg.data.train!r} holds {manifest['dim']}-dim tokens"
        )
    check_tokens(cfg, manifest)


def streams_tokens(data: DataSettings, manifest: dict[str, Any]) -> bool:
    """`data.in_memory` resolved: whether the workers stream the token set instead of holding it."""
    try:
        in_memory = choice(Switch, data.in_memory, "data.in_memory")
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    copies = 2 if manifest.get("flip") else 1
    fits = manifest["rows"] * manifest["dim"] * 4 * copies <= data.memory_budget_gb * 2**30
    return not in_memory.decide(fits)


def check_fid(cfg: TrainGeneratorConfig, tokenizer: str) -> None:
    e = cfg.eval
    if not e.fid_samples:
        return
    if e.fid_samples < 2:
        raise SystemExit(f"error: eval.fid_samples={e.fid_samples}: FID needs at least 2 images")
    if generator_conditioning(cfg).num_classes(cfg.model) is None or tokenizer == "none":
        raise SystemExit("error: eval.fid_samples needs model.kind=class and a tokenizer")
    if not e.fid_reference:
        raise SystemExit("error: eval.fid_samples needs eval.fid_reference (held-out images)")


def training_fid(cfg: TrainGeneratorConfig, num_classes: int, decoder: Any, device: Any) -> Any:
    """A worker's gFID probe: Inception on every rank; the reference statistics on rank 0 only,
    computed once and cached where pipelines/evaluate.py caches them (under run.storage)."""
    from reptok_core.evaluation import protocol
    from reptok_core.evaluation.fid import InceptionFeatures
    from reptok_core.evaluation.gfid import TrainingFid
    from reptok_core.training.distributed import world

    e = cfg.eval
    net = InceptionFeatures().to(device)
    reference = None
    if world()[0] == 0:
        real = protocol.heldout_images(
            e.fid_reference, e.fid_reference_images, decoder.cfg.image_size
        )
        reference = protocol.reference_stats(
            e.fid_reference,
            real["image"],
            net,
            common.fid_cache_dir(cfg.run),
            "gen",
            cfg.loop.batch_size,
        )
    return TrainingFid(net, reference, e.fid_samples, num_classes, cfg.loop.batch_size)


def main(argv: list[str] | None = None) -> str:
    cfg = stage.parse(
        TrainGeneratorConfig, argv, __doc__, data="a token Parquet from encode_tokens"
    )
    uses_captions = generator_conditioning(cfg).uses_captions
    with common.reading("data.train"):
        manifest = tokens.read_manifest(cfg.data.train)
        cache = tokens.read_caption_cache(cfg.data.train) if uses_captions else None
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
    tags = {
        "reptok.tokens": cfg.data.train,
        "reptok.encode_run_id": manifest.get("mlflow_run_id") or "",
        "reptok.tokenizer_run_id": manifest.get("tokenizer_run_id") or "",
    }
    with common.reading("data.val" if cfg.data.val else "data.train"):
        held_out = tokens.load_tokens(cfg.data.val or cfg.data.train, limit=cfg.loop.eval_images)
    kind = generator_conditioning(cfg)  # after init_from: a fine-tuned export keeps its kind
    eval_batch = kind.batch_arrays(held_out, caption_list)
    eval_batch.pop("token_flip", None)
    run = stage.start(cfg, "generator", tags=tags)
    tracking_uri = run.tracking_uri
    out_uri = run.export_uri
    # A fine-tuned generator keeps the normalisation its weights were trained with.
    normalizer = (
        init.normalizer
        if init is not None
        else tokens.normalizer_from_manifest(manifest, cfg.model.token_scale)
    )
    init_folder = cfg.init_from
    del init
    encode_cfg = manifest.get("config", {}).get("encode", {})
    lineage = {
        "mlflow_run_id": run.run_id,
        "tokens": cfg.data.train,
        "tokenizer": manifest["tokenizer"],
        "tokenizer_run_id": manifest.get("tokenizer_run_id"),
        "text_encoder": captions["encoder"] if captions else None,
        "text_max_length": encode_cfg.get("text_max_length"),
    }

    def make_task(device):
        import torch

        from reptok_core.exports.generator import load_generator
        from reptok_core.exports.tokenizer import EXPORT_CONFIG, load_tokenizer
        from reptok_core.formats.token_stream import TokenStream
        from reptok_core.stages.generator import GeneratorTask
        from reptok_core.training.distributed import world

        # Every worker reads the tokens and caption states itself: no copy rides in the closure.
        cache = tokens.read_caption_cache(cfg.data.train) if captions else None

        def convert(rows: dict[str, Any]) -> dict[str, np.ndarray]:
            return kind.batch_arrays(rows, caption_list)

        data = stream = None
        if streamed:
            stream = TokenStream(cfg.data.train, convert, cfg.loop.shuffle_buffer, *world())
        else:
            train = convert(tokens.load_tokens(cfg.data.train))
            data = {k: torch.from_numpy(v) for k, v in train.items()}
        decoder = None
        if tokenizer != "none":
            decoder = load_tokenizer(
                model_uri.resolve_export(tokenizer, tracking_uri, EXPORT_CONFIG)[0], device
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

    def export(state: dict) -> None:
        from reptok_core.exports.generator import export_generator

        export_generator(state, cfg.model, sizes, normalizer, out_uri, lineage)

    return run.fit(make_task, export, eval_batch=eval_batch)


if __name__ == "__main__":
    main()
