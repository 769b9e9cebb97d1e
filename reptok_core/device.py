"""What `auto` means for a device and for a precision: one answer for training, encoding,
evaluation and serving.

torch is imported inside the functions: configs that name a `Precision` are read by processes
that never load a model (the Serve ingress, the CLIs' --help).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from reptok_core.config import choice

if TYPE_CHECKING:
    import torch


class Precision(enum.StrEnum):
    """Weights / autocast precision: `auto` is bf16 on a GPU that has it, fp32 elsewhere."""

    AUTO = "auto"
    BF16 = "bf16"
    FP32 = "fp32"

    @property
    def dtype(self) -> torch.dtype:
        import torch

        if self is Precision.AUTO:
            raise ValueError("Precision.AUTO has no dtype; resolve_precision it first")
        return torch.bfloat16 if self is Precision.BF16 else torch.float32


def resolve_device(setting: str = "auto") -> torch.device:
    """'auto' -> cuda when this process sees a GPU, else cpu; anything else as torch names it."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_precision(
    setting: Precision | str, device: torch.device, option: str = "precision"
) -> Precision:
    """`setting` for work on `device`: BF16 or FP32, never AUTO. `option` names the setting in
    the error a bad value gets."""
    import torch

    setting = choice(Precision, setting, option)
    if setting is not Precision.AUTO:
        return setting
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return Precision.BF16 if bf16 else Precision.FP32
