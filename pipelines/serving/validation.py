"""What a valid request is: request models built from the deployed limits and the loaded models,
and the checks on raw bytes that JSON Schema cannot express.

The models are the contract. The same classes validate every request and make the OpenAPI
document (openapi.py), so a request the document calls valid is accepted and one it calls
invalid is refused: 422 for a value out of range or of the wrong type, 400 for a body that is
not JSON or bytes that are not an image, 413 for anything too large. Their bounds depend on the
`limits` section of ServeConfig and on the loaded models (classes, token width), which is why
they are built per (limits, ModelFacts) rather than declared once.
"""

# No `from __future__ import annotations`: pydantic must see real types in the models.
import base64
import binascii
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import HTTPException, Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    create_model,
    model_validator,
)

from pipelines.serving.config import LimitSettings
from reptok_core.images import ImageRejected, prepare_bytes

MAX_SEED = 2**63 - 1
MAX_TOKEN_VALUE = 1e4
# A custom OpenAPI string format: base64 of an encoded image file (PNG, JPEG or WebP).
IMAGE_BASE64 = "image-base64"


@dataclass(frozen=True)
class ModelFacts:
    """What the loaded models decide about valid requests."""

    num_classes: int | None = None  # the class-conditional generator's classes; None = none
    text: bool = False  # a text-conditioned generator is loaded
    token_dim: int | None = None  # the tokenizer's token width; None = not loaded yet
    image_size: int | None = None

    @classmethod
    def of(cls, info: dict[str, Any]) -> "ModelFacts":
        if not info.get("ready"):
            return cls()
        gen, tok = info.get("generator"), info["tokenizer"]
        return cls(
            num_classes=gen["num_classes"] if gen else None,
            text=info.get("text_generator") is not None,
            token_dim=tok["token_dim"],
            image_size=tok["image_size"],
        )


