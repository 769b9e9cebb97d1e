"""The HTTP ingress: a FastAPI app wrapped as the `Api` deployment, in front of `Models`.

It parses and checks every request (validation.py), so bad input gets a 4xx JSON error
({"error": "...", "detail": ...}) before it reaches a model; it makes one `decode` call per
image, which the model replicas batch with everyone else's, and encodes the PNGs itself.
"""

# No `from __future__ import annotations`: FastAPI must see the request models as real classes
# (Serve's class-based ingress re-wraps the methods, and string annotations then fail to resolve).
import asyncio
import base64
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve

from pipelines.serving.config import LimitSettings
from pipelines.serving.validation import (
    Checks,
    DecodeRequest,
    GenerateRequest,
    InterpolateRequest,
    TextToImageRequest,
    bad,
)
from reptok_core.config import from_dict, to_dict
from reptok_core.images import encode_image

log = logging.getLogger("ray.serve")

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
        self.check = Checks(self.limits)

    # -- shared steps

    async def _info(self) -> dict[str, Any]:
        info = await self.models.info.remote()
        if not info.get("ready"):
            raise HTTPException(503, "model not loaded yet")
        return info

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
        bad(gen is None, "no class-conditional generator configured (set model.generator)", 503)
        labels = req.label if isinstance(req.label, list) else [req.label] * (req.n or 1)
        bad(
            isinstance(req.label, list) and req.n is not None and req.n != len(labels),
            f"n={req.n} disagrees with {len(labels)} labels",
        )
        self.check.n(len(labels))
        k = gen["num_classes"]
        for y in labels:
            bad(not 0 <= y < k, f"label {y} is out of range: this generator has classes 0..{k - 1}")
        steps, seed = self.check.steps(req.steps), self.check.seed(req.seed)
        scale = self.check.scale(req.cfg_scale, gen["cfg_scale"])
        tokens = await self.models.class_tokens.remote(labels, scale, steps, seed)
        images = await self._decode_all(list(tokens), steps, [seed + i for i in range(len(labels))])
        return _png_response(images, req.format, {"labels": labels, "steps": steps, "seed": seed})

    @api.post("/text-to-image")
    async def text_to_image(self, req: TextToImageRequest) -> Response:
        info = await self._info()
        gen = info["text_generator"]
        bad(gen is None, "no text-conditioned generator configured (set model.text_generator)", 503)
        c = self.check
        prompt = c.prompt(req.prompt)
        n, steps, seed = c.n(req.n), c.steps(req.steps), c.seed(req.seed)
        scale = c.scale(req.cfg_scale, gen["cfg_scale"])
        tokens = await self.models.text_tokens.remote(prompt, n, scale, steps, seed)
        images = await self._decode_all(list(tokens), steps, [seed + i for i in range(n)])
        return _png_response(images, req.format, {"prompt": prompt, "steps": steps, "seed": seed})

    @api.post("/reconstruct")
    async def reconstruct(
        self, request: Request, steps: int | None = Query(None), seed: int = Query(0)
    ) -> Response:
        info = await self._info()
        steps, seed = self.check.steps(steps), self.check.seed(seed)
        image = self.check.image(await self.check.upload(request), info["tokenizer"]["image_size"])
        token = await self.models.encode.remote(image)
        (out,) = await self._decode_all([token], steps, [seed])
        return _png_response([out], "png", {})

    @api.post("/encode")
    async def encode(self, request: Request) -> JSONResponse:
        info = await self._info()
        image = self.check.image(await self.check.upload(request), info["tokenizer"]["image_size"])
        token = await self.models.encode.remote(image)
        return JSONResponse({"token": [float(v) for v in token], "dim": int(token.shape[0])})

    @api.post("/decode")
    async def decode(self, req: DecodeRequest) -> Response:
        info = await self._info()
        c = self.check
        z = c.token(req.token, info["tokenizer"]["token_dim"])
        (out,) = await self._decode_all([z], c.steps(req.steps), [c.seed(req.seed)])
        return _png_response([out], "png", {})

    @api.post("/interpolate")
    async def interpolate(self, req: InterpolateRequest) -> Response:
        info = await self._info()
        tok, c = info["tokenizer"], self.check
        n, steps, seed = c.n(req.n, low=2), c.steps(req.steps), c.seed(req.seed)
        ends = []
        for name, value in (("a", req.a), ("b", req.b)):
            if isinstance(value, list):
                ends.append(c.token(value, tok["token_dim"], name))
                continue
            image = c.image(c.base64_image(value, name), tok["image_size"], name)
            ends.append(await self.models.encode.remote(image))
        w = np.linspace(0, 1, n, dtype=np.float32)[:, None]
        tokens = list((1 - w) * ends[0][None] + w * ends[1][None])  # as Tokenizer.interpolate
        # One seed for the whole row: only the token changes from image to image.
        images = await self._decode_all(tokens, steps, [seed] * n)
        return _png_response(images, "png", {})
