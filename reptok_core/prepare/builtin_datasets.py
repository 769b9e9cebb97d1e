"""Named datasets that exist on this machine without any download.

- `fashion-mnist`: Zalando's 28x28 greyscale clothing images, 10 classes, read from the idx files
  of Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist) or any folder / s3://
  prefix holding the same four files (gzipped or not).
- `emoji`: every single-code-point emoji of Noto Color Emoji (Debian's `fonts-noto-color-emoji`),
  rendered with Pillow, captioned with its Unicode name: a tiny text-to-image set.
"""

from __future__ import annotations

import functools
import gzip
import io
import struct
import unicodedata

import numpy as np

from reptok_core import storage

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}  # our split name -> file prefix

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
# Noto Color Emoji is a CBDT bitmap font with a single strike; FreeType only loads it at the
# strike's nominal size, 109 px (the glyph bitmaps are 136x128).
EMOJI_BITMAP_SIZE = 109

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(data: bytes) -> np.ndarray:
    """Parse an idx file (the MNIST container format), gzipped or raw, into a numpy array."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("not an idx file: bad magic number")
    dtype, ndim = data[2], data[3]
    if dtype not in _IDX_DTYPES:
        raise ValueError(f"idx file has unknown element type 0x{dtype:02x}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=_IDX_DTYPES[dtype], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"idx file is truncated: header says {shape}, found {arr.size} values")
    return arr.reshape(shape)


def _find_idx(root: str, stem: str) -> str:
    for name in (f"{stem}.gz", stem):
        uri = storage.join(root, name)
        if storage.exists(uri):
            return uri
    raise FileNotFoundError(f"fashion-mnist: neither {stem}.gz nor {stem} under {root!r}")


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(split: str = "train", root: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 Nx28x28, labels int64 N) of one split: 'train' (60,000) or 'test' (10,000).

    Cached per process: Ray workers reuse their process across tasks, so each worker decompresses
    the files once, not once per shard.
    """
    if split not in FASHION_MNIST_SPLITS:
        raise ValueError(
            f"fashion-mnist split {split!r}; expected one of {list(FASHION_MNIST_SPLITS)}"
        )
    root = root or FASHION_MNIST_DIR
    prefix = FASHION_MNIST_SPLITS[split]
    images = read_idx(storage.read_bytes(_find_idx(root, f"{prefix}-images-idx3-ubyte")))
    labels = read_idx(storage.read_bytes(_find_idx(root, f"{prefix}-labels-idx1-ubyte")))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"fashion-mnist {split}: images {images.shape} do not match labels {labels.shape}"
        )
    return images, labels.astype(np.int64)


def _cmap_format12(font: bytes) -> list[int]:
    """Code points mapped by a TrueType/OpenType font (cmap subtable format 12).

    Hand-parsed (a few struct reads) so the package needs no font library beyond Pillow, which
    cannot list a font's characters.
    """
    num_tables = struct.unpack(">H", font[4:6])[0]
    cmap_off = None
    for i in range(num_tables):
        tag, _, off, _ = struct.unpack(">4sIII", font[12 + 16 * i : 28 + 16 * i])
        if tag == b"cmap":
            cmap_off = off
    if cmap_off is None:
        raise ValueError("font has no cmap table")
    n_sub = struct.unpack(">H", font[cmap_off + 2 : cmap_off + 4])[0]
    for i in range(n_sub):
        rec = cmap_off + 4 + 8 * i
        _, _, sub_off = struct.unpack(">HHI", font[rec : rec + 8])
        sub = cmap_off + sub_off
        if struct.unpack(">H", font[sub : sub + 2])[0] != 12:
            continue
        n_groups = struct.unpack(">I", font[sub + 12 : sub + 16])[0]
        cps: list[int] = []
        for g in range(n_groups):
            start, end, _ = struct.unpack(">III", font[sub + 16 + 12 * g : sub + 28 + 12 * g])
            cps.extend(range(start, end + 1))
        return sorted(set(cps))
    raise ValueError("font has no format-12 cmap subtable (expected for an emoji font)")


def _is_standalone_emoji(cp: int) -> bool:
    ch = chr(cp)
    if cp < 0x80:  # digits, '#', '*': keycap bases, not pictures
        return False
    if 0x1F1E6 <= cp <= 0x1F1FF or 0x1F3FB <= cp <= 0x1F3FF:
        return False  # regional-indicator letters and skin-tone swatches: parts of sequences
    if unicodedata.category(ch)[0] in "MCZ":  # marks, format/control (ZWJ, VS16, tags), spaces
        return False
    return bool(unicodedata.name(ch, ""))


@functools.lru_cache(maxsize=2)
def _font_bytes(font_path: str) -> bytes:
    return storage.read_bytes(font_path)


def emoji_codepoints(font_path: str = "") -> list[int]:
    """Sorted single code points that the font draws and Python's Unicode database names."""
    return [
        cp
        for cp in _cmap_format12(_font_bytes(font_path or EMOJI_FONT))
        if _is_standalone_emoji(cp)
    ]


def emoji_caption(cp: int) -> str:
    """The caption of an emoji: its Unicode name, lower-cased ('grinning face')."""
    return unicodedata.name(chr(cp)).lower()


@functools.lru_cache(maxsize=2)
def _emoji_font(font_path: str):  # -> ImageFont.FreeTypeFont
    from PIL import ImageFont

    return ImageFont.truetype(io.BytesIO(_font_bytes(font_path)), EMOJI_BITMAP_SIZE)


def render_emoji(cp: int, font_path: str = "") -> np.ndarray:
    """One emoji as uint8 RGBA (128x136 for Noto); transparent background, colour glyph."""
    from PIL import Image, ImageDraw

    font = _emoji_font(font_path or EMOJI_FONT)
    ch = chr(cp)
    left, top, right, bottom = font.getbbox(ch)
    if right <= left or bottom <= top:
        raise ValueError(f"the emoji font has no glyph for U+{cp:04X}")
    canvas = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((-left, -top), ch, font=font, embedded_color=True)
    return np.asarray(canvas)
