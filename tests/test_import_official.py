"""`pipelines/import_official.py` on the release-format fixture: the exports it writes load
back equal to the official outputs, register in MLflow, and serve /generate and /reconstruct."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipelines import import_official

OFFICIAL = Path(__file__).parent / "fixtures" / "official"
META = json.loads((OFFICIAL / "official.json").read_text())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("import")
    vae = {k: v for k, v in META["sizes"]["ae"].items() if k not in ("scale", "shift")}
    (root / "vae.json").write_text(json.dumps(vae))
    dino = META["sizes"]["dino"]
    mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
    out = import_official.main(
        [
            f"source.checkpoint={OFFICIAL / 'reptok-tiny.ckpt'}",
            f"source.encoder_size={dino['model_size']}",
            f"source.encoder_heads={dino['num_heads']}",
            f"source.vae_config={root / 'vae.json'}",
            f"run.storage={root}",
            "run.name=official",
            f"run.mlflow_uri={mlflow_uri}",
            "register.tokenizer=official-tok",
            "register.generator=official-gen",
        ]
    )
    return {**out, "root": root, "mlflow_uri": mlflow_uri}


def test_exports_reproduce_the_official_outputs(imported):
    from reptok_core.exports.generator import load_generator
    from reptok_core.exports.tokenizer import load_tokenizer
    from reptok_core.models.generator import sample_tokens

    ref = load_file(str(OFFICIAL / "io.safetensors"))
    tok = load_tokenizer(imported["tokenizer"])  # VAE from the export: no hub
    gen = load_generator(imported["generator"])
    with torch.no_grad():
        assert rel(tok.encode(ref["enc.img63x60"]), ref["enc.token63x60"]) < 1e-4
        tokens = sample_tokens(
            gen.model,
            gen.normalizer,
            labels=ref["gen.y"],
            scale=gen.cfg.guidance_scale,
            interval=tuple(gen.cfg.guidance_interval),
            steps=10,
            noise=ref["gen.noise"][:, 0],
        )
        assert rel(tokens, ref["gen.tokens_10_unscaled"]) < 1e-4
        images = tok.decode(tokens, steps=10, noise=ref["gen.dec_noise"])
    assert rel(images, ref["gen.image_10"].clamp(-1, 1)) < 1e-4


def test_registered_aliases_load_from_a_fresh_folder(imported, tmp_path):
    from pipelines import model_uri
    from reptok_core.exports.tokenizer import read_tokenizer_meta

    got = model_uri.resolve("models:/official-tok@current", imported["mlflow_uri"], str(tmp_path))
    assert got.version == "1"
    assert read_tokenizer_meta(got.folder)["weights"] == "ema"


def test_bad_files_give_a_clear_error(tmp_path):
    bad = tmp_path / "not-a-checkpoint.ckpt"
    bad.write_bytes(b"hello")
    with pytest.raises(SystemExit, match="not-a-checkpoint.ckpt"):
        import_official.main([f"source.checkpoint={bad}", f"run.storage={tmp_path}"])
    truncated = tmp_path / "truncated.ckpt"
    data = (OFFICIAL / "reptok-tiny.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="truncated.ckpt"):
        import_official.main([f"source.checkpoint={truncated}", f"run.storage={tmp_path}"])
    with pytest.raises(SystemExit, match="source.weights"):
        import_official.main(
            [f"source.checkpoint={OFFICIAL / 'reptok-tiny.ckpt'}", "source.weights=best"]
        )


@pytest.mark.slow
def test_the_imported_release_serves(ray_cluster, imported):
    import requests
    from ray import serve

    from pipelines import serve as serve_app
    from reptok_core.config import load_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(
        serve_app.ServeConfig,
        "configs/serve/tiny.yaml",
        [
            f"model.tokenizer={imported['tokenizer']}",
            f"model.generator={imported['generator']}",
            f"http.port={port}",
            "http.app_name=reptok-official",
            "limits.default_steps=4",
        ],
    )
    url = serve_app.start(cfg)
    try:
        r = requests.post(url + "/generate", json={"label": [3, 7], "steps": 4}, timeout=120)
        assert r.status_code == 200, r.text
        r = requests.post(url + "/reconstruct?steps=4", data=_png_of(64), timeout=120)
        assert r.status_code == 200, r.text
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.format == "PNG" and im.size == (64, 64)
    finally:
        # Shut Serve down, not just this app: its HTTP proxy keeps the port it started with,
        # and the next module's service starts on another one.
        serve.shutdown()


def _png_of(size: int) -> bytes:
    import numpy as np

    from reptok_core.images import encode_image

    rng = np.random.default_rng(0)
    return encode_image(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
