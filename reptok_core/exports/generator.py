"""A trained generator on storage: export folder (weights + normaliser + config JSON) and loading it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from reptok_core.config import from_dict, to_dict
from reptok_core.formats.token_stats import TokenNormalizer
from reptok_core.models.generator import Conditioning, GeneratorConfig, build_model, conditioning

EXPORT_WEIGHTS = "generator.safetensors"
EXPORT_CONFIG = "generator.json"


@dataclass
class LoadedGenerator:
    model: torch.nn.Module
    normalizer: TokenNormalizer
    cfg: GeneratorConfig
    meta: dict[str, Any]

    @property
    def conditioning(self) -> Conditioning:
        return conditioning(self.cfg)

    @property
    def text_encoder(self) -> str | None:
        return self.meta.get("text_encoder")


def export_generator(
    state: dict[str, torch.Tensor],
    cfg: GeneratorConfig,
    sizes: dict[str, int],
    normalizer: TokenNormalizer,
    uri: str,
    extra: dict | None = None,
) -> None:
    """Write weights + normaliser (safetensors) and config JSON (plus `extra` lineage) to `uri`.

    `sizes` are the model's data-given sizes (its `.sizes`: token_dim, and text_dim for a text
    generator); the JSON records them and loading builds the model from them."""
    from reptok_core.storage import join, write_bytes_atomic

    tensors = {k: v.contiguous() for k, v in state.items()}
    tensors["normalizer.mean"] = normalizer.mean.detach().cpu().contiguous()
    tensors["normalizer.std"] = normalizer.std.detach().cpu().contiguous()
    write_bytes_atomic(join(uri, EXPORT_WEIGHTS), save_safetensors_bytes(tensors))
    meta = {"config": to_dict(cfg), "sizes": dict(sizes), **(extra or {})}
    write_bytes_atomic(join(uri, EXPORT_CONFIG), json.dumps(meta, indent=2).encode())


def load_generator(uri: str, device: torch.device | str = "cpu") -> LoadedGenerator:
    """Rebuild an exported generator (eval mode) with its token normaliser."""
    from reptok_core.storage import join, read_bytes

    meta = json.loads(read_bytes(join(uri, EXPORT_CONFIG)))
    if "sizes" not in meta:
        raise ValueError(f"generator export {uri!r} records no model sizes; export it again")
    cfg = from_dict(GeneratorConfig, meta["config"])
    state = load_safetensors_bytes(read_bytes(join(uri, EXPORT_WEIGHTS)))
    normalizer = TokenNormalizer(state.pop("normalizer.mean"), state.pop("normalizer.std"))
    model = build_model(cfg, **meta["sizes"])
    model.load_state_dict(state)  # strict: a mismatch is a broken export, say so loudly
    return LoadedGenerator(model.to(device).eval(), normalizer.to(device), cfg, meta)
