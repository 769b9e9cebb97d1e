"""Ray Serve application: RepTok generation, reconstruction, token encode / decode, interpolation.

    python pipelines/serve.py --config configs/serve/tiny.yaml model.tokenizer=models:/reptok-tokenizer-tiny@current
    serve run pipelines.serve:build_app config=configs/serve/tiny.yaml model.tokenizer=runs/t1/export
    serve run pipelines.serve:app            # preset from $REPTOK_SERVE_CONFIG, else defaults

Two deployments. `Api` is the FastAPI ingress: it parses and validates every request (types,
ranges, upload size and pixel count, undecodable images) and encodes PNGs, so bad input is
answered with a 4xx JSON error long before it reaches a model. `Models` holds the tokenizer
and the optional class / text generators (one GPU per replica when the cluster has GPUs) and
batches `encode` and `decode` calls across concurrent requests with @serve.batch; decoding (the
50-step flow decoder) is where almost all the time goes, so that is what must batch.

Models come from an export folder (path or s3://) or the MLflow registry (`models:/name@alias`).
The references travel as the deployment's `user_config`: changing it (`serve deploy` with a new
config, or a RayService edit) calls `reconfigure`, which reloads only what changed, without a
restart. With `model.reload_poll_s > 0` replicas also notice on their own when an alias moves.

Endpoints (JSON errors look like {"error": "...", "detail": ...}):
  POST /generate        {"label": 3 | [3, 7], "n": 4, "cfg_scale": 1.5, "steps": 50, "seed": 0,
                         "format": "png" | "json"}      -> PNG (a row for n > 1) or base64 PNGs
  POST /text-to-image   {"prompt": "a red boot", "n", "cfg_scale", "steps", "seed", "format"}
  POST /reconstruct     raw image bytes; ?steps=&seed=  -> PNG at the model's resolution
  POST /encode          raw image bytes                 -> {"token": [floats], "dim": D}
  POST /decode          {"token": [floats], "steps", "seed"} -> PNG
  POST /interpolate     {"a": <base64 image> | [token], "b": ..., "n": 8, "steps", "seed"} -> PNG row
  GET  /healthz, GET /info (model versions, presets, limits, batching counters)
"""

# No `from __future__ import annotations`: FastAPI must see the request models as real classes
# (Serve's class-based ingress re-wraps the methods, and string annotations then fail to resolve).
import asyncio
import base64
import binascii
import logging
import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from ray import serve

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import model_uri  # noqa: E402
from reptok_core.config import from_dict, load_config, opt, section, to_dict  # noqa: E402
from reptok_core.images import ImageRejected, encode_image, prepare_bytes  # noqa: E402

log = logging.getLogger("ray.serve")


# ----------------------------------------------------------------------------- configuration


@dataclass
class ModelSettings:
    tokenizer: str = opt(
        "",
        "tokenizer: an export folder (path or s3://), models:/<name>@<alias> or models:/<name>/<v>",
    )
    generator: str = opt("", "class-conditional generator reference ('' = /generate answers 503)")
    text_generator: str = opt("", "text-conditioned generator ('' = /text-to-image answers 503)")
    mlflow_uri: str = opt("", "tracking URI for models:/ references (default $MLFLOW_TRACKING_URI)")
    reload_poll_s: float = opt(
        0.0, "check registry aliases every N seconds and reload when one moved (0 = never)"
    )
    cache_dir: str = opt("", "where registry versions are downloaded ('' = the temp folder)")


@dataclass
class LimitSettings:
    max_n: int = opt(16, "most images per /generate, /text-to-image or /interpolate request")
    max_steps: int = opt(250, "most sampling steps a request may ask for")
    default_steps: int = opt(50, "sampling steps when a request does not say (the paper's 50)")
    max_upload_bytes: int = opt(10_000_000, "largest accepted image upload, in bytes")
    max_pixels: int = opt(40_000_000, "largest accepted image, width x height (checked pre-decode)")
    max_prompt_chars: int = opt(1000, "longest accepted text prompt")
    max_cfg_scale: float = opt(20.0, "largest classifier-free guidance scale")


