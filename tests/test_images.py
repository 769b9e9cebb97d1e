"""reptok_core.images: decode safety, RGB conversion, ADM crop, encoding, ids (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from reptok_core.images import (
    ImageRejected,
    center_crop_resize,
    decode_rgb,
    encode_image,
    prepare_bytes,
    stable_id,
    to_rgb,
)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(ImageRejected) as info:
        prepare_bytes(data, 32, **kw)
    return info.value.reason


# ------------------------------------------------------------------ bad input -> reasons


def test_bad_inputs_are_rejected_with_their_reason():
    png = _save(Image.fromarray(_noise(120, 160)), "PNG")
    jpg = _save(Image.fromarray(_noise(120, 160)), "JPEG")
    assert _reason(b"") == "empty_file"
    assert _reason(b"<html>404 not found</html>") == "not_an_image"
    assert _reason(png[: len(png) // 2]) == "truncated"
    assert _reason(jpg[: len(jpg) // 2]) == "truncated"
    corrupt = bytearray(png)
    corrupt[corrupt.find(b"IDAT") + 50] ^= 0xFF  # flips a compressed byte: zlib stream breaks
    assert _reason(bytes(corrupt)) == "corrupt"
    assert _reason(png, min_size=121) == "too_small"
    sliver = _save(Image.fromarray(_noise(2, 4000)), "PNG")
    assert _reason(sliver, max_aspect=4.0) == "extreme_aspect_ratio"
    assert _reason(_save(Image.fromarray(_noise(30, 121)), "PNG"), max_aspect=4.0) == (
        "extreme_aspect_ratio"
    )
    # 25 Mpx of one grey level compresses to ~35 KB: a small file that would decode huge.
    bomb = _save(Image.new("L", (5000, 5000), 7), "PNG")
    assert len(bomb) < 100_000
    assert _reason(bomb, max_pixels=1_000_000) == "too_many_pixels"


def test_pillow_bomb_guard_maps_to_too_many_pixels(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _save(Image.new("RGB", (100, 100)), "PNG")  # 10,000 px > 2 x 1000
    assert _reason(data, max_pixels=10**9) == "too_many_pixels"


def test_good_image_at_min_size_is_kept():
    png = _save(Image.fromarray(_noise(120, 160)), "PNG")
    out = prepare_bytes(png, 32, min_size=120)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    wide = _save(Image.fromarray(_noise(30, 120)), "PNG")  # exactly 4:1
    assert prepare_bytes(wide, 32, max_aspect=4.0).shape == (32, 32, 3)


def test_prepare_defaults_refuse_degenerate_shapes():
    from reptok_core.config import ConfigError, load_config
    from reptok_core.prepare import PrepareConfig, validate

    cfg = load_config(PrepareConfig)
    assert cfg.image.min_size >= 8 and 1 < cfg.image.max_aspect_ratio <= 8
    with pytest.raises(ConfigError, match="max_aspect_ratio"):
        validate(
            load_config(PrepareConfig, None, ["source.kind=emoji", "image.max_aspect_ratio=0.5"])
        )


# ------------------------------------------------------------------ modes -> RGB


def test_rgba_is_composited_on_white():
    arr = np.zeros((40, 40, 4), np.uint8)
    arr[..., 0] = 255  # red ...
    arr[:, :20, 3] = 0  # ... transparent on the left half
    arr[:, 20:, 3] = 255
    out = prepare_bytes(_save(Image.fromarray(arr, "RGBA"), "PNG"), 40)
    assert (out[:, :18] == 255).all()  # white where transparent
    assert (out[:, 22:] == [255, 0, 0]).all()


def test_palette_with_transparency_and_grey_modes():
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.info["transparency"] = 0
    pal.putpixel((0, 0), 0)
    rgb = np.asarray(to_rgb(pal))
    assert tuple(rgb[5, 5]) == (0, 0, 255) and tuple(rgb[0, 0]) == (255, 255, 255)
    grey = np.asarray(to_rgb(Image.new("L", (4, 4), 77)))
    assert grey.shape == (4, 4, 3) and (grey == 77).all()
    la = Image.new("LA", (4, 4), (0, 0))
    assert (np.asarray(to_rgb(la)) == 255).all()


def test_16bit_grey_is_rescaled_not_clipped():
    arr = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    data = _save(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(to_rgb(Image.open(io.BytesIO(data))))
    assert out[0, :, 0].tolist() == [0, 128, 255, 4]  # 65535/257 = 255, 1000/257 = 3.9


def test_cmyk_converts_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta+yellow = red
    out = prepare_bytes(_save(cmyk, "TIFF"), 8)
    assert (out == [255, 0, 0]).all()
    out_jpg = prepare_bytes(_save(cmyk, "JPEG", quality=95), 8)  # CMYK JPEG (Adobe inverted)
    assert out_jpg[..., 0].min() > 230 and out_jpg[..., 1:].max() < 25


def test_exif_orientation_is_applied():
    # Stored landscape: left half red, right half blue. Orientation 6 = "rotate 90 CW to view".
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = [255, 0, 0]
    arr[:, 40:] = [0, 0, 255]
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(Image.fromarray(arr), "JPEG", quality=95, exif=exif)
    img = Image.open(io.BytesIO(data))
    from reptok_core.images import exif_upright

    up = np.asarray(exif_upright(img))
    assert up.shape == (80, 40, 3)  # now portrait
    assert up[5, 20, 0] > 200 and up[5, 20, 2] < 60  # top is red
    assert up[75, 20, 2] > 200 and up[75, 20, 0] < 60  # bottom is blue


# ------------------------------------------------------------------ ADM crop


def test_center_crop_takes_the_middle_of_the_long_side():
    # 600x200, thirds red/green/blue: the centred square is exactly the green third.
    arr = np.zeros((200, 600, 3), np.uint8)
    arr[:, :200] = [255, 0, 0]
    arr[:, 200:400] = [0, 255, 0]
    arr[:, 400:] = [0, 0, 255]
    out = center_crop_resize(Image.fromarray(arr), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    inner = out[:, 3:-3].astype(int)  # bicubic ringing only touches the crop's edge columns
    assert (inner[..., 1] > 245).all() and (inner[..., 0] < 10).all() and (inner[..., 2] < 10).all()
    # Portrait: the crop is vertical and centred, top/bottom thirds cut away.
    out_t = center_crop_resize(Image.fromarray(np.ascontiguousarray(arr.transpose(1, 0, 2))), 64)
    assert (out_t[3:-3, :, 1] > 245).all()


def test_box_halving_antialiases_fine_patterns():
    # A 1-pixel checkerboard must come out as flat grey, not as moire.
    check = ((np.indices((1024, 1024)).sum(0) % 2) * 255).astype(np.uint8)
    out = center_crop_resize(Image.fromarray(check).convert("RGB"), 64).astype(int)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 2


def test_small_images_are_upsampled_and_sizes_are_exact():
    for h, w in [(28, 28), (13, 50), (255, 256), (513, 1025)]:
        out = center_crop_resize(Image.fromarray(_noise(h, w)), 64)
        assert out.shape == (64, 64, 3)


# ------------------------------------------------------------------ encode, ids


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_roundtrip(fmt):
    pixels = prepare_bytes(_save(Image.fromarray(_noise(100, 100, seed=3)), "PNG"), 32)
    smooth = np.repeat(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], 32, 0).repeat(3, 2)
    for arr in (pixels, smooth):
        back = decode_rgb(encode_image(arr, fmt, quality=95))
        assert back.shape == arr.shape
        err = np.abs(back.astype(int) - arr.astype(int))
        if fmt == "png":
            assert err.max() == 0  # lossless
        elif arr is smooth:
            assert err.mean() < 3
    with pytest.raises(ValueError, match="unknown image format"):
        encode_image(pixels, "gif")


def test_stable_id_depends_only_on_key():
    assert stable_id("n01440764/a.JPEG") == stable_id("n01440764/a.JPEG")
    assert stable_id("n01440764/a.JPEG") != stable_id("n01440764/b.JPEG")
    assert len(stable_id("x")) == 24 and int(stable_id("x"), 16) >= 0
    # Pinned: ids written into datasets must never change between versions of this code.
    assert stable_id("n01440764/a.JPEG") == "da59804f0803d55562b67dcb"
