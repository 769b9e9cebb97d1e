"""The settings of the prepare stage (PrepareConfig), their validation and their fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from reptok_core.config import ConfigError, opt, section, to_dict
from reptok_core.formats.images import FORMAT
from reptok_core.images import IMAGE_FORMATS

SOURCE_KINDS = ("folder", "manifest", "parquet", "webdataset", "fashion-mnist", "emoji")


@dataclass
class SourceConfig:
    kind: str = opt("folder", f"what the input is: {' | '.join(SOURCE_KINDS)}")
    uri: str = opt(
        "",
        "where it lives (local path or s3://): the image folder; the CSV/JSONL/Parquet manifest; "
        "a Parquet file or prefix; a .tar file or prefix of WebDataset shards; for fashion-mnist "
        "the folder of idx files (empty = Debian's /usr/share/datasets/fashion-mnist); for emoji "
        "the font (empty = Noto Color Emoji)",
    )
    folder_layout: str = opt(
        "auto",
        "folder: 'classes' (ImageNet layout, one sub-folder per class -> label and class names), "
        "'flat' (no labels) or 'auto' (classes when no image sits at the top level)",
    )
    path_column: str = opt("path", "manifest: column with image paths (relative to the manifest)")
    caption_column: str = opt("caption", "manifest/parquet: caption column, used when present")
    label_column: str = opt(
        "label", "manifest/parquet: label column (ints, or strings mapped to sorted class ids)"
    )
    image_column: str = opt(
        "image", "parquet: encoded image bytes (binary, or a struct with a 'bytes' field)"
    )
    id_column: str = opt(
        "", "manifest/parquet: column holding each row's stable key (default: path / file#row)"
    )
    split: str = opt("train", "fashion-mnist: which of its splits to read: train | test | all")
    class_names: list[str] = opt([], "override the class names (label i -> class_names[i])")
    limit: int = opt(0, "keep only the first N inputs after sorting by id (0 = all): smoke runs")


@dataclass
class ImageConfig:
    resolution: int = opt(256, "output side in pixels (ADM centre crop + resize)")
    format: str = opt("png", f"encoding of the stored image: {' | '.join(IMAGE_FORMATS)}")
    quality: int = opt(95, "JPEG/WebP quality (WebP 100 = lossless)")
    png_compress_level: int = opt(6, "PNG zlib level 0-9 (lower = faster, bigger files)")
    min_size: int = opt(
        16,
        "reject images whose shorter side is below this (0 = keep all): a 1x1 icon or a "
        "thumbnail is mostly upsampling blur at any training resolution",
    )
    max_aspect_ratio: float = opt(
        4.0,
        "reject images whose longer side exceeds this many times the shorter (0 = keep all): "
        "the centre crop keeps under 1/4 of a wider image, a few pixels of a 4000x2 sliver",
    )
    max_pixels: int = opt(
        89_478_485, "reject images with more pixels than this before decoding (bomb guard)"
    )


@dataclass
class OutputConfig:
    uri: str = opt("data/prepared", "output prefix: local folder or s3://bucket/prefix")
    shard_rows: int = opt(1000, "inputs per shard; one Ray task each, at most this many rows/file")
    shard_mb: float = opt(256.0, "start a new file within a shard once this many MB are buffered")
    val_fraction: float = opt(
        0.0, "fraction of ids (by stable hash) written under val/ instead of train/; 0 = no split"
    )
    overwrite: bool = opt(
        False, "replace an output made with different settings instead of refusing to run"
    )


@dataclass
class VAEConfig:
    enabled: bool = opt(False, "also store SD-VAE latents in a `vae_latent` column")
    model: str = opt("stabilityai/sd-vae-ft-mse", "VAE: diffusers hub id, local folder or s3://")
    actors: int = opt(1, "VAE actors (each loads the model once)")
    num_gpus: float = opt(1.0, "GPUs per VAE actor (0 runs it on CPU)")


@dataclass
class S3Config:
    endpoint: str = opt(
        "", "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL / REPTOK_S3_ENDPOINT)"
    )
    access_key_id: str = opt("", "S3 key id (default: AWS_ACCESS_KEY_ID; prefer the environment)")
    secret_access_key: str = opt("", "S3 secret (default: AWS_SECRET_ACCESS_KEY; never logged)")
    region: str = opt("", "S3 region (default: AWS_REGION / AWS_DEFAULT_REGION / us-east-1)")


@dataclass
class PrepareConfig:
    source: SourceConfig = section(SourceConfig, "input images")
    image: ImageConfig = section(ImageConfig, "per-image processing")
    output: OutputConfig = section(OutputConfig, "where and how the Parquet is written")
    vae: VAEConfig = section(VAEConfig, "optional precomputed SD-VAE latents")
    s3: S3Config = section(S3Config, "S3 access, for inputs and outputs")
    executor: str = opt("ray", "'ray' (Ray Data, honours RAY_ADDRESS) or 'inline' (this process)")
    batch_size: int = opt(64, "images decoded/encoded together inside a shard task")
    task_retries: int = opt(
        3,
        "retries of a shard task that raised (a failed S3 write, say); lost workers are retried by Ray",
    )
    progress_s: float = opt(10.0, "seconds between progress lines")


class PrepareError(Exception):
    """A run-level failure with the exit code the CLI returns (1: nothing usable, 2: setup)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def validate(cfg: PrepareConfig) -> None:
    def bad(msg: str) -> None:
        raise ConfigError(msg)

    if cfg.source.kind not in SOURCE_KINDS:
        bad(f"source.kind={cfg.source.kind!r}; expected one of {SOURCE_KINDS}")
    if cfg.source.kind in ("folder", "manifest", "parquet", "webdataset") and not cfg.source.uri:
        bad(f"source.uri is required for source.kind={cfg.source.kind}")
    if cfg.source.folder_layout not in ("auto", "classes", "flat"):
        bad(f"source.folder_layout={cfg.source.folder_layout!r}; expected auto | classes | flat")
    if cfg.source.split not in ("train", "test", "all"):
        bad(f"source.split={cfg.source.split!r}; expected train | test | all")
    if cfg.image.format not in IMAGE_FORMATS:
        bad(f"image.format={cfg.image.format!r}; expected one of {IMAGE_FORMATS}")
    if cfg.image.min_size < 0:
        bad(f"image.min_size={cfg.image.min_size} must be >= 0 (0 = no minimum)")
    if cfg.image.max_aspect_ratio != 0 and cfg.image.max_aspect_ratio < 1:
        bad(f"image.max_aspect_ratio={cfg.image.max_aspect_ratio} must be >= 1 (0 = no limit)")
    if cfg.image.resolution <= 0 or cfg.output.shard_rows <= 0 or cfg.batch_size <= 0:
        bad("image.resolution, output.shard_rows and batch_size must be positive")
    if not 0.0 <= cfg.output.val_fraction < 1.0:
        bad(f"output.val_fraction={cfg.output.val_fraction} must be in [0, 1)")
    if cfg.executor not in ("ray", "inline"):
        bad(f"executor={cfg.executor!r}; expected ray | inline")
    if not cfg.output.uri:
        bad("output.uri is required")


def fingerprint(cfg: PrepareConfig) -> str:
    """Hash of every setting that changes the bytes written (not where, nor how fast)."""
    relevant = {
        "source": to_dict(cfg.source),
        "image": to_dict(cfg.image),
        "output": {
            k: v
            for k, v in to_dict(cfg.output).items()
            if k in ("shard_rows", "shard_mb", "val_fraction")
        },
        "vae": to_dict(cfg.vae) if cfg.vae.enabled else None,
        "format": FORMAT,
    }
    return hashlib.blake2b(json.dumps(relevant, sort_keys=True).encode(), digest_size=8).hexdigest()


def redacted(cfg: PrepareConfig) -> dict:
    """The settings as a dict for the manifest, S3 credentials masked."""
    d = to_dict(cfg)
    for k in ("access_key_id", "secret_access_key"):
        if d["s3"][k]:
            d["s3"][k] = "***"
    return d