@dataclass
class ScalingSettings:
    use_gpu: str = opt(
        "auto", "'auto' (a GPU per model replica when the cluster has GPUs), true, false"
    )
    model_cpus: float = opt(1.0, "CPUs reserved per model replica")
    ingress_cpus: float = opt(0.5, "CPUs reserved per ingress replica")
    ingress_replicas: int = opt(1, "ingress (HTTP parsing / PNG encoding) replicas")
    min_replicas: int = opt(1, "autoscaling: fewest model replicas (0 scales to zero when idle)")
    max_replicas: int = opt(1, "autoscaling: most model replicas")
    target_ongoing_requests: float = opt(8.0, "autoscaling: in-flight requests per model replica")
    max_batch_size: int = opt(16, "largest encode / decode batch a model replica runs at once")
    batch_wait_timeout_s: float = opt(0.02, "how long a partial batch waits for more requests")


@dataclass
class HttpSettings:
    host: str = opt("127.0.0.1", "interface to bind; 0.0.0.0 exposes the service to the network")
    port: int = opt(8000, "HTTP port")
    route_prefix: str = opt("/", "URL prefix of the application")
    app_name: str = opt("reptok", "Serve application name")


@dataclass
class ServeConfig:
    model: ModelSettings = section(ModelSettings, "which models to serve and how to reload them")
    limits: LimitSettings = section(LimitSettings, "request validation limits")
    scaling: ScalingSettings = section(ScalingSettings, "replicas, autoscaling, batching, GPU")
    http: HttpSettings = section(HttpSettings, "where the HTTP proxy listens")


# ----------------------------------------------------------------------------- model replica


@dataclass
class _Loaded:
    """Everything one model generation needs; swapped as a whole so requests never see a mix."""

    refs: dict[str, tuple[str, str]]  # role -> (reference, registry version)
    tokenizer: Any
    generator: Any = None
    text_generator: Any = None
    text_encoder: Any = None


