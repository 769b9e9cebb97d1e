"""The imported official tokenizer against the official code's own outputs.

tests/fixtures/official/ holds a tiny random-weight checkpoint in the release's Lightning
format and what the official modules computed from it (official.json documents both; the
script that made them ran the CompVis/RepTok code, which is not part of this repository).
Every comparison is fp32 on the CPU, within 1e-4 relative.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reptok_core import flow
from reptok_core.models.latent_space import SDVAESpace
from reptok_core.models.tokenizer import Tokenizer
from reptok_core.official.checkpoint import OfficialCheckpointError, load_official_checkpoint
from reptok_core.official.convert import EncoderSizes, tokenizer_from_official

OFFICIAL = Path(__file__).parent / "fixtures" / "official"
META = json.loads((OFFICIAL / "official.json").read_text())
SIZES = META["sizes"]
VAE = {k: v for k, v in SIZES["ae"].items() if k not in ("scale", "shift")}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(OFFICIAL / "io.safetensors"))


@pytest.fixture(scope="module")
def imported():
    ckpt = load_official_checkpoint(OFFICIAL / "reptok-tiny.ckpt")
    dino = SIZES["dino"]
    return tokenizer_from_official(
        ckpt.state_dict,
        image_size=SIZES["image_size"],
        encoder_sizes=EncoderSizes(img_size=dino["model_size"], num_heads=dino["num_heads"]),
        vae_config=VAE,
    )


@pytest.fixture(scope="module")
def tok(imported) -> Tokenizer:
    model = Tokenizer(imported.config, latent_space=SDVAESpace.from_config(VAE))
    model.load_state_dict(imported.state, strict=True)
    return model.eval()


def test_sizes_are_read_from_the_weights(imported):
    dec, d = imported.config.decoder, SIZES["decoder"]
    assert (dec.width, dec.depth, dec.head_dim, dec.mapping_width) == (
        d["width"],
        d["depth"],
        d["d_head"],
        d["mapping_width"],
    )
    assert dec.patch_size == 2
    # Token width and latent shape follow from the imported encoder and VAE, and are recorded.
    assert imported.sizes == {"token_dim": 32, "in_channels": 4, "input_size": 8}


@pytest.mark.parametrize("name", ["28", "63x60", "28x29"])
def test_encoder_token_and_target_match(tok, io, name):
    images = io[f"enc.img{name}"]
    with torch.no_grad():
        assert rel(tok.encode(images), io[f"enc.token{name}"]) < 1e-4
        assert rel(tok.encoder.target(images), io[f"enc.target_token{name}"]) < 1e-4


def test_token_projection_and_time_mapping_match(tok, io):
    with torch.no_grad():
        x_extra = tok.decoder.token_proj(io["enc.token28"])
        assert rel(x_extra, io["dec.x_extra28"][:, 0]) < 1e-4
        assert rel(tok.decoder.time(io["dec.t"]), io["dec.cond_norm"]) < 1e-4


def test_decoder_velocity_matches(tok, io):
    with torch.no_grad():
        v = tok.decoder(io["dec.x_t"], io["dec.t"], io["dec.cls"])
    assert rel(v, io["dec.v"]) < 1e-4


def test_ten_step_decode_matches(tok, io):
    z = io["dec.cls_sample"]
    with torch.no_grad():
        latent = flow.sample(lambda x, t: tok.decoder(x, t, z), io["dec.noise"], steps=10)
        assert rel(latent, io["dec.latent_10"]) < 1e-4
        images = tok.decode(z, steps=10, noise=io["dec.noise"])
    # Ours clamps decoded images to [-1, 1]; the official decoder returns the VAE's raw output.
    assert rel(images, io["dec.image_10"].clamp(-1, 1)) < 1e-4


def test_generated_tokens_decode_to_the_official_image(tok, io):
    with torch.no_grad():
        images = tok.decode(io["gen.tokens_10_unscaled"], steps=10, noise=io["gen.dec_noise"])
    assert rel(images, io["gen.image_10"].clamp(-1, 1)) < 1e-4


def test_a_checkpoint_without_a_first_stage_is_refused():
    ckpt = load_official_checkpoint(OFFICIAL / "reptok-tiny.ckpt")
    generator_only = {k: v for k, v in ckpt.state_dict.items() if not k.startswith("first_stage.")}
    with pytest.raises(OfficialCheckpointError, match="first-stage"):
        tokenizer_from_official(generator_only)


def test_a_missing_decoder_layer_is_named():
    ckpt = load_official_checkpoint(OFFICIAL / "reptok-tiny.ckpt")
    sd = dict(ckpt.state_dict)
    del sd["first_stage.decoder.decoder.backbone.mid_level.1.ff.up_proj.weight"]
    with pytest.raises(OfficialCheckpointError, match="mid_level.1.ff.up_proj"):
        tokenizer_from_official(
            sd, image_size=64, encoder_sizes=EncoderSizes(28, 2), vae_config=VAE
        )
