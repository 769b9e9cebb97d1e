"""One prepare run, start to finish, with the shard execution passed in.

`run(cfg, execute)` plans the inputs, cuts them into shards, skips the shards already complete,
hands the rest to `execute` (pipelines/prepare_data.py passes Ray Data; the default runs them one
after another in this process), then deletes leftovers and writes the manifest last.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable

from reptok_core import storage
from reptok_core.prepare import fileio, shards
from reptok_core.prepare.config import PrepareConfig, PrepareError, fingerprint, validate
from reptok_core.prepare.manifest import build_manifest
from reptok_core.prepare.sources import plan_source
from reptok_core.prepare.vae import load_vae
from reptok_core.prepare.writer import process_shard

log = logging.getLogger("reptok.prepare_data")

# (shards to process, shard context, settings) -> their summaries, in any order.
Execute = Callable[[list[dict], dict, PrepareConfig], Iterable[dict]]


def run_inline(todo: list[dict], ctx: dict, cfg: PrepareConfig) -> Iterable[dict]:
    """Process the shards one after another in this process (executor=inline)."""
    space = load_vae(ctx["vae_model"]) if ctx["vae_model"] else None
    for shard in todo:
        yield process_shard(shard, ctx, space)


class Progress:
    def __init__(self, total_rows: int, every_s: float) -> None:
        self.total, self.every = total_rows, every_s
        self.done = self.kept = 0
        self.t0 = self.last = time.monotonic()

    def update(self, summary: dict, force: bool = False) -> None:
        self.done += summary["inputs"]
        self.kept += summary["kept"]
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info(
                "progress: %d/%d inputs (%d kept), %.1f rows/s, ETA %.0fs",
                self.done,
                self.total,
                self.kept,
                rate,
                eta,
            )


def shard_context(cfg: PrepareConfig, output: str) -> dict:
    """The plain dict of settings every shard worker gets (picklable, no dataclasses)."""
    return {
        "output": output,
        "endpoint": cfg.s3.endpoint,
        "resolution": cfg.image.resolution,
        "format": cfg.image.format,
        "quality": cfg.image.quality,
        "png_compress_level": cfg.image.png_compress_level,
        "min_size": cfg.image.min_size,
        "max_aspect": cfg.image.max_aspect_ratio,
        "max_pixels": cfg.image.max_pixels,
        "val_fraction": cfg.output.val_fraction,
        "shard_mb": cfg.output.shard_mb,
        "batch_size": cfg.batch_size,
        "source_uri": cfg.source.uri,
        "image_column": cfg.source.image_column,
        "label_column": cfg.source.label_column,
        "caption_column": cfg.source.caption_column,
        "threaded_reads": cfg.source.kind in ("folder", "manifest"),
        "vae_model": cfg.vae.model if cfg.vae.enabled else "",
    }


def _check_writable(output: str, endpoint: str) -> None:
    probe = storage.join(output, f"_write_probe-{os.getpid()}-{time.time_ns()}")
    try:
        storage.write_bytes_atomic(probe, b"ok", endpoint or None)
        storage.delete(probe, endpoint or None)
    except Exception as e:  # noqa: BLE001
        raise PrepareError(f"output {output!r} is not writable: {type(e).__name__}: {e}") from None


def _check_previous(output: str, manifest_uri: str, fp: str, cfg: PrepareConfig) -> None:
    """Refuse (or, with overwrite, clear) a finished dataset made with other settings."""
    endpoint = cfg.s3.endpoint
    if not storage.exists(manifest_uri, endpoint or None):
        return
    old = json.loads(fileio.read(manifest_uri, endpoint))
    if cfg.output.overwrite and old.get("fingerprint") != fp:
        log.info("overwrite: removing the previous dataset under %s", output)
        shards.clean(output, set(), endpoint)
    elif old.get("fingerprint") != fp:
        raise PrepareError(
            f"output {output!r} already holds a dataset made with other settings "
            f"(fingerprint {old.get('fingerprint')} vs {fp} now); pass output.overwrite=true "
            "to replace it, or choose another output.uri"
        )


def _s3_credentials_to_env(cfg: PrepareConfig) -> None:
    if cfg.s3.access_key_id:  # storage (and the Ray workers, via runtime_env) read the env
        os.environ["AWS_ACCESS_KEY_ID"] = cfg.s3.access_key_id
        os.environ["AWS_SECRET_ACCESS_KEY"] = cfg.s3.secret_access_key
    if cfg.s3.region:
        os.environ["AWS_REGION"] = cfg.s3.region


def run(cfg: PrepareConfig, execute: Execute | None = None) -> dict:
    """Prepare the dataset; return the manifest. Raises PrepareError (with an exit code).

    `execute` runs the shards still to do; None = `run_inline`, allowed only for executor=inline
    (executor=ray goes through pipelines/prepare_data.py, as reptok_core never imports Ray).
    """
    validate(cfg)
    if execute is None:
        if cfg.executor != "inline":
            raise PrepareError("executor=ray: run through pipelines/prepare_data.py")
        execute = run_inline
    t0 = time.monotonic()
    _s3_credentials_to_env(cfg)
    endpoint = cfg.s3.endpoint
    output = fileio.absolute(cfg.output.uri)
    fp = fingerprint(cfg)

    _check_writable(output, endpoint)
    manifest_uri = storage.join(output, shards.MANIFEST_NAME)
    _check_previous(output, manifest_uri, fp, cfg)

    plan = plan_source(cfg.source, endpoint)
    planned = shards.make_shards(plan.items, cfg.output.shard_rows, fp)
    if not plan.items and not plan.rejects:
        raise PrepareError(
            f"no inputs found in {cfg.source.kind} source {cfg.source.uri!r}", exit_code=1
        )
    if plan.rejects:
        fileio.write_jsonl(storage.join(output, shards.PLAN_REJECTS), plan.rejects, endpoint)

    done = shards.existing_markers(output, {s["name"] for s in planned}, endpoint)
    todo = [s for s in planned if s["name"] not in done]
    log.info(
        "%d inputs in %d shards (%d already done), %d rejected while listing",
        len(plan.items),
        len(planned),
        len(done),
        len(plan.rejects),
    )
    summaries = dict(done)
    progress = Progress(sum(len(s["items"]) for s in todo), cfg.progress_s)
    if todo:
        try:
            for s in execute(todo, shard_context(cfg, output), cfg):
                summaries[s["shard"]] = s
                progress.update(s)
        except Exception as e:  # noqa: BLE001 - surface as a run failure with the cause
            raise PrepareError(
                f"processing failed (output {output!r}): {type(e).__name__}: {e}"
            ) from e

    ordered = [summaries[s["name"]] for s in planned]
    keep = shards.claimed_files(ordered, bool(plan.rejects))
    removed = shards.clean(output, keep | {shards.MANIFEST_NAME}, endpoint)
    elapsed = time.monotonic() - t0
    processed = sum(len(s["items"]) for s in todo)
    manifest = build_manifest(
        cfg,
        fp,
        plan,
        ordered,
        [k for k in keep if k.startswith("rejects/")],
        {
            "shards": len(planned),
            "shards_skipped": len(done),
            "shards_processed": len(todo),
            "stale_files_removed": removed,
            "elapsed_s": round(elapsed, 2),
            "images_per_s": round(processed / elapsed, 1) if processed else None,
        },
    )
    if manifest["rows"] == 0:
        raise PrepareError(
            f"no usable images: 0 kept of {manifest['inputs']} inputs "
            f"(rejected by reason: {manifest['rejected_by_reason']}; see {output}/rejects/)",
            exit_code=1,
        )
    # Written last and atomically: its presence means the dataset is complete.
    storage.write_bytes_atomic(
        manifest_uri, json.dumps(manifest, indent=1).encode(), endpoint or None
    )
    log.info(
        "done: kept %d of %d inputs, rejected %d %s, %d files, %.1f MB of images, %.1f s (%s img/s) -> %s",
        manifest["rows"],
        manifest["inputs"],
        manifest["rejected"],
        manifest["rejected_by_reason"],
        len(manifest["files"]),
        manifest["image_bytes"] / 1e6,
        elapsed,
        manifest["run"]["images_per_s"],
        manifest_uri,
    )
    return manifest
