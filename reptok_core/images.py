"""Pure image helpers for data preparation: safe decode, RGB conversion, ADM crop, encode, ids.

Everything here is a plain function over bytes / Pillow images / numpy arrays, so the same code
runs inside Ray Data tasks, in a notebook and in tests. Bad input never raises anything but
`ImageRejected`, whose `reason` is one of `REJECT_REASONS`; callers count reasons, they do not
parse messages.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Why each input can be dropped. Kept short and stable: the manifest counts by these names.
REJECT_REASONS = (
    "unreadable",  # the path could not be read (missing, permission, dangling link, I/O error)
    "empty_file",  # zero bytes
    "not_an_image",  # Pillow does not recognise the bytes (text file named .jpg, HTML error page)
    "truncated",  # recognised, but the data stops early
    "corrupt",  # recognised, but decoding failed for another reason (bad checksum, bad stream)
    "too_many_pixels",  # above the pixel cap: a decompression bomb or an absurdly large scan
    "too_small",  # shorter side below the configured minimum
    "extreme_aspect_ratio",  # longer / shorter side above the configured maximum (a sliver)
    "no_image",  # a WebDataset sample or manifest row without an image member / path
    "duplicate_id",  # a second input with an id already taken by an earlier one
)

IMAGE_FORMATS = ("png", "jpeg", "webp")

# Modes holding more than 8 bits per sample; Pillow's own convert("L") clips them instead of
# rescaling, which turns most 16-bit scans white.
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageRejected(Exception):
    """An input that cannot become a training image; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def stable_id(key: str) -> str:
    """A short hex id that depends only on the source key (relative path, sample key, ...).

    96 bits: collisions are negligible far beyond ImageNet-21k sizes, and the id is uniform, so a
    hash of it splits train/val without any ordering bias.
    """
    return hashlib.blake2b(key.encode("utf-8"), digest_size=12).hexdigest()


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode `data`, refusing anything over `max_pixels` before decoding.

    The size check uses the header only, so a decompression bomb costs a few bytes of parsing.
    Pillow's own bomb guard (Image.MAX_IMAGE_PIXELS) also stays in force; both map to
    `too_many_pixels`.
    """
    if not data:
        raise ImageRejected("empty_file")
    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice that Pillow only warns; our cap decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageRejected(
                    "too_many_pixels", f"{width}x{height} > cap of {max_pixels} pixels"
                )
            img.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected("too_many_pixels", str(e)) from None
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "not a format Pillow can read") from None
    except (EOFError, OSError) as e:
        msg = str(e)
        if isinstance(e, EOFError) or "truncated" in msg.lower() or "end of file" in msg.lower():
            raise ImageRejected("truncated", msg) from None
        raise ImageRejected("corrupt", msg) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input, never a crash
        raise ImageRejected("corrupt", f"{type(e).__name__}: {e}") from None
    return img


def exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag so pixels are stored the way a viewer shows them.

    Broken EXIF blocks are common in camera files whose pixels are fine: keep the pixels as
    stored rather than dropping the image.
    """
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001
        return img


def _white_background(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB.

    Transparency (RGBA, LA, palette with a transparent index, tRNS chunks) is composited on
    white, as most image datasets show cut-outs on white pages; 16-bit and 32-bit greyscale are
    rescaled (not clipped) to 8 bits; CMYK goes through Pillow's conversion.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _HIGH_BIT_MODES:
        # 16-bit data (PNG/TIFF) arrives as I;16* or, from older decoders, as 32-bit I holding
        # 0..65535. Map 65535 -> 255.
        grey = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if np.isfinite(arr).all() and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0  # float images are conventionally in [0, 1]
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return _white_background(img)
    if mode == "P":
        return img.convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


def center_crop_resize(img: Image.Image, size: int) -> np.ndarray:
    """ADM-style square crop (as in guided-diffusion / DiT / RepTok ImageNet data): uint8 HxWx3.

    Halve with a BOX filter while the short side is at least twice the target (exact 2x2
    averaging: cheap and alias-free), then one BICUBIC resize puts the short side at `size`, then
    the centre square is cut out. Small images are upsampled by the same BICUBIC step.
    """
    if size <= 0:
        raise ValueError(f"resolution must be positive, got {size}")
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    # max(): rounding must never leave the short side one pixel below the target.
    new = (max(size, round(img.width * scale)), max(size, round(img.height * scale)))
    if new != img.size:
        img = img.resize(new, resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def check_shape(width: int, height: int, min_size: int = 0, max_aspect: float = 0.0) -> None:
    """ImageRejected for a shorter side below `min_size` or a longer / shorter side ratio
    above `max_aspect` (0 = no limit): a 1x1 icon or a 4000x2 sliver would be upsampled or
    cropped to a square of a few real pixels."""
    if max_aspect > 0 and max(width, height) > max_aspect * min(width, height):
        ratio = max(width, height) / max(min(width, height), 1)
        raise ImageRejected(
            "extreme_aspect_ratio", f"{width}x{height}, aspect ratio {ratio:.1f} > {max_aspect:g}"
        )
    if min(width, height) < min_size:
        raise ImageRejected("too_small", f"{width}x{height}, shorter side below {min_size}")


def prepare_pil(
    img: Image.Image, resolution: int, min_size: int = 0, max_aspect: float = 0.0
) -> np.ndarray:
    """Upright, RGB, size-checked, cropped: a decoded image -> uint8 (resolution, resolution, 3)."""
    check_shape(img.width, img.height, min_size, max_aspect)
    img = to_rgb(exif_upright(img))
    return center_crop_resize(img, resolution)


def prepare_bytes(
    data: bytes,
    resolution: int,
    *,
    min_size: int = 0,
    max_aspect: float = 0.0,
    max_pixels: int = 89_478_485,
) -> np.ndarray:
    """Encoded file bytes -> uint8 (resolution, resolution, 3), or ImageRejected with a reason.

    The max_pixels default is Pillow's own MAX_IMAGE_PIXELS (a 0.25 GB RGB image).
    """
    img = open_image(data, max_pixels)
    try:
        return prepare_pil(img, resolution, min_size, max_aspect)
    except ImageRejected:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a palette that does not convert
        raise ImageRejected("corrupt", f"{type(e).__name__}: {e}") from None


def prepare_array(
    pixels: np.ndarray, resolution: int, *, min_size: int = 0, max_aspect: float = 0.0
) -> np.ndarray:
    """In-memory uint8 pixels (HxW grey, HxWx3 RGB, HxWx4 RGBA) -> uint8 (res, res, 3)."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"expected uint8 HxW[xC] pixels, got {pixels.dtype} {pixels.shape}")
    return prepare_pil(Image.fromarray(pixels), resolution, min_size, max_aspect)


def encode_image(
    pixels: np.ndarray, fmt: str = "png", *, quality: int = 95, png_compress_level: int = 6
) -> bytes:
    """uint8 HxWx3 -> PNG (lossless, default), JPEG (4:4:4 chroma) or WebP (lossless at 100)."""
    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=png_compress_level)
    elif fmt in ("jpeg", "jpg"):
        # Full-resolution chroma: a tokenizer is judged on reconstruction, 4:2:0 blurs colour edges.
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, lossless=quality >= 100, method=4)
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {IMAGE_FORMATS}")
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded prepared image -> uint8 HxWx3 (for readers of the prepared Parquet)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def images_from_uint8(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1] on `device`."""
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def images_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """Stack equally long rows of (N, H, W, 3) images into one (rows*H, N*W, 3) picture."""
    return np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
