import dataclasses

import pytest
import torch

from reptok_core.config import preset_section
from reptok_core.formats.token_stats import RunningStats, TokenNormalizer
from reptok_core.models.decoder import (
    Decoder,
    apply_half_rope,
    axial_rope_angles,
    canvas_positions,
)
from reptok_core.models.latent_space import SDVAESpace
from reptok_core.models.layers import attention
from reptok_core.models.mixer import MixerConfig, MixerGenerator
from reptok_core.models.text_generator import TextGenerator, TextGeneratorConfig
from reptok_core.models.tokenizer import Tokenizer, TokenizerConfig

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=32,
)


def tokenizer_tiny() -> TokenizerConfig:
    return preset_section(TokenizerConfig, "tokenizer/tiny")


def decoder_tiny() -> Decoder:
    """The tiny preset's decoder over 3 x 16² pixels and 32-d tokens."""
    return Decoder(tokenizer_tiny().decoder, token_dim=32, in_channels=3, input_size=16)


def test_decoder_output_has_latent_shape_and_starts_at_zero():
    dec = decoder_tiny()
    x = torch.randn(3, 3, 16, 16)
    out = dec(x, torch.rand(3), torch.randn(3, 32))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-init head: the untrained decoder predicts v = 0


def test_decoder_uses_the_token():
    torch.manual_seed(0)
    dec = decoder_tiny()
    for p in dec.parameters():  # leave the zero-init: make every matrix non-trivial
        if p.ndim >= 2:
            torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    assert not torch.allclose(dec(x, t, torch.randn(2, 32)), dec(x, t, torch.randn(2, 32)))


def test_rope_scores_depend_only_on_relative_canvas_offset():
    pos = canvas_positions(4)  # token at (0, 0), then the 16 patch centres
    angles = axial_rope_angles(pos, heads=2, head_dim=16)
    cos, sin = angles.cos().float(), angles.sin().float()
    q, k = torch.randn(16), torch.randn(16)

    def score(i: int, j: int, head: int = 1) -> float:
        qi = apply_half_rope(q.view(1, 1, 1, 16).expand(1, 17, 2, 16), cos, sin)[0, i, head]
        kj = apply_half_rope(k.view(1, 1, 1, 16).expand(1, 17, 2, 16), cos, sin)[0, j, head]
        return float(qi @ kj)

    # patch (r, c) is token 1 + 4r + c; (0,0)->(1,1) and (2,2)->(3,3) have the same offset
    assert abs(score(1, 6) - score(11, 16)) < 1e-4
    assert abs(score(1, 6) - score(1, 7)) > 1e-4
    assert torch.equal(pos[0], torch.zeros(2, dtype=pos.dtype))  # the token: no rotation
    assert torch.equal(cos[0], torch.ones(2, 4)) and torch.equal(sin[0], torch.zeros(2, 4))
    # half of each head's channels rotate; the rest pass through unchanged
    rotated = apply_half_rope(q.view(1, 1, 1, 16).expand(1, 17, 2, 16), cos, sin)
    assert torch.equal(rotated[..., 8:], q[8:].expand(1, 17, 2, 8))
    # heads get different frequencies (dealt out round-robin from one log-spaced range)
    assert not torch.allclose(angles[:, 0], angles[:, 1])


def test_tokenizer_loss_decode_reconstruct_interpolate():
    torch.manual_seed(0)
    tok = Tokenizer(tokenizer_tiny())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    losses = tok.loss(x)
    assert set(losses) == {"flow", "cos", "total", "cos_sim"}
    assert torch.isclose(losses["total"], losses["flow"] + losses["cos"])
    z = tok.encode(x)
    assert z.shape == (2, 32)
    a, b = tok.decode(z, steps=3, seed=5), tok.decode(z, steps=3, seed=5)
    assert a.shape == x.shape and torch.equal(a, b)
    assert tok.reconstruct(x, steps=2).shape == x.shape
    path = tok.interpolate(z[0], z[1], 5)
    assert (
        path.shape == (5, 32) and torch.allclose(path[0], z[0]) and torch.allclose(path[-1], z[1])
    )


