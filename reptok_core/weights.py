"""Reading tensors from files or s3:// URIs: safetensors preferred, torch.load otherwise,
always with `weights_only=True` so a checkpoint can never run code when it is opened."""

from __future__ import annotations

import io
import os

import torch
from safetensors.torch import load as load_safetensors_bytes

from reptok_core.storage import read_bytes

BUILTIN = "builtin:"
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")


def resolve_builtin(uri: str) -> str:
    """'builtin:NAME' -> what is shipped as reptok_core/pretrained/NAME.safetensors (weights)
    or reptok_core/pretrained/NAME/ (an export folder), a path inside the installed package so
    Ray workers find it from any working directory; any other URI is returned unchanged."""
    if not uri.startswith(BUILTIN):
        return uri
    name = uri[len(BUILTIN) :]
    for path in (
        os.path.join(PRETRAINED_DIR, f"{name}.safetensors"),
        os.path.join(PRETRAINED_DIR, name),
    ):
        if os.path.exists(path):
            return path
    shipped = sorted(f.removesuffix(".safetensors") for f in os.listdir(PRETRAINED_DIR))
    shipped = sorted({f for f in shipped if not f.endswith(".json")})
    raise ValueError(f"weights {uri!r}: no built-in weights {name!r}; shipped: {shipped}")


def load_state_dict_file(uri: str) -> dict[str, torch.Tensor]:
    uri = resolve_builtin(uri)
    data = read_bytes(uri)
    if uri.endswith(".safetensors"):
        return load_safetensors_bytes(data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{uri!r} is neither safetensors nor a weights-only torch file: {e}"
        ) from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{uri!r} does not hold a flat dict of tensors")
    return obj
