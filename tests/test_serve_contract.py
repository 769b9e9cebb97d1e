"""The Serve API's contract without Ray: the OpenAPI document (pipelines/serving/openapi.py)
declares every route the ingress has and every response it gives, and the request models that
validate requests say exactly what the document says. The live check is Schemathesis in
test_serve.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipelines.serving import api, openapi
from pipelines.serving.config import LimitSettings
from pipelines.serving.validation import ModelFacts, request_models

FACTS = ModelFacts(num_classes=10, text=True, token_dim=4, image_size=16)
LIMITS = LimitSettings(max_n=8, max_steps=20, default_steps=2, max_prompt_chars=12)


def _routes(routes):
    for r in routes:  # Serve's ingress wraps the class's routes in an included router
        if hasattr(r, "original_router"):
            yield from _routes(r.original_router.routes)
        else:
            yield r


def test_document_covers_every_route_and_response():
    doc = openapi.document(LIMITS, FACTS)
    routes = {
        (r.path, m.lower())
        for r in _routes(api.api.routes)
        if r.include_in_schema
        for m in r.methods - {"HEAD"}
    }
    declared = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert routes == declared
    schemas = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "200" in op["responses"], (path, method)
            if method == "post":  # every body can be malformed, too large, or the models absent
                assert {"413", "500", "503"} <= set(op["responses"]), path
            for status, response in op["responses"].items():
                assert response["content"], (path, status)
                if status != "200":
                    body = response["content"]["application/json"]["schema"]
                    assert body == {"$ref": "#/components/schemas/Error"}
    assert "image/png" in doc["paths"]["/generate"]["post"]["responses"]["200"]["content"]
    assert "404" in doc["paths"]["/text-to-image"]["post"]["responses"]  # not 503
    assert schemas["Error"]["required"] == ["error"]


def test_bounds_in_the_document_are_the_deployed_ones():
    doc = openapi.document(LIMITS, FACTS)
    s = doc["components"]["schemas"]
    one = s["GenerateRequest"]["properties"]
    assert one["label"]["maximum"] == 9 and one["label"]["minimum"] == 0
    assert one["n"]["anyOf"][0]["maximum"] == 8
    assert s["GenerateBatchRequest"]["properties"]["label"]["maxItems"] == 8
    assert "n" not in s["GenerateBatchRequest"]["properties"]
    assert s["DecodeRequest"]["properties"]["token"]["minItems"] == 4
    assert s["DecodeRequest"]["properties"]["token"]["maxItems"] == 4
    assert s["TextToImageRequest"]["properties"]["prompt"]["maxLength"] == 12
    assert s["InterpolateRequest"]["properties"]["n"]["minimum"] == 2
    other = openapi.document(LIMITS, ModelFacts(num_classes=3, token_dim=7))
    assert other["components"]["schemas"]["GenerateRequest"]["properties"]["label"]["maximum"] == 2
    assert openapi.document(LIMITS, FACTS, "/svc")["servers"] == [{"url": "/svc"}]


@pytest.mark.parametrize(
    "body",
    [
        b'{"label": 3}',
        b'{"label": 3.0, "n": 2.0, "steps": 20, "guidance_scale": 1}',  # JSON Schema integers
        b'{"label": [0, 9], "seed": 9223372036854775807, "format": "json"}',
    ],
)
def test_schema_valid_generate_requests_are_accepted(body):
    request_models(LIMITS, FACTS).generate.validate_json(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"label": "3"}',
        b'{"label": true}',
        b'{"label": 3.5}',
        b'{"label": 10}',
        b'{"label": [1, 2], "n": 2}',  # n belongs to the single-label form only
        b'{"label": []}',
        b'{"label": 1, "steps": 21}',
        b'{"label": 1, "colour": "red"}',
        b"{}",
        b"[]",
    ],
)
def test_schema_invalid_generate_requests_are_refused(body):
    with pytest.raises(ValidationError):
        request_models(LIMITS, FACTS).generate.validate_json(body)


def test_other_request_models_follow_the_document():
    m = request_models(LIMITS, FACTS)
    m.text_to_image.validate_json(b'{"prompt": " a boot "}')
    for bad in (b'{"prompt": "   "}', b'{"prompt": "' + b"x" * 13 + b'"}'):
        with pytest.raises(ValidationError):
            m.text_to_image.validate_json(bad)
    m.decode.validate_json(b'{"token": [1, 2.5, -3, 0]}')
    with pytest.raises(ValidationError):
        m.decode.validate_json(b'{"token": [1, 2, 3]}')
    m.interpolate.validate_json(b'{"a": "aGVsbG8=", "b": [0, 0, 0, 0], "n": 2}')
    assert m.reconstruct_query.model_validate({"steps": "3"}).steps == 3
    with pytest.raises(ValidationError):
        m.reconstruct_query.model_validate({"steps": "0"})
