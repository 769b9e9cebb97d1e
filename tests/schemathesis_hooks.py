"""Schemathesis hooks for the Serve API contract test (SCHEMATHESIS_HOOKS=schemathesis_hooks).

JSON Schema can say "bytes" but not "bytes that decode as an image": the service's document
declares its image uploads as `image/png`, `image/jpeg` and `image/webp` bodies and its base64
images with the `image-base64` string format (pipelines/serving/openapi.py). These strategies
are what those words mean: real image files of random sizes and pixels, so the generated valid
requests are valid, and everything else Schemathesis generates comes from the schema alone.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


@st.composite
def image_file(draw, fmt: str) -> bytes:
    height, width = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
for media_type, fmt in FORMATS.items():
    schemathesis.openapi.media_type(media_type, image_file(fmt))
schemathesis.openapi.format(
    "image-base64",
    st.sampled_from(list(FORMATS.values()))
    .flatmap(image_file)
    .map(lambda data: base64.b64encode(data).decode()),
)
