"""The service's OpenAPI document, built from the same request models that validate requests
(validation.py) and declaring every response the ingress can give: the PNG and JSON bodies, each
error status with its JSON body, and the headers. It is rebuilt for the limits and the loaded
models, so label ranges and token widths in it are the deployed ones.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import TypeAdapter

from pipelines.serving.config import LimitSettings
from pipelines.serving.validation import ModelFacts, request_models

VERSION = "0.1.0"

_PROBLEM = {
    "type": "object",
    "required": ["field", "problem"],
    "properties": {
        "field": {"type": "string", "description": "dotted path of the offending value"},
        "problem": {"type": "string"},
    },
    "additionalProperties": False,
}
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what was wrong, in words"},
        "detail": {"type": "array", "items": {"$ref": "#/components/schemas/Problem"}},
    },
    "additionalProperties": False,
}

_WHY = {
    400: "The body is not JSON, or the bytes are not a decodable image (the reason is named).",
    404: "This deployment has no model for this endpoint (see `model.*` in the service config).",
    413: "The upload or body is larger than the service accepts (bytes or pixels).",
    422: "A value is missing, of the wrong type, out of range, or not a field of the request.",
    500: "The request was valid but serving it failed; the error names the exception.",
    503: "The model replicas have not loaded the models yet, or do not answer; retry.",
}


def _error(status: int) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Error"}
    return {"description": _WHY[status], "content": {"application/json": {"schema": ref}}}


def _png(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {
            "X-Images": {
                "description": "how many images the PNG holds, side by side",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    }


def _images(extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["images", *extra],
        "properties": {
            "images": {
                "type": "array",
                "items": {"type": "string", "format": "byte", "description": "base64 PNG"},
            },
            **extra,
        },
        "additionalProperties": False,
    }


def _json_body(ref: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _image_body() -> dict[str, Any]:
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "required": True,
        "description": "the image file's bytes (PNG, JPEG or WebP; the format is sniffed)",
        "content": {"image/png": binary, "image/jpeg": binary, "image/webp": binary},
    }


def _operation(summary: str, ok: dict[str, Any], errors: list[int], **more: Any) -> dict:
    responses = {"200": ok, **{str(s): _error(s) for s in errors}}
    return {"post": {"summary": summary, **more, "responses": responses}}


def document(limits: LimitSettings, facts: ModelFacts, root_path: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document of the service with these limits and loaded models."""
    models = request_models(limits, facts)
    schemas: dict[str, Any] = {"Error": _ERROR, "Problem": _PROBLEM}
    ref_template = "#/components/schemas/{model}"

    def add(name: str, adapter: TypeAdapter) -> None:
        schema = adapter.json_schema(ref_template=ref_template)
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema

    add("Generate", models.generate)
    add("TextToImageRequest", models.text_to_image)
    add("DecodeRequest", models.decode)
    add("InterpolateRequest", models.interpolate)
    query = models.reconstruct_query.model_json_schema()["properties"]
    number = {"type": "number"}
    pictures = "a PNG at the model's resolution (a row of n images for n > 1), or JSON"
    json_or_png = {
        "description": pictures,
        **{k: v for k, v in _png("").items() if k == "headers"},
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": _images(
                    {
                        "labels": {"type": "array", "items": {"type": "integer"}},
                        "steps": {"type": "integer"},
                        "seed": {"type": "integer"},
                    }
                )
            },
        },
    }
    text_json_or_png = copy.deepcopy(json_or_png)
    text_json_or_png["content"]["application/json"]["schema"] = _images(
        {"prompt": {"type": "string"}, "steps": {"type": "integer"}, "seed": {"type": "integer"}}
    )
    paths = {
        "/generate": _operation(
            "Class-conditional samples",
            json_or_png,
            [400, 404, 413, 422, 500, 503],
            requestBody=_json_body("Generate"),
            description="404 when the deployment has no class-conditional generator.",
        ),
        "/text-to-image": _operation(
            "Text-conditioned samples",
            text_json_or_png,
            [400, 404, 413, 422, 500, 503],
            requestBody=_json_body("TextToImageRequest"),
            description="404 when the deployment has no text-conditioned generator.",
        ),
        "/reconstruct": _operation(
            "Encode an image to its token and decode it again",
            _png("the reconstruction, a PNG at the model's resolution"),
            [400, 413, 422, 500, 503],
            requestBody=_image_body(),
            parameters=[
                {"name": name, "in": "query", "required": False, "schema": schema}
                for name, schema in query.items()
            ],
        ),
        "/encode": _operation(
            "An image's token",
            {
                "description": "the token",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["token", "dim"],
                            "properties": {
                                "token": {"type": "array", "items": number},
                                "dim": {"type": "integer", "minimum": 1},
                            },
                            "additionalProperties": False,
                        }
                    }
                },
            },
            [400, 413, 500, 503],
            requestBody=_image_body(),
        ),
        "/decode": _operation(
            "A token's image",
            _png("the decoded image, a PNG at the model's resolution"),
            [400, 413, 422, 500, 503],
            requestBody=_json_body("DecodeRequest"),
        ),
        "/interpolate": _operation(
            "Images along the straight line between two tokens",
            _png("a row of n images, a to b"),
            [400, 413, 422, 500, 503],
            requestBody=_json_body("InterpolateRequest"),
        ),
        "/healthz": {
            "get": {
                "summary": "Liveness and readiness",
                "responses": {
                    "200": {
                        "description": "the models are loaded",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["status", "tokenizer_version"],
                                    "properties": {
                                        "status": {"const": "ok"},
                                        "tokenizer_version": {"type": "string"},
                                    },
                                    "additionalProperties": False,
                                }
                            }
                        },
                    },
                    "503": _error(503),
                },
            }
        },
        "/info": {
            "get": {
                "summary": "Loaded models, their versions, the limits and batching counters",
                "responses": {
                    "200": {
                        "description": "what the service runs",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["ready", "tokenizer", "limits"],
                                }
                            }
                        },
                    },
                    "503": _error(503),
                },
            }
        },
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "RepTok",
            "version": VERSION,
            "description": (
                "One-token image tokenizer: sample, encode, decode. Errors are JSON "
                '{"error": "...", "detail": [...]} with the status codes each operation lists.'
            ),
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if root_path:
        doc["servers"] = [{"url": root_path}]
    return doc