def test_decode_with_explicit_noise_equals_seeded_decode():
    torch.manual_seed(0)
    tok = Tokenizer(tokenizer_tiny())
    for p in tok.decoder.parameters():  # a non-zero velocity, so the flow really runs
        if p.ndim >= 2:
            torch.nn.init.normal_(p, std=0.02)
    z = torch.randn(2, 32)

    def seeded(n: int, seed: int) -> torch.Tensor:
        return torch.randn((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed))

    # The noise a seed makes gives exactly the images of decoding with that seed ...
    assert torch.equal(tok.decode(z, steps=3, noise=seeded(2, 5)), tok.decode(z, steps=3, seed=5))
    # ... and rows from different seeds decode as each token alone with its own seed.
    rows = tok.decode(z, steps=3, noise=torch.cat([seeded(1, 7), seeded(1, 8)]))
    assert torch.allclose(rows[:1], tok.decode(z[:1], steps=3, seed=7), atol=1e-6)
    assert torch.allclose(rows[1:], tok.decode(z[1:], steps=3, seed=8), atol=1e-6)
    with pytest.raises(ValueError, match="noise has shape"):
        tok.decode(z, steps=1, noise=seeded(1, 0))


def test_tokenizer_derives_the_decoder_sizes_and_rejects_mismatched_ones():
    cfg = tokenizer_tiny()
    assert Tokenizer(cfg).decoder.sizes == {"token_dim": 32, "in_channels": 3, "input_size": 16}
    vae = SDVAESpace.from_config(TINY_VAE)
    cfg.decoder.patch_size = 2
    assert Tokenizer(cfg, latent_space=vae).latent_shape() == (4, 8, 8)
    cfg.image_size = 15
    with pytest.raises(ValueError, match="not a multiple of the latent space"):
        Tokenizer(cfg, latent_space=vae)
    cfg.image_size, cfg.decoder.patch_size = 16, 3
    with pytest.raises(ValueError, match="not divisible by decoder.patch_size"):
        Tokenizer(cfg)


def test_sd_vae_space_on_a_tiny_random_vae():
    torch.manual_seed(0)
    vae = SDVAESpace.from_config(TINY_VAE, scaling_factor=0.5, sample=False)
    assert vae.channels == 4 and vae.downsample == 2
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    lat = vae.encode(x)
    assert lat.shape == (2, 4, 16, 16)
    raw = vae.vae.encode(x).latent_dist.mean
    assert torch.allclose(lat, raw * 0.5)
    out = vae.decode(lat)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1


def test_mixer_generator_shapes_and_label_dropout():
    torch.manual_seed(0)
    cfg = preset_section(MixerConfig, "generator/tiny", "model.mixer")
    gen = MixerGenerator(dataclasses.replace(cfg, class_dropout=0.5), token_dim=32)
    z = torch.randn(4, 32)
    y = torch.tensor([0, 1, 2, 10])  # 10 = null class
    assert gen(z, torch.rand(4), y).shape == (4, 32)
    dropped = gen.drop_labels(torch.zeros(10_000, dtype=torch.long))
    frac = (dropped == gen.null_class).float().mean().item()
    assert 0.45 < frac < 0.55


def test_text_generator_shapes_and_caption_dropout():
    torch.manual_seed(0)
    cfg = preset_section(TextGeneratorConfig, "generator/tiny", "model.text")
    gen = TextGenerator(dataclasses.replace(cfg, caption_dropout=1.0), token_dim=32, text_dim=16)
    text, mask = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool)
    assert gen(torch.randn(3, 32), torch.rand(3), text, mask).shape == (3, 32)
    null = gen.caption_drop(3, torch.device("cpu"))
    assert null.all()  # caption_dropout=1.0
    torch.nn.init.normal_(gen.out.weight)  # zero-init output would hide any difference
    z, t, other = torch.randn(3, 32), torch.rand(3), torch.randn(3, 5, 16)
    # The null branch ignores the caption entirely; the conditional branch does not.
    assert torch.allclose(gen(z, t, text, mask, null=null), gen(z, t, other, mask, null=null))
    assert not torch.allclose(gen(z, t, text, mask), gen(z, t, other, mask))


def test_token_normalizer_and_running_stats():
    x = torch.randn(1000, 6) * 3 + 2
    stats = RunningStats(6)
    for chunk in x.split(137):
        stats.update(chunk)
    assert torch.allclose(stats.mean.float(), x.mean(0), atol=1e-5)
    assert torch.allclose(stats.std.float(), x.std(0), atol=1e-4)
    norm = TokenNormalizer(stats.mean, stats.std)
    assert torch.allclose(norm.denormalize(norm.normalize(x)), x, atol=1e-4)


@pytest.mark.parametrize("n,m", [(6, 16), (6, 6), (80, 80)])
def test_short_attention_matches_sdpa(n, m):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, n, 8), torch.randn(2, 3, m, 8), torch.randn(2, 3, m, 8)
    mask = torch.rand(2, 1, 1, m) < 0.7
    mask[..., 0] = True  # every query sees at least one key
    for msk in (None, mask):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=msk)
        torch.testing.assert_close(attention(q, k, v, msk), want, atol=1e-5, rtol=1e-5)
