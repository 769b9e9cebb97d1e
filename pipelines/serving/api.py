"""The HTTP ingress: a FastAPI app wrapped as the `Api` deployment, in front of `Models`.

It parses and checks every request against the request models (validation.py), so bad input
gets a 4xx JSON error ({"error": "...", "detail": [...]}) before it reaches a model; it makes
one `decode` call per image, which the model replicas batch with everyone else's, and encodes
the PNGs itself. It also serves the OpenAPI document (openapi.py) at /openapi.json and /docs:
built from the same models, for the deployed limits and the loaded models.
"""

# No `from __future__ import annotations`: FastAPI resolves the endpoints' annotations.
import asyncio
import base64
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import TypeAdapter, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.serving import openapi
from pipelines.serving.config import LimitSettings
from pipelines.serving.validation import Checks, ModelFacts, RequestModels, request_models
from reptok_core.config import from_dict, to_dict
from reptok_core.images import encode_image

log = logging.getLogger("ray.serve")

# The OpenAPI document is served by the Api class itself (openapi.py): it depends on the limits
# and on the loaded models, which FastAPI's static one cannot know.
api = FastAPI(title="RepTok", openapi_url=None, docs_url=None, redoc_url=None)

_TAGS = ("single", "batch")  # union branch names pydantic puts in error locations


class Rejected(Exception):
    """A request refused before it reaches a model: answered as the documented JSON error."""

    def __init__(self, status: int, error: str, detail: list[dict[str, str]] | None = None):
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


def _error(status: int, error: str, detail: Any = None, headers: Any = None) -> JSONResponse:
    body = {"error": error} if detail is None else {"error": error, "detail": detail}
    return JSONResponse(status_code=status, content=body, headers=headers)


def _problems(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {
            "field": ".".join(str(p) for p in e["loc"] if p not in _TAGS) or "body",
            "problem": e["msg"],
        }
        for e in exc.errors()
    ]


@api.exception_handler(Rejected)
async def _rejected(_: Request, exc: Rejected) -> JSONResponse:
    return _error(exc.status, exc.error, exc.detail)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Keeps the headers: a 405 must say which methods the path has (Allow).
    return _error(exc.status_code, str(exc.detail), headers=exc.headers)


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
        self._request_models: dict[ModelFacts, RequestModels] = {}

    # -- shared steps

    async def _info(self) -> dict[str, Any]:
        info = await self.models.info.remote()
        if not info.get("ready"):
            raise HTTPException(503, "model not loaded yet")
        return info

    def _models(self, info: dict[str, Any]) -> RequestModels:
        facts = ModelFacts.of(info)
        if facts not in self._request_models:  # one set per loaded model generation
            self._request_models[facts] = request_models(self.limits, facts)
        return self._request_models[facts]

    async def _parse(self, request: Request, adapter: TypeAdapter) -> Any:
        raw = await self.check.body(request, self.check.json_cap())
        try:
            return adapter.validate_json(raw)
        except ValidationError as e:
            if any(err["type"] == "json_invalid" for err in e.errors()):
                raise Rejected(400, "request body is not valid JSON", _problems(e)) from None
            raise Rejected(422, "invalid request", _problems(e)) from None

    def _steps(self, steps: int | None) -> int:
        return self.limits.default_steps if steps is None else steps

    async def _decode_all(
        self, tokens: list[np.ndarray], steps: int, seeds: list[int]
    ) -> list[np.ndarray]:
        # One handle call per image: the model replica batches them with everyone else's.
        calls = [self.models.decode.remote(z, steps, s) for z, s in zip(tokens, seeds, strict=True)]
        return list(await asyncio.gather(*calls))

    # -- the contract

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self, request: Request) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self.models.info.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - describe what is known without the models
            info = {}
        root = request.scope.get("root_path", "")
        return JSONResponse(openapi.document(self.limits, ModelFacts.of(info), root))

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="RepTok API")

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
    async def generate(self, request: Request) -> Response:
        info = await self._info()
        gen = info["generator"]
        if gen is None:
            raise HTTPException(404, "no class-conditional generator configured (model.generator)")
        req = await self._parse(request, self._models(info).generate)
        labels = req.label if isinstance(req.label, list) else [req.label] * (req.n or 1)
        steps, seed = self._steps(req.steps), req.seed
        scale = gen["guidance_scale"] if req.guidance_scale is None else req.guidance_scale
        tokens = await self.models.class_tokens.remote(labels, scale, steps, seed)
        images = await self._decode_all(list(tokens), steps, [seed + i for i in range(len(labels))])
        return _png_response(images, req.format, {"labels": labels, "steps": steps, "seed": seed})

    @api.post("/text-to-image")
    async def text_to_image(self, request: Request) -> Response:
        info = await self._info()
        gen = info["text_generator"]
        if gen is None:
            raise HTTPException(
                404, "no text-conditioned generator configured (model.text_generator)"
            )
        req = await self._parse(request, self._models(info).text_to_image)
        prompt, n, steps, seed = req.prompt.strip(), req.n, self._steps(req.steps), req.seed
        scale = gen["guidance_scale"] if req.guidance_scale is None else req.guidance_scale
        tokens = await self.models.text_tokens.remote(prompt, n, scale, steps, seed)
        images = await self._decode_all(list(tokens), steps, [seed + i for i in range(n)])
        return _png_response(images, req.format, {"prompt": prompt, "steps": steps, "seed": seed})

    @api.post("/reconstruct")
    async def reconstruct(self, request: Request) -> Response:
        info = await self._info()
        try:
            query = self._models(info).reconstruct_query.model_validate(dict(request.query_params))
        except ValidationError as e:
            raise Rejected(422, "invalid query", _problems(e)) from None
        upload = await self.check.body(request, self.limits.max_upload_bytes)
        image = self.check.image(upload, info["tokenizer"]["image_size"])
        token = await self.models.encode.remote(image)
        (out,) = await self._decode_all([token], self._steps(query.steps), [query.seed])
        return _png_response([out], "png", {})

    @api.post("/encode")
    async def encode(self, request: Request) -> JSONResponse:
        info = await self._info()
        upload = await self.check.body(request, self.limits.max_upload_bytes)
        image = self.check.image(upload, info["tokenizer"]["image_size"])
        token = await self.models.encode.remote(image)
        return JSONResponse({"token": [float(v) for v in token], "dim": int(token.shape[0])})

    @api.post("/decode")
    async def decode(self, request: Request) -> Response:
        info = await self._info()
        req = await self._parse(request, self._models(info).decode)
        z = np.asarray(req.token, dtype=np.float32)
        (out,) = await self._decode_all([z], self._steps(req.steps), [req.seed])
        return _png_response([out], "png", {})

    @api.post("/interpolate")
    async def interpolate(self, request: Request) -> Response:
        info = await self._info()
        req = await self._parse(request, self._models(info).interpolate)
        size = info["tokenizer"]["image_size"]
        ends = []
        for name, value in (("a", req.a), ("b", req.b)):
            if isinstance(value, list):
                ends.append(np.asarray(value, dtype=np.float32))
                continue
            image = self.check.image(self.check.base64_image(value, name), size, name)
            ends.append(await self.models.encode.remote(image))
        w = np.linspace(0, 1, req.n, dtype=np.float32)[:, None]
        tokens = list((1 - w) * ends[0][None] + w * ends[1][None])  # as Tokenizer.interpolate
        # One seed for the whole row: only the token changes from image to image.
        images = await self._decode_all(tokens, self._steps(req.steps), [req.seed] * req.n)
        return _png_response(images, "png", {})
