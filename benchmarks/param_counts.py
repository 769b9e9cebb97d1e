"""Parameter counts of the `paper` presets (random weights; no download, no GPU).

    python benchmarks/param_counts.py

Expected from the paper: encoder ViT-B/14 ≈ 86M, decoder ≈ 570M, MLP-Mixer XL ≈ 0.5B.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reptok_core.decoder import Decoder, decoder_paper  # noqa: E402
from reptok_core.encoder import build_vit, encoder_paper  # noqa: E402
from reptok_core.mixer import MixerGenerator, mixer_paper  # noqa: E402
from reptok_core.text_generator import TextGenerator, text_generator_paper  # noqa: E402


def millions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def main() -> None:
    enc = encoder_paper()
    enc.weights = "random"
    rows = [
        ("encoder (DINOv2 ViT-B/14 reg4, 224 px)", millions(build_vit(enc))),
        ("decoder (paper: width 1152, depth 28, patch 2)", millions(Decoder(decoder_paper()))),
        ("class generator (MLP-Mixer XL)", millions(MixerGenerator(mixer_paper()))),
        ("text generator (paper preset)", millions(TextGenerator(text_generator_paper()))),
    ]
    for name, n in rows:
        print(f"{name:<50s} {n:8.1f}M")


if __name__ == "__main__":
    main()
