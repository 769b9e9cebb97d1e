"""Import the official RepTok release (`reptok-xl-600k-ImageNet.ckpt` from CompVis/RepTok) as
this project's exports: a tokenizer (fine-tuned DINOv2 + decoder + the SD-VAE, so it loads
offline) and a class-conditional generator (EMA weights, official token scaling and CFG).

    python pipelines/import_official.py source.checkpoint=reptok-xl-600k-ImageNet.ckpt \\
        run.storage=runs run.name=official register.tokenizer=reptok-tokenizer

writes <run.storage>/<run.name>/{tokenizer,generator}/, which `serve.py` (model.tokenizer /
model.generator), `encode_tokens.py`, `evaluate.py` and fine-tuning (`init_from=`) take as
they are. The checkpoint is read without running its pickled code and memory-mapped
(reptok_core/official/checkpoint.py); no Ray is needed.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import common  # noqa: E402
from reptok_core import storage  # noqa: E402
from reptok_core.config import opt, section  # noqa: E402


@dataclass
class SourceSettings:
    checkpoint: str = opt("", "the official Lightning .ckpt (a local file: it is memory-mapped)")
    weights: str = opt("ema", "generator weights: 'ema' (what the paper samples with) or 'raw'")
    encoder_size: int = opt(224, "the DINOv2's input side (not in the file; the release uses 224)")
    encoder_heads: int = opt(0, "the DINOv2's heads (not in the file); 0 = embed_dim / 64")
    vae_config: str = opt(
        "",
        "JSON file with the diffusers AutoencoderKL config of the checkpoint's VAE (GroupNorm "
        "groups are not in the weights); '' = stabilityai/sd-vae-ft-mse's, the release's",
    )
    cos_weight: float = opt(0.1, "λ recorded for fine-tuning the imported tokenizer")


@dataclass
class RegisterSettings:
    tokenizer: str = opt("", "MLflow registered-model name for the tokenizer ('' = none)")
    generator: str = opt("", "MLflow registered-model name for the generator ('' = none)")


@dataclass
class ImportOfficialConfig:
    source: SourceSettings = section(SourceSettings, "the official checkpoint")
    run: common.RunSettings = section(
        common.RunSettings, "where the exports go (run.storage/run.name) and MLflow"
    )
    register: RegisterSettings = section(RegisterSettings, "MLflow registry names")


def import_checkpoint(cfg: ImportOfficialConfig) -> dict[str, str]:
    """Write both exports; returns {"tokenizer": uri, "generator": uri}."""
    from reptok_core.exports.generator import export_generator
    from reptok_core.exports.tokenizer import export_tokenizer
    from reptok_core.official.checkpoint import load_official_checkpoint
    from reptok_core.official.convert import (
        EncoderSizes,
        first_stage_params,
        generator_from_official,
        tokenizer_from_official,
    )

    src = cfg.source
    if src.weights not in ("ema", "raw"):
        raise SystemExit(f"error: source.weights={src.weights!r}; expected 'ema' or 'raw'")
    vae = None
    if src.vae_config:
        with open(src.vae_config) as f:
            vae = json.load(f)
    ckpt = load_official_checkpoint(src.checkpoint)
    image_size = int(first_stage_params(ckpt.hyper_parameters).get("image_size", 256))
    tok = tokenizer_from_official(
        ckpt.state_dict,
        image_size=image_size,
        encoder_sizes=EncoderSizes(src.encoder_size, src.encoder_heads),
        vae_config=vae,
        cos_weight=src.cos_weight,
    )
    gen = generator_from_official(ckpt.state_dict, ckpt.hyper_parameters, ema=src.weights == "ema")
    origin = {"imported_from": os.path.abspath(src.checkpoint), "weights": src.weights}
    out = {
        "tokenizer": storage.join(common.run_dir(cfg.run), "tokenizer"),
        "generator": storage.join(common.run_dir(cfg.run), "generator"),
    }
    export_tokenizer(
        tok.state, tok.config, tok.sizes, out["tokenizer"], origin, vae_config=tok.vae_config
    )
    export_generator(gen.state, gen.config, gen.sizes, gen.normalizer, out["generator"], origin)
    return out


def main(argv: list[str] | None = None) -> dict[str, str]:
    cfg = common.parse_cli(ImportOfficialConfig, argv, __doc__)
    if not cfg.source.checkpoint:
        raise SystemExit("error: source.checkpoint is required (the official .ckpt file)")
    from reptok_core.official.checkpoint import OfficialCheckpointError

    try:
        out = import_checkpoint(cfg)
    except OfficialCheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    for kind, name in (
        ("tokenizer", cfg.register.tokenizer),
        ("generator", cfg.register.generator),
    ):
        if name:
            run = common.RunSettings(**{**cfg.run.__dict__, "name": f"{cfg.run.name}-{kind}"})
            run.register_as = name
            run_id = common.start_or_resume_mlflow_run(run, cfg, stage=f"import-{kind}")
            version = common.register_export(run, run_id, out[kind], kind)
            common.finish_mlflow_run(run, run_id)
            print(f"[import] registered {kind} as models:/{name}@{run.alias} (version {version})")
    for kind, uri in out.items():
        print(f"[import] {kind}: {uri}")
    return out


if __name__ == "__main__":
    main()
