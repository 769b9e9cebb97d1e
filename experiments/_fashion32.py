"""Fashion-MNIST at 32 px for the SSL experiment: both splits as (N, 32, 32, 3) uint8 tensors,
resized once with the pipeline's own `prepare_array` and cached as .npy beside the results."""

from __future__ import annotations

import os

import numpy as np
import torch

from reptok_core.images import prepare_array
from reptok_core.prepare.builtin_datasets import load_fashion_mnist

SIZE = 32


def fashion32(
    split: str, cache_dir: str, root: str = "", limit: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 32, 32, 3), labels int64 (N,)); `root` holds the idx .gz files
    (default: the Debian package's folder); `limit` > 0 keeps the first `limit` (smoke runs)."""
    path = os.path.join(cache_dir, f"fashion32_{split}.npz")
    if not os.path.exists(path):
        pixels, labels = load_fashion_mnist(split, root)
        images = np.stack([prepare_array(p, SIZE) for p in pixels])
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"  # arms may race to build it: last rename wins
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, path)
    with np.load(path) as d:
        images, labels = torch.from_numpy(d["images"]), torch.from_numpy(d["labels"])
    return (images[:limit], labels[:limit]) if limit else (images, labels)