def _integral(value: Any) -> Any:
    """Integral floats -> ints, through lists and objects: JSON Schema's "integer" includes 3.0,
    strict pydantic does not (and a float field takes an int as it is)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


class _Strict(BaseModel):
    # strict: "3" is not an int and true not a number; extra="forbid": typos in field names
    # fail. Python's regex engine, so the document's patterns mean what clients' tools read.
    model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re")

    @model_validator(mode="before")
    @classmethod
    def _integers(cls, data: Any) -> Any:
        return _integral(data)


def integer(**constraints: Any) -> Any:
    return Annotated[int, Field(**constraints)]


@dataclass(frozen=True)
class RequestModels:
    """One set of request models: each JSON body's adapter (`validate_json`, `json_schema`)
    and the query of /reconstruct."""

    generate: TypeAdapter
    text_to_image: TypeAdapter
    decode: TypeAdapter
    interpolate: TypeAdapter
    reconstruct_query: type[BaseModel]


def request_models(limits: LimitSettings, facts: ModelFacts) -> RequestModels:
    """The request models for these limits and models."""
    steps = integer(ge=1, le=limits.max_steps, description=f"default {limits.default_steps}")
    seed = integer(ge=0, le=MAX_SEED, description="sampling seed")
    scale = Annotated[
        float,
        Field(
            ge=0,
            le=limits.max_guidance_scale,
            description="classifier-free guidance scale; default: the generator's own",
        ),
    ]
    fmt = Annotated[
        Literal["png", "json"],
        Field(description="png: one PNG (a row for n > 1); json: base64 PNGs"),
    ]
    top = None if facts.num_classes is None else facts.num_classes - 1
    label = integer(ge=0, le=top, description="class id")
    common = {
        "guidance_scale": (scale | None, None),
        "steps": (steps | None, None),
        "seed": (seed, 0),
        "format": (fmt, "png"),
    }
    one = create_model(
        "GenerateRequest",
        __base__=_Strict,
        label=(label, ...),
        n=(integer(ge=1, le=limits.max_n) | None, None),
        **common,
    )
    many = create_model(
        "GenerateBatchRequest",
        __base__=_Strict,
        label=(
            Annotated[list[label], Field(min_length=1, max_length=limits.max_n)],
            Field(..., description="one image per label"),
        ),
        **common,
    )

    def kind(body: Any) -> str:
        many_labels = isinstance(body, dict) and isinstance(body.get("label"), list)
        return "batch" if many_labels else "single"

    generate = TypeAdapter(
        Annotated[
            Annotated[one, Tag("single")] | Annotated[many, Tag("batch")], Discriminator(kind)
        ]
    )
    text = create_model(
        "TextToImageRequest",
        __base__=_Strict,
        prompt=(
            Annotated[str, Field(pattern=r"\S", max_length=limits.max_prompt_chars)],
            Field(..., description="what to draw (not only white space)"),
        ),
        n=(integer(ge=1, le=limits.max_n), 1),
        **common,
    )
    value = Annotated[float, Field(ge=-MAX_TOKEN_VALUE, le=MAX_TOKEN_VALUE)]
    dim = facts.token_dim
    token = Annotated[
        list[value],
        Field(
            min_length=dim or 1,
            max_length=dim,
            description="a token of this tokenizer (from /encode)",
        ),
    ]
    image64 = Annotated[
        str,
        Field(
            description=(
                "base64 of a PNG, JPEG or WebP file of at most "
                f"{limits.max_upload_bytes} bytes and {limits.max_pixels} pixels"
            ),
            json_schema_extra={"format": IMAGE_BASE64},
        ),
    ]
    sampling = {"steps": (steps | None, None), "seed": (seed, 0)}
    decode = create_model("DecodeRequest", __base__=_Strict, token=(token, ...), **sampling)
    interpolate = create_model(
        "InterpolateRequest",
        __base__=_Strict,
        a=(image64 | token, Field(..., description="first end: an image or a token")),
        b=(image64 | token, Field(..., description="last end: an image or a token")),
        n=(integer(ge=2, le=limits.max_n), 8),
        **sampling,
    )
    query = create_model(
        "ReconstructQuery",
        __config__=ConfigDict(extra="ignore"),  # query strings: "3" is an int here
        **sampling,
    )
    return RequestModels(
        generate, TypeAdapter(text), TypeAdapter(decode), TypeAdapter(interpolate), query
    )


def bad(cond: bool, message: str, status: int = 422) -> None:
    if cond:
        raise HTTPException(status_code=status, detail=message)


class Checks:
    """Checks on raw bytes (uploads, base64 images) against one set of limits."""

    def __init__(self, limits: LimitSettings):
        self.limits = limits

    def json_cap(self) -> int:
        """Largest JSON body: two base64 images at the upload limit, plus room for the rest."""
        return 2 * (self.limits.max_upload_bytes * 4 // 3 + 4) + 1_000_000

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

    async def body(self, request: Request, cap: int) -> bytes:
        """The request body, refused with 413 as soon as it passes `cap` bytes."""
        declared = request.headers.get("content-length", "")
        bad(
            declared.isdigit() and int(declared) > cap,
            f"body of {declared} bytes exceeds {cap}",
            413,
        )
        body = bytearray()
        async for chunk in request.stream():  # stop reading at the cap: never buffer a huge body
            body += chunk
            bad(len(body) > cap, f"body exceeds {cap} bytes", 413)
        return bytes(body)

    def base64_image(self, value: str, name: str) -> bytes:
        """An image sent inside JSON as base64 -> its bytes (still to be checked by `image`)."""
        bad(
            len(value) > self.limits.max_upload_bytes * 4 // 3 + 4,
            f"{name} exceeds the upload limit of {self.limits.max_upload_bytes} bytes",
            413,
        )
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(
                400, f"{name} is neither a token (list of numbers) nor base64 image data"
            ) from None
