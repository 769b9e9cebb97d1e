"""Data preparation without Ray: raw images -> the images Parquet of DESIGN.md §3.1
(its schema and readers: reptok_core/formats/images.py).

Output under `output.uri` (local folder or s3://bucket/prefix):
    part-NNNNN-<hash>-K.parquet  image rows (or train/ and val/ sub-prefixes when
                                 output.val_fraction > 0, so a reader opens one split directly)
    rejects/*.jsonl              one JSON line per dropped input: key, id, reason, detail, uri
    _shards/*.json               per-shard completion markers (files, counts)
    _manifest.json               written last, atomically: counts, class names, settings, command

How it stays idempotent: the driver lists the inputs (keys only, never pixels), sorts them and cuts
them into shards of `output.shard_rows`. A shard's name is a hash of the settings and of its keys,
and its files are written under that name (each one atomically) followed by its marker. A re-run
skips shards whose marker and files exist, rewrites half-done ones under the same names, and
deletes leftovers that belong to no current shard, so the rows are exactly the planned ones no
matter where an earlier run was killed.

    config.py    PrepareConfig and its sections, validation, the settings fingerprint
    sources.py   listing the inputs of each source kind (driver side; never reads pixels)
    fetch.py     reading one listed input's pixels back (worker side)
    writer.py    one shard: decode, crop, encode -> Parquet files, rejects, marker
    shards.py    shard names, val split, completion markers, cleanup of leftovers
    manifest.py  _manifest.json from the shard summaries
    stage.py     one run, start to finish, with the shard execution passed in
    fileio.py    file access on top of reptok_core.storage (cached S3 client, listings)
    vae.py       the optional SD-VAE latent column

pipelines/prepare_data.py runs the shards as Ray Data tasks; `run(cfg)` here runs them inline.
"""

from reptok_core.prepare.config import (
    SOURCE_KINDS,
    PrepareConfig,
    PrepareError,
    fingerprint,
    validate,
)
from reptok_core.prepare.shards import in_val_split, make_shards
from reptok_core.prepare.sources import Plan, plan_source
from reptok_core.prepare.stage import Execute, run, run_inline
from reptok_core.prepare.vae import encode_vae_latents, load_vae
from reptok_core.prepare.writer import process_shard

__all__ = [
    "SOURCE_KINDS",
    "Execute",
    "Plan",
    "PrepareConfig",
    "PrepareError",
    "encode_vae_latents",
    "fingerprint",
    "in_val_split",
    "load_vae",
    "make_shards",
    "plan_source",
    "process_shard",
    "run",
    "run_inline",
    "validate",
]
