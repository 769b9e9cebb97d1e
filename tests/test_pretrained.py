"""The encoder shipped in reptok_core/pretrained: it loads by name, and it is a better
representation of Fashion-MNIST than the same ViT at random init (the reason it is shipped)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from reptok_core.config import preset_section, to_dict
from reptok_core.images import prepare_array
from reptok_core.models.encoder import EncoderConfig, SSLEncoder
from reptok_core.prepare.builtin_datasets import load_fashion_mnist
from reptok_core.stages.dino import DinoConfig, knn_accuracy
from reptok_core.weights import PRETRAINED_DIR, resolve_builtin

SHIPPED = "builtin:fashion32-dino-vits4"


def encoder_small() -> EncoderConfig:
    """The small tokenizer preset's encoder: the shipped weights."""
    return preset_section(EncoderConfig, "tokenizer/small", "model.encoder")


def _split(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, labels = load_fashion_mnist(split)
    images = np.stack([prepare_array(pixels[i], 32) for i in range(n)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(labels[:n])


@torch.no_grad()
def _knn(weights: str, bank, queries) -> float:
    torch.manual_seed(0)
    enc = SSLEncoder(dataclasses.replace(encoder_small(), weights=weights)).eval()
    return knn_accuracy(enc(bank[0]), bank[1], enc(queries[0]), queries[1])


def test_shipped_encoder_beats_random_init():
    bank, queries = _split("train", 2000), _split("test", 500)
    shipped, random = _knn(SHIPPED, bank, queries), _knn("random", bank, queries)
    # Measured with these 2,000 / 500 images: about 0.7 against 0.45.
    assert shipped > random + 0.15, (shipped, random)
    meta = json.load(open(os.path.join(PRETRAINED_DIR, "fashion32-dino-vits4.json")))
    assert meta["knn_accuracy"] > 0.7 and "pretrain" in meta["command"]


def test_shipped_file_is_small_fp16():
    path = resolve_builtin(SHIPPED)
    assert os.path.getsize(path) <= 15e6
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(path).values()} == {torch.float16}


def test_unknown_builtin_names_the_shipped_ones():
    with pytest.raises(ValueError, match="fashion32-dino-vits4"):
        resolve_builtin("builtin:no-such-encoder")
    assert resolve_builtin("s3://bucket/x.safetensors") == "s3://bucket/x.safetensors"


def test_stage0_starts_from_scratch():
    # The small tokenizer defaults to the shipped weights; DINO must not start from them.
    assert encoder_small().weights == SHIPPED
    assert DinoConfig().encoder.weights == "random"
    assert preset_section(DinoConfig, "pretrain/small").encoder.weights == "random"


def test_small_dino_preset_is_the_recipe_of_the_shipped_encoder():
    dino_small = preset_section(DinoConfig, "pretrain/small")
    meta = json.load(open(os.path.join(PRETRAINED_DIR, "fashion32-dino-vits4.json")))
    assert dino_small.encoder.arch == encoder_small().arch == meta["encoder"]["arch"]
    recipe = {k: v for k, v in to_dict(dino_small).items() if k not in ("encoder", "total_steps")}
    shipped = {k: v for k, v in meta["dino"].items() if k not in ("encoder", "total_steps")}
    # The run warmed the teacher temperature from 0.04 to 0.04: no warm-up, whatever its length.
    assert shipped["warmup_teacher_temp"] == shipped["teacher_temp"] == recipe["teacher_temp"]
    shipped["teacher_temp_warmup_steps"] = recipe["teacher_temp_warmup_steps"]
    assert recipe == shipped
