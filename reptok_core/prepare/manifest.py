"""`_manifest.json`: what a finished prepare run produced, built from the shard summaries.

Counts (rows, inputs, rejects by reason, bytes), splits and their files, class names, the schema,
the (redacted) settings and fingerprint, and the command and version that made it. The stage
writes it last and atomically: its presence means the dataset is complete.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from reptok_core.formats.images import FORMAT, images_schema
from reptok_core.prepare.config import PrepareConfig, redacted
from reptok_core.prepare.sources import Plan


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reptok")
    except PackageNotFoundError:
        return "unknown"


def _rejected_by_reason(plan: Plan, summaries: list[dict]) -> dict[str, int]:
    by_reason: dict[str, int] = {}
    for r in plan.rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    for s in summaries:
        for reason, n in s["rejected"].items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    return by_reason


def _splits(files: list[dict]) -> dict[str, dict]:
    splits: dict[str, dict] = {}
    for f in files:
        sp = splits.setdefault(f["split"] or "all", {"rows": 0, "bytes": 0, "files": []})
        sp["rows"] += f["rows"]
        sp["bytes"] += f["bytes"]
        sp["files"].append(f["path"])
    return splits


def build_manifest(
    cfg: PrepareConfig,
    fp: str,
    plan: Plan,
    summaries: list[dict],
    rejects_files: list[str],
    run: dict,
) -> dict:
    """The manifest of a run whose shards (in plan order) returned `summaries`."""
    by_reason = _rejected_by_reason(plan, summaries)
    files = [f for s in summaries for f in s["files"]]
    latent_shape = next((s["latent_shape"] for s in summaries if s.get("latent_shape")), None)
    latent_size = int(np.prod(latent_shape)) if latent_shape else 0
    return {
        "format": FORMAT,
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": sys.argv,
        "version": _version(),
        "source": {"kind": cfg.source.kind, "uri": cfg.source.uri},
        "resolution": cfg.image.resolution,
        "image_format": cfg.image.format,
        "schema": {f.name: str(f.type) for f in images_schema(latent_size)},
        "class_names": plan.class_names,
        "num_classes": len(plan.class_names) if plan.class_names else None,
        "rows": sum(s["kept"] for s in summaries),
        "inputs": len(plan.items) + len(plan.rejects),
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "ignored_files": plan.ignored,
        "image_bytes": sum(s["image_bytes"] for s in summaries),
        "splits": _splits(files),
        "files": [f["path"] for f in files],
        "rejects_files": sorted(rejects_files),
        "vae_latent": (
            {
                "model": cfg.vae.model,
                "shape": latent_shape,
                "kind": "posterior mean x scaling factor",
            }
            if latent_shape
            else None
        ),
        "config": redacted(cfg),
        "run": run,
    }
