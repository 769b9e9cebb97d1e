"""What a valid request is: the JSON request models and the checks on every value.

Each check raises HTTPException (422 for a value out of range, 400 for undecodable input, 413
for anything too large), which the ingress answers as a JSON error; nothing that fails here
reaches a model replica. The limits come from the `limits` section of ServeConfig.
"""

# No `from __future__ import annotations`: FastAPI must see the request models as real classes.
import base64
import binascii
import math
from typing import Literal

import numpy as np
from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict

from pipelines.serving.config import LimitSettings
from reptok_core.images import ImageRejected, prepare_bytes


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


def bad(cond: bool, message: str, status: int = 422) -> None:
    if cond:
        raise HTTPException(status_code=status, detail=message)


class Checks:
    """Request checks against one set of limits; each returns the value to use."""

    def __init__(self, limits: LimitSettings):
        self.limits = limits

    def steps(self, steps: int | None) -> int:
        steps = self.limits.default_steps if steps is None else steps
        bad(
            not 1 <= steps <= self.limits.max_steps,
            f"steps={steps} must be in [1, {self.limits.max_steps}]",
        )
        return steps

    def seed(self, seed: int) -> int:
        bad(not 0 <= seed < 2**63, f"seed={seed} must be in [0, 2**63)")
        return seed

    def n(self, n: int, low: int = 1) -> int:
        bad(not low <= n <= self.limits.max_n, f"n={n} must be in [{low}, {self.limits.max_n}]")
        return n

    def scale(self, scale: float | None, default: float) -> float:
        scale = default if scale is None else scale
        bad(
            not (math.isfinite(scale) and 0 <= scale <= self.limits.max_cfg_scale),
            f"cfg_scale={scale} must be in [0, {self.limits.max_cfg_scale}]",
        )
        return scale

    def prompt(self, prompt: str) -> str:
        prompt = prompt.strip()
        bad(not prompt, "prompt is empty")
        bad(
            len(prompt) > self.limits.max_prompt_chars,
            f"prompt has {len(prompt)} characters; the limit is {self.limits.max_prompt_chars}",
        )
        return prompt

    def token(self, token: list[float], dim: int, name: str = "token") -> np.ndarray:
        bad(
            len(token) != dim, f"{name} has {len(token)} values; this tokenizer's tokens have {dim}"
        )
        z = np.asarray(token, dtype=np.float32)
        bad(
            not np.isfinite(z).all() or np.abs(z).max() > 1e4,
            f"{name} values must be finite and |v| <= 1e4",
        )
        return z

    def image(self, data: bytes, size: int, name: str = "image") -> np.ndarray:
        bad(not data, f"{name} is empty: send the image file's bytes", 400)
        bad(
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

    async def upload(self, request: Request) -> bytes:
        cap = self.limits.max_upload_bytes
        declared = request.headers.get("content-length", "")
        bad(
            declared.isdigit() and int(declared) > cap,
            f"upload of {declared} bytes exceeds {cap}",
            413,
        )
        body = bytearray()
        async for chunk in request.stream():  # stop reading at the cap: never buffer a huge body
            body += chunk
            bad(len(body) > cap, f"upload exceeds {cap} bytes", 413)
        return bytes(body)

    def base64_image(self, value: str, name: str) -> bytes:
        """An image sent inside JSON as base64 -> its bytes (still to be checked by `image`)."""
        bad(
            len(value) > self.limits.max_upload_bytes * 4 // 3 + 4,
            f"{name} exceeds the upload limit",
            413,
        )
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(
                400, f"{name} is neither a token (list of floats) nor base64 image data"
            ) from None
