"""Parameter counts of the `paper` presets (random weights; no download, no GPU).

    python benchmarks/param_counts.py

Expected from the paper: encoder ViT-B/14 ≈ 86M, decoder ≈ 570M, MLP-Mixer XL ≈ 0.5B. The
mixer is also counted as the official `MLPMixer1D` of the same sizes would be (closed form of its
layers; instantiating it at the paper's sizes gave 532,793,400 on 2026-12-01).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reptok_core.config import preset_section  # noqa: E402
from reptok_core.models.decoder import Decoder  # noqa: E402
from reptok_core.models.encoder import build_vit  # noqa: E402
from reptok_core.models.generator import GeneratorConfig  # noqa: E402
from reptok_core.models.latent_space import SD_VAE_FT_MSE  # noqa: E402
from reptok_core.models.mixer import N_TOKENS, MixerConfig, MixerGenerator  # noqa: E402
from reptok_core.models.text_generator import TextGenerator  # noqa: E402
from reptok_core.models.tokenizer import TokenizerConfig  # noqa: E402

TEXT_DIM = 384  # the caption states of MiniLM-L6 (encode.text_encoder)


def millions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def official_mixer_params(cfg: MixerConfig, d: int, freq_dim: int = 256) -> int:
    """Parameters of the official MLPMixer1D (n_channels 1, class-conditional with a null row)
    over d-dimensional tokens."""
    w, c = cfg.width, cfg.num_classes
    h, f = int(N_TOKENS * cfg.token_expansion), int(w * cfg.channel_expansion)
    embeds = d + (c + 1) * d + (freq_dim * d + d) + (d * d + d)  # pos, labels, t-embedder
    block = 2 * 2 * w + (N_TOKENS * h + h + h * N_TOKENS + N_TOKENS) + (w * f + f + f * w + w)
    return embeds + (d * w + w) + cfg.depth * block + 2 * w + (w * d + d)


def main() -> None:
    tok = preset_section(TokenizerConfig, "tokenizer/paper")
    gen = preset_section(GeneratorConfig, "generator/paper")
    tok.encoder.weights = "random"
    vit = build_vit(tok.encoder)
    d = vit.embed_dim  # the token: the encoder's width
    downsample = 2 ** (len(SD_VAE_FT_MSE["block_out_channels"]) - 1)
    latent = SD_VAE_FT_MSE["latent_channels"], tok.image_size // downsample
    rows = [
        ("encoder (DINOv2 ViT-B/14 reg4, 224 px)", millions(vit)),
        (
            "decoder (paper: width 1152, depth 28, patch 2)",
            millions(Decoder(tok.decoder, d, *latent)),
        ),
        ("class generator (MLP-Mixer XL)", millions(MixerGenerator(gen.mixer, d))),
        ("  official MLPMixer1D, same sizes", official_mixer_params(gen.mixer, d) / 1e6),
        ("text generator (paper preset)", millions(TextGenerator(gen.text, d, TEXT_DIM))),
    ]
    for name, n in rows:
        print(f"{name:<50s} {n:8.1f}M")


if __name__ == "__main__":
    main()
