"""Tokenizer exports: what they carry (frozen-target differences, an optional VAE) and
fine-tuning from one (`init_from`)."""

import pytest
import torch
from safetensors.torch import load_file

from reptok_core.config import preset_section
from reptok_core.exports.tokenizer import export_tokenizer, load_tokenizer, read_tokenizer_meta
from reptok_core.models.latent_space import SDVAESpace
from reptok_core.models.tokenizer import Tokenizer, TokenizerConfig
from reptok_core.stages.tokenizer import TokenizerTask, finetune_config

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[8, 8],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=16,
)


def _trained_tiny() -> Tokenizer:
    torch.manual_seed(0)
    tok = Tokenizer(preset_section(TokenizerConfig, "tokenizer/tiny"))
    with torch.no_grad():  # as after training: the [cls] embedding moved, the decoder learned
        tok.encoder.vit.cls_token.add_(1.0)
        for p in tok.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return tok


def test_export_keeps_only_the_frozen_tensors_that_differ(tmp_path):
    tok = _trained_tiny()
    export_tokenizer(tok.state_dict(), tok.cfg, tok.decoder.sizes, str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    saved = load_file(str(tmp_path / "tokenizer.safetensors"))
    assert [k for k in saved if k.startswith("encoder.frozen.")] == ["encoder.frozen.cls_token"]
    for k, v in tok.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert not torch.allclose(loaded.encode(x), loaded.encoder.target(x))


def test_export_can_carry_its_vae_and_loads_it_offline(tmp_path):
    torch.manual_seed(1)
    cfg = preset_section(TokenizerConfig, "tokenizer/tiny")
    cfg.latent.kind, cfg.latent.vae = "sd-vae", "not/on/this/machine"
    cfg.decoder.patch_size = 2
    tok = Tokenizer(cfg, latent_space=SDVAESpace.from_config(TINY_VAE))
    export_tokenizer(tok.state_dict(), cfg, tok.decoder.sizes, str(tmp_path), vae_config=TINY_VAE)
    meta = read_tokenizer_meta(str(tmp_path))
    assert meta["vae_config"] == TINY_VAE
    # Derived from the encoder (32 wide) and the VAE (4 channels, 16 px / 2), and recorded.
    assert meta["sizes"] == {"token_dim": 32, "in_channels": 4, "input_size": 8}
    assert "in_channels" not in meta["config"]["decoder"]
    loaded = load_tokenizer(str(tmp_path))  # no hub: the VAE comes from the export
    for k, v in tok.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_loading_with_a_latent_space_of_other_sizes_fails_clearly(tmp_path):
    tok = _trained_tiny()  # pixel space: 3 x 16² latents
    export_tokenizer(tok.state_dict(), tok.cfg, tok.decoder.sizes, str(tmp_path))
    with pytest.raises(ValueError, match="records decoder sizes"):
        load_tokenizer(str(tmp_path), latent_space=SDVAESpace.from_config(TINY_VAE))


def test_finetuning_starts_from_the_export_with_the_requested_training_choices(tmp_path):
    tok = _trained_tiny()
    export_tokenizer(tok.state_dict(), tok.cfg, tok.decoder.sizes, str(tmp_path))
    requested = TokenizerConfig()  # the paper preset: only its training choices may apply
    requested.encoder.cos_weight, requested.encoder.finetune = 0.0, "last:1"
    requested.flow.t_sampler = "uniform"
    cfg = finetune_config(requested, tok.cfg)
    assert cfg.decoder == tok.cfg.decoder and cfg.encoder.img_size == tok.cfg.encoder.img_size
    assert (cfg.encoder.cos_weight, cfg.encoder.finetune, cfg.flow.t_sampler) == (
        0.0,
        "last:1",
        "uniform",
    )
    task = TokenizerTask(cfg, torch.device("cpu"), init_from=str(tmp_path))
    assert task.model.training and task.model.cfg is cfg
    for k, v in tok.state_dict().items():
        assert torch.equal(task.model.state_dict()[k], v), k
    trainable = {n for n, p in task.model.encoder.vit.named_parameters() if p.requires_grad}
    assert "cls_token" in trainable and any(n.startswith("blocks.1.") for n in trainable)
    assert not any(n.startswith("blocks.0.") for n in trainable)