class Models:
    """Tokenizer + generators on one device; batched encode / decode."""

    def __init__(self, scaling: dict[str, Any]):
        import torch

        s = from_dict(ScalingSettings, scaling)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.loaded: _Loaded | None = None
        self.settings: ModelSettings | None = None
        self.max_batch_seen = 0
        self.batches = 0
        self.batched_items = 0
        self.reloads = 0
        self._reload_lock = threading.Lock()
        self._poller: asyncio.Task | None = None
        for method in (self.encode, self.decode):
            method.set_max_batch_size(s.max_batch_size)
            method.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    # -- loading

    def _version(self, ref: str, settings: ModelSettings) -> str:
        return (
            model_uri.registry_version(ref, settings.mlflow_uri)
            if model_uri.is_registry(ref)
            else ""
        )

    def _refresh(self, settings: ModelSettings) -> bool:
        """Load whatever changed (reference or registry version); True when anything did."""
        from reptok_core.generator_task import load_generator
        from reptok_core.text_encoder import OFFLINE_MINILM, TextEncoder
        from reptok_core.tokenizer_task import load_tokenizer

        with self._reload_lock:
            old = self.loaded
            wanted = {
                role: getattr(settings, role)
                for role in ("tokenizer", "generator", "text_generator")
            }
            if not wanted["tokenizer"]:
                raise ValueError("model.tokenizer is empty: give an export folder or models:/ URI")
            refs = {r: (ref, self._version(ref, settings)) for r, ref in wanted.items() if ref}
            if old is not None and old.refs == refs:
                return False

            def fetch(role: str) -> str:
                cache = settings.cache_dir or None
                return model_uri.resolve(wanted[role], settings.mlflow_uri, cache).folder

            def same(role: str) -> bool:
                return old is not None and old.refs.get(role) == refs.get(role)

            new = _Loaded(
                refs=refs,
                tokenizer=old.tokenizer
                if same("tokenizer")
                else load_tokenizer(fetch("tokenizer"), self.device),
            )
            if "generator" in refs:
                new.generator = (
                    old.generator
                    if same("generator")
                    else load_generator(fetch("generator"), self.device)
                )
                if new.generator.cfg.kind != "class":
                    raise ValueError(
                        f"model.generator {wanted['generator']!r} is not class-conditional"
                    )
            if "text_generator" in refs:
                if same("text_generator"):
                    new.text_generator, new.text_encoder = old.text_generator, old.text_encoder
                else:
                    new.text_generator = load_generator(fetch("text_generator"), self.device)
                    if new.text_generator.cfg.kind != "text":
                        raise ValueError(
                            f"model.text_generator {wanted['text_generator']!r} is not text-conditioned"
                        )
                    name = new.text_generator.text_encoder or OFFLINE_MINILM
                    new.text_encoder = TextEncoder(name).to(self.device)
            for role in ("generator", "text_generator"):
                g = getattr(new, role)
                if g is not None and g.normalizer.mean.numel() != new.tokenizer.token_dim:
                    raise ValueError(
                        f"model.{role} makes {g.normalizer.mean.numel()}-d tokens but the "
                        f"tokenizer's are {new.tokenizer.token_dim}-d"
                    )
            self.loaded = new
            self.reloads += 1
            log.info("loaded models %s", refs)
            return True

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        settings = from_dict(ModelSettings, user_config)
        self.settings = settings
        await asyncio.to_thread(self._refresh, settings)
        if settings.reload_poll_s > 0 and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(max(self.settings.reload_poll_s, 0.1))
            if self.settings.reload_poll_s <= 0:
                continue
            try:
                await asyncio.to_thread(self._refresh, self.settings)
            except Exception:  # noqa: BLE001 - a broken new version must not take the old one down
                log.exception("reload failed; still serving %s", self.loaded and self.loaded.refs)

    # -- description

    def info(self) -> dict[str, Any]:
        m = self.loaded
        if m is None:
            return {"ready": False}
        tok = m.tokenizer

        def gen_info(role: str) -> dict[str, Any] | None:
            g = getattr(m, role)
            if g is None:
                return None
            ref, version = m.refs[role]
            out = {"uri": ref, "version": version, "kind": g.cfg.kind}
            out.update(cfg_scale=g.cfg.cfg_scale, cfg_interval=list(g.cfg.cfg_interval))
            if g.cfg.kind == "class":
                out["num_classes"] = g.cfg.mixer.num_classes
            else:
                out["text_encoder"] = g.text_encoder
            return out

        ref, version = m.refs["tokenizer"]
        return {
            "ready": True,
            "device": str(self.device),
            "tokenizer": {
                "uri": ref,
                "version": version,
                "image_size": tok.cfg.image_size,
                "token_dim": tok.token_dim,
                "latent": tok.cfg.latent.kind,
                "encoder": tok.cfg.encoder.timm_name,
                "decoder_width": tok.cfg.decoder.width,
                "decoder_depth": tok.cfg.decoder.depth,
            },
            "generator": gen_info("generator"),
            "text_generator": gen_info("text_generator"),
            "batching": {
                "max_batch_seen": self.max_batch_seen,
                "batches": self.batches,
                "items": self.batched_items,
            },
            "reloads": self.reloads,
        }

    def _count(self, n: int) -> None:
        self.max_batch_seen = max(self.max_batch_seen, n)
        self.batches += 1
        self.batched_items += n

    # -- batched work (compute runs in a thread so /info and health checks stay responsive)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def encode(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 (H, W, 3) images at the tokenizer's resolution -> float32 tokens (D,)."""
        self._count(len(images))
        return await asyncio.to_thread(self._encode, self.loaded.tokenizer, images)

    def _encode(self, tok: Any, images: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        from reptok_core.tokenizer_task import images_from_uint8

        with torch.no_grad():
            x = images_from_uint8(torch.from_numpy(np.stack(images)), self.device)
            return list(tok.encode(x).float().cpu().numpy())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def decode(
        self, tokens: list[np.ndarray], steps: list[int], seeds: list[int]
    ) -> list[np.ndarray]:
        """Tokens (D,) -> uint8 (H, W, 3). Each request keeps its own seed, so a request's image
        does not depend on which other requests it was batched with."""
        self._count(len(tokens))
        return await asyncio.to_thread(self._decode, self.loaded.tokenizer, tokens, steps, seeds)

    def _decode(
        self, tok: Any, tokens: list[np.ndarray], steps: list[int], seeds: list[int]
    ) -> list[np.ndarray]:
        import torch

        from reptok_core import flow
        from reptok_core.tokenizer_task import images_to_uint8

        out: list[np.ndarray | None] = [None] * len(tokens)
        dtype = next(tok.decoder.parameters()).dtype
        for n_steps in sorted(set(steps)):  # one flow solve per step count in the batch
            idx = [i for i, s in enumerate(steps) if s == n_steps]
            z = torch.as_tensor(np.stack([tokens[i] for i in idx]), dtype=dtype, device=self.device)
            # Same noise as Tokenizer.decode(token[None], seed=s): randn from a seeded CPU generator.
            noise = torch.stack(
                [
                    torch.randn(
                        tok.latent_shape(), generator=torch.Generator().manual_seed(seeds[i])
                    )
                    for i in idx
                ]
            ).to(self.device, dtype)
            with torch.no_grad():
                latents = flow.sample(lambda x, t, z=z: tok.decoder(x, t, z), noise, n_steps)
                pixels = images_to_uint8(tok.latent_space.decode(latents))
            for i, p in zip(idx, pixels, strict=True):
                out[i] = p
        return out

    async def class_tokens(
        self, labels: list[int], scale: float, steps: int, seed: int
    ) -> np.ndarray:
        """Stage-2 sampling (a small MLP-Mixer: cheap next to decoding, so not batched)."""
        g = self.loaded.generator
        return await asyncio.to_thread(self._sample, g, {"labels": labels}, scale, steps, seed)

    async def text_tokens(
        self, prompt: str, n: int, scale: float, steps: int, seed: int
    ) -> np.ndarray:
        m = self.loaded
        return await asyncio.to_thread(
            self._sample,
            m.text_generator,
            {"text": [prompt] * n, "encoder": m.text_encoder},
            scale,
            steps,
            seed,
        )

    def _sample(self, g: Any, cond: dict, scale: float, steps: int, seed: int) -> np.ndarray:
        import torch

        from reptok_core.generator_task import sample_tokens

        kw = dict(scale=scale, interval=tuple(g.cfg.cfg_interval), steps=steps, seed=seed)
        with torch.no_grad():
            if "labels" in cond:
                z = sample_tokens(g.model, g.normalizer, labels=torch.tensor(cond["labels"]), **kw)
            else:
                z = sample_tokens(g.model, g.normalizer, text=cond["encoder"](cond["text"]), **kw)
        return z.float().cpu().numpy()


# ----------------------------------------------------------------------------- HTTP ingress

api = FastAPI(title="RepTok", description="One-token image tokenizer: sample, encode, decode.")


def _error(status: int, error: str, detail: Any = None) -> JSONResponse:
    body = {"error": error} if detail is None else {"error": error, "detail": detail}
    return JSONResponse(status_code=status, content=body)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {"field": ".".join(str(p) for p in e.get("loc", ())[1:]) or "body", "problem": e.get("msg")}
        for e in exc.errors()
    ]
    if any(e.get("type") == "json_invalid" for e in exc.errors()):
        return _error(400, "request body is not valid JSON", errors)
    return _error(422, "invalid request", errors)


@api.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


@api.exception_handler(Exception)
async def _crash(_: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return _error(500, f"internal error: {type(exc).__name__}")


class _Strict(BaseModel):
    # strict: "3" is not an int and 3.0 not a label; extra="forbid": typos in field names fail.
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateRequest(_Strict):
    label: int | list[int]
    n: int | None = None
    cfg_scale: float | None = None
    steps: int | None = None
    seed: int = 0
    format: Literal["png", "json"] = "png"


class TextToImageRequest(_Strict):
    prompt: str
    n: int = 1
    cfg_scale: float | None = None
    steps: int | None = None
    seed: int = 0
    format: Literal["png", "json"] = "png"


class DecodeRequest(_Strict):
    token: list[float]
    steps: int | None = None
    seed: int = 0


class InterpolateRequest(_Strict):
    a: str | list[float]
    b: str | list[float]
    n: int = 8
    steps: int | None = None
    seed: int = 0


def _bad(cond: bool, message: str, status: int = 422) -> None:
    if cond:
        raise HTTPException(status_code=status, detail=message)


def _png_response(images: list[np.ndarray], fmt: str, extra: dict[str, Any]) -> Response:
    if fmt == "json":
        pngs = [base64.b64encode(encode_image(im)).decode() for im in images]
        return JSONResponse({"images": pngs, **extra})
    row = images[0] if len(images) == 1 else np.concatenate(images, axis=1)
    return Response(
        encode_image(row), media_type="image/png", headers={"X-Images": str(len(images))}
    )


@serve.deployment
@serve.ingress(api)
class Api:
    def __init__(self, models: Any, limits: dict[str, Any]):
        self.models = models
        self.limits = from_dict(LimitSettings, limits)

    # -- shared checks

    async def _info(self) -> dict[str, Any]:
        info = await self.models.info.remote()
        if not info.get("ready"):
            raise HTTPException(503, "model not loaded yet")
        return info

    def _steps(self, steps: int | None) -> int:
        steps = self.limits.default_steps if steps is None else steps
        _bad(
            not 1 <= steps <= self.limits.max_steps,
            f"steps={steps} must be in [1, {self.limits.max_steps}]",
        )
        return steps

    def _seed(self, seed: int) -> int:
        _bad(not 0 <= seed < 2**63, f"seed={seed} must be in [0, 2**63)")
        return seed

    def _n(self, n: int, low: int = 1) -> int:
        _bad(not low <= n <= self.limits.max_n, f"n={n} must be in [{low}, {self.limits.max_n}]")
        return n

    def _scale(self, scale: float | None, default: float) -> float:
        scale = default if scale is None else scale
        _bad(
            not (math.isfinite(scale) and 0 <= scale <= self.limits.max_cfg_scale),
            f"cfg_scale={scale} must be in [0, {self.limits.max_cfg_scale}]",
        )
        return scale

    def _token(self, token: list[float], dim: int, name: str = "token") -> np.ndarray:
        _bad(
            len(token) != dim, f"{name} has {len(token)} values; this tokenizer's tokens have {dim}"
        )
        z = np.asarray(token, dtype=np.float32)
        _bad(
            not np.isfinite(z).all() or np.abs(z).max() > 1e4,
            f"{name} values must be finite and |v| <= 1e4",
        )
        return z

    def _image(self, data: bytes, size: int, name: str = "image") -> np.ndarray:
        _bad(not data, f"{name} is empty: send the image file's bytes", 400)
        _bad(
            len(data) > self.limits.max_upload_bytes,
            f"{name} is {len(data)} bytes; the limit is {self.limits.max_upload_bytes}",
            413,
        )
        try:
            return prepare_bytes(data, size, max_pixels=self.limits.max_pixels)
        except ImageRejected as e:
            status = 413 if e.reason == "too_many_pixels" else 400
            raise HTTPException(
                status, f"{name} rejected ({e.reason}): {e.detail or e.reason}"
            ) from None

    async def _upload(self, request: Request) -> bytes:
        cap = self.limits.max_upload_bytes
        declared = request.headers.get("content-length", "")
        _bad(
            declared.isdigit() and int(declared) > cap,
            f"upload of {declared} bytes exceeds {cap}",
            413,
        )
        body = bytearray()
        async for chunk in request.stream():  # stop reading at the cap: never buffer a huge body
            body += chunk
            _bad(len(body) > cap, f"upload exceeds {cap} bytes", 413)
        return bytes(body)

    async def _decode_all(
        self, tokens: list[np.ndarray], steps: int, seeds: list[int]
    ) -> list[np.ndarray]:
        # One handle call per image: the model replica batches them with everyone else's.
        calls = [self.models.decode.remote(z, steps, s) for z, s in zip(tokens, seeds, strict=True)]
        return list(await asyncio.gather(*calls))

    # -- endpoints

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self.models.info.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001
            return _error(503, f"model replica not answering: {type(e).__name__}")
        if not info.get("ready"):
            return _error(503, "model not loaded yet")
        return JSONResponse({"status": "ok", "tokenizer_version": info["tokenizer"]["version"]})

    @api.get("/info")
    async def info(self) -> JSONResponse:
        info = await self._info()
        return JSONResponse({**info, "limits": to_dict(self.limits)})

    @api.post("/generate")
    async def generate(self, req: GenerateRequest) -> Response:
        info = await self._info()
        gen = info["generator"]
        _bad(gen is None, "no class-conditional generator configured (set model.generator)", 503)
        labels = req.label if isinstance(req.label, list) else [req.label] * (req.n or 1)
        _bad(
            isinstance(req.label, list) and req.n is not None and req.n != len(labels),
            f"n={req.n} disagrees with {len(labels)} labels",
        )
        self._n(len(labels))
        k = gen["num_classes"]
        for y in labels:
            _bad(
                not 0 <= y < k, f"label {y} is out of range: this generator has classes 0..{k - 1}"
            )
        steps, seed = self._steps(req.steps), self._seed(req.seed)
        scale = self._scale(req.cfg_scale, gen["cfg_scale"])
        tokens = await self.models.class_tokens.remote(labels, scale, steps, seed)
        images = await self._decode_all(list(tokens), steps, [seed + i for i in range(len(labels))])
        return _png_response(images, req.format, {"labels": labels, "steps": steps, "seed": seed})

    @api.post("/text-to-image")
    async def text_to_image(self, req: TextToImageRequest) -> Response:
        info = await self._info()
        gen = info["text_generator"]
        _bad(
            gen is None, "no text-conditioned generator configured (set model.text_generator)", 503
        )
        prompt = req.prompt.strip()
        _bad(not prompt, "prompt is empty")
        _bad(
            len(prompt) > self.limits.max_prompt_chars,
            f"prompt has {len(prompt)} characters; the limit is {self.limits.max_prompt_chars}",
        )
        n, steps, seed = self._n(req.n), self._steps(req.steps), self._seed(req.seed)
        scale = self._scale(req.cfg_scale, gen["cfg_scale"])
        tokens = await self.models.text_tokens.remote(prompt, n, scale, steps, seed)
        images = await self._decode_all(list(tokens), steps, [seed + i for i in range(n)])
        return _png_response(images, req.format, {"prompt": prompt, "steps": steps, "seed": seed})

    @api.post("/reconstruct")
    async def reconstruct(
        self, request: Request, steps: int | None = Query(None), seed: int = Query(0)
    ) -> Response:
        info = await self._info()
        steps, seed = self._steps(steps), self._seed(seed)
        image = self._image(await self._upload(request), info["tokenizer"]["image_size"])
        token = await self.models.encode.remote(image)
        (out,) = await self._decode_all([token], steps, [seed])
        return _png_response([out], "png", {})

    @api.post("/encode")
    async def encode(self, request: Request) -> JSONResponse:
        info = await self._info()
        image = self._image(await self._upload(request), info["tokenizer"]["image_size"])
        token = await self.models.encode.remote(image)
        return JSONResponse({"token": [float(v) for v in token], "dim": int(token.shape[0])})

    @api.post("/decode")
    async def decode(self, req: DecodeRequest) -> Response:
        info = await self._info()
        z = self._token(req.token, info["tokenizer"]["token_dim"])
        (out,) = await self._decode_all([z], self._steps(req.steps), [self._seed(req.seed)])
        return _png_response([out], "png", {})

    @api.post("/interpolate")
    async def interpolate(self, req: InterpolateRequest) -> Response:
        info = await self._info()
        tok = info["tokenizer"]
        n, steps, seed = self._n(req.n, low=2), self._steps(req.steps), self._seed(req.seed)
        ends = []
        for name, value in (("a", req.a), ("b", req.b)):
            if isinstance(value, list):
                ends.append(self._token(value, tok["token_dim"], name))
                continue
            _bad(
                len(value) > self.limits.max_upload_bytes * 4 // 3 + 4,
                f"{name} exceeds the upload limit",
                413,
            )
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPException(
                    400, f"{name} is neither a token (list of floats) nor base64 image data"
                ) from None
            ends.append(await self.models.encode.remote(self._image(data, tok["image_size"], name)))
        w = np.linspace(0, 1, n, dtype=np.float32)[:, None]
        tokens = list((1 - w) * ends[0][None] + w * ends[1][None])  # as Tokenizer.interpolate
        # One seed for the whole row: only the token changes from image to image.
        images = await self._decode_all(tokens, steps, [seed] * n)
        return _png_response(images, "png", {})


# ----------------------------------------------------------------------------- building / running


def _use_gpu(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def bind(cfg: ServeConfig) -> Any:
    """The Serve application (an unstarted graph: Api -> Models) for a filled config."""
    s = cfg.scaling
    _bad_cfg = [
        (s.max_batch_size < 1, "scaling.max_batch_size must be >= 1"),
        (s.min_replicas > s.max_replicas, "scaling.min_replicas must be <= scaling.max_replicas"),
        (
            cfg.limits.default_steps > cfg.limits.max_steps,
            "limits.default_steps exceeds limits.max_steps",
        ),
    ]
    for bad, msg in _bad_cfg:
        if bad:
            raise ValueError(msg)
    models = serve.deployment(Models).options(
        name="Models",
        ray_actor_options={"num_cpus": s.model_cpus, "num_gpus": 1 if _use_gpu(s.use_gpu) else 0},
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        },
        # A replica must accept a full batch (plus the next one queuing) to batch at all.
        max_ongoing_requests=max(2 * s.max_batch_size, int(s.target_ongoing_requests) + 1),
        user_config=to_dict(cfg.model),
    )
    ingress = Api.options(
        num_replicas=s.ingress_replicas, ray_actor_options={"num_cpus": s.ingress_cpus}
    )
    return ingress.bind(models.bind(to_dict(s)), to_dict(cfg.limits))


def build_app(args: dict[str, str] | None = None) -> Any:
    """`serve run pipelines.serve:build_app config=PRESET.yaml model.tokenizer=...` builder."""
    args = dict(args or {})
    preset = args.pop("config", None) or os.environ.get("REPTOK_SERVE_CONFIG") or None
    return bind(load_config(ServeConfig, preset, [f"{k}={v}" for k, v in args.items()]))


def __getattr__(name: str) -> Any:
    # `serve run pipelines.serve:app` without building at import time (tests import this module).
    if name == "app":
        return build_app()
    raise AttributeError(name)


def start(cfg: ServeConfig) -> str:
    """Start Serve's proxy on cfg.http (127.0.0.1 unless told otherwise) and deploy; -> base URL."""
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(bind(cfg), name=cfg.http.app_name, route_prefix=cfg.http.route_prefix, blocking=False)
    prefix = cfg.http.route_prefix.rstrip("/")
    return f"http://{cfg.http.host}:{cfg.http.port}{prefix}"


def main(argv: list[str] | None = None) -> None:
    from pipelines import common

    cfg = common.parse_cli(ServeConfig, argv, __doc__)
    if not cfg.model.tokenizer:
        raise SystemExit(
            "error: model.tokenizer is required (an export folder or models:/name@alias)"
        )
    common.init_ray()
    url = start(cfg)
    print(f"[serve] {url}/info  ·  {url}/docs  ·  Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        serve.delete(cfg.http.app_name)


if __name__ == "__main__":
    main()
