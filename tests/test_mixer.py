"""The class-conditional mixer as the official RepTok MLPMixer1D: its parts, its conventions,
the official key mapping, and the fused token-mixing kernel (CUDA only)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reptok_core import flow
from reptok_core.config import preset_section
from reptok_core.formats.token_stats import TokenNormalizer
from reptok_core.models import fused_token_mix as ftm
from reptok_core.models.generator import sample_tokens
from reptok_core.models.layers import MLP, SinusoidalTimeEmbedding
from reptok_core.models.mixer import (
    MixerBlock,
    MixerConfig,
    MixerGenerator,
    mixer_from_official,
    official_mixer_state_dict,
)
from reptok_core.official.checkpoint import load_official_checkpoint, official_parts

OFFICIAL = Path(__file__).parent / "fixtures" / "official"


def mixer(preset: str, token_dim: int) -> MixerGenerator:
    return MixerGenerator(preset_section(MixerConfig, preset, "model.mixer"), token_dim)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.1)  # the zero-init output layer would hide every difference
    return model


def test_sinusoidal_time_features_are_dits():
    t = torch.tensor([0.0, 0.3, 1.0])
    got = SinusoidalTimeEmbedding(8).features(t).double()
    k = torch.arange(128, dtype=torch.float64)
    angles = t.double()[:, None] * 10000.0 ** (-k / 128)[None]  # t in [0, 1], not x1000
    want = torch.cat([angles.cos(), angles.sin()], dim=-1)  # cosines first
    assert got.shape == (3, 256)
    assert torch.allclose(got, want, atol=1e-6)


def test_mlp_uses_exact_gelu():
    mlp = MLP(1, 1)
    with torch.no_grad():
        for lin in (mlp.fc1, mlp.fc2):
            lin.weight.fill_(1.0)
            lin.bias.zero_()
    x = torch.linspace(-3, 3, 61)[:, None]
    erf_gelu = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    # (PyTorch's vectorised CPU erf is good to ~5e-7 in GELU's tail; tanh's is off by 1e-4.)
    assert (mlp(x) - erf_gelu).abs().max() < 2e-6
    tanh_gelu = torch.nn.functional.gelu(x, approximate="tanh")
    assert (mlp(x) - tanh_gelu).abs().max() > 5e-5


def test_paper_preset_has_the_official_parameter_count():
    # The official MLPMixer1D(n_channels=1, channels=768, dim=1536, depth=28, expansion_factor=3,
    # expansion_factor_token=4, num_classes=1000) instantiated on 2026-12-01: 532,793,400.
    model = mixer("generator/paper", token_dim=768)  # DINOv2-B tokens
    assert sum(p.numel() for p in model.parameters()) == 532_793_400
    assert model.blocks[0].token_mix.fc1.weight.shape == (9, 3)  # 3 tokens x expansion 3


def test_forward_runs_the_official_generator_convention():
    model = randomised(mixer("generator/tiny", token_dim=32))
    seen = {}
    model.time_embed.register_forward_hook(lambda m, a, out: seen.update(s=a[0]))
    model.out.register_forward_hook(lambda m, a, out: seen.update(u=out))
    z, t, y = torch.randn(4, 32), torch.rand(4), torch.tensor([0, 3, 9, 10])
    v = model(z, t, y)
    # The network sees s = 1 - t (0 = noise) and predicts u = data - noise; forward returns
    # the flow's v = noise - data = -u.
    assert torch.allclose(seen["s"], 1 - t)
    assert torch.equal(v, -seen["u"])
    assert v.shape == (4, 32)


def official_keys(model: MixerGenerator) -> dict[str, torch.Tensor]:
    """Our weights under the official MLPMixer1D's names, as a torch.compile'd checkpoint has
    them (written from the official module's printed state-dict keys)."""
    sd = model.state_dict()
    depth = len(model.blocks)
    out = {
        "pos_embed": sd["pos_embed"],
        "label_embedder.embedding_table.weight": sd["class_embed.weight"],
        "mixer._orig_mod.0.weight": sd["proj_in.weight"],
        "mixer._orig_mod.0.bias": sd["proj_in.bias"],
        f"mixer._orig_mod.{depth + 1}.weight": sd["norm.weight"],
        f"mixer._orig_mod.{depth + 1}.bias": sd["norm.bias"],
        f"mixer._orig_mod.{depth + 2}.weight": sd["out.weight"],
        f"mixer._orig_mod.{depth + 2}.bias": sd["out.bias"],
    }
    for j in (0, 2):
        for leaf in ("weight", "bias"):
            out[f"t_embedder.mlp.{j}.{leaf}"] = sd[f"time_embed.mlp.{j}.{leaf}"]
    names = {
        "0.norm": "norm1",
        "0.fn.0": "token_mix.fc1",
        "0.fn.3": "token_mix.fc2",
        "1.norm": "norm2",
        "1.fn.0": "channel_mix.fc1",
        "1.fn.3": "channel_mix.fc2",
    }
    for i in range(depth):
        for theirs, ours in names.items():
            for leaf in ("weight", "bias"):
                v = sd[f"blocks.{i}.{ours}.{leaf}"]
                if theirs.startswith("0.fn") and leaf == "weight":
                    v = v[..., None]  # Conv1d(kernel_size=1)
                out[f"mixer._orig_mod.{i + 1}.{theirs}.{leaf}"] = v
    return out


def test_official_state_dict_maps_onto_ours():
    model = randomised(mixer("generator/tiny", token_dim=32))
    official = official_keys(model)
    assert len(official_mixer_state_dict(official)) == len(model.state_dict())
    again = mixer_from_official(official, num_classes=10)
    assert again.cfg == model.cfg and again.sizes == model.sizes
    z, t, y = torch.randn(5, 32), torch.rand(5), torch.tensor([0, 1, 2, 3, 10])
    assert torch.equal(again(z, t, y), model(z, t, y))


def test_official_state_dict_errors_name_the_problem():
    official = official_keys(mixer("generator/tiny", token_dim=32))
    with pytest.raises(ValueError, match="no counterpart.*metric_tracker"):
        official_mixer_state_dict({**official, "metric_tracker.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="null class"):
        mixer_from_official(official, num_classes=11)
    missing = {k: v for k, v in official.items() if k != "mixer._orig_mod.1.1.fn.3.bias"}
    with pytest.raises(ValueError, match="(?s)does not fit.*blocks.0.channel_mix.fc2.bias"):
        mixer_from_official(missing, num_classes=10)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_imported_official_mixer_matches_the_official_code():
    # Fixture: the official MLPMixer1D + FlowModel (CompVis/RepTok, random weights, fp32 CPU),
    # in a checkpoint saved like the release (tests/fixtures/official/official.json).
    ckpt = load_official_checkpoint(OFFICIAL / "reptok-tiny.ckpt")
    parts = official_parts(ckpt.state_dict).parts
    hp = ckpt.hyper_parameters
    net = hp["flow_cfg"]["params"]["net_cfg"]["params"]
    scale_factor = hp["first_stage_cfg"]["params"]["scale_factor"]
    io = load_file(OFFICIAL / "io.safetensors")
    x, s, y = io["mix.x"][:, 0], io["mix.t"], io["mix.y"]  # s: the official time, 0 = noise
    models = {}
    for part, key in (("generator", "mix.v_raw"), ("generator_ema", "mix.v_ema")):
        model = mixer_from_official(parts[part], net["num_classes"], net["class_dropout_prob"])
        models[part] = model.eval()
        with torch.no_grad():
            # official velocity = data - noise at official time s = -(ours at t = 1 - s)
            assert rel_err(-model(x, 1 - s, y), io[key][:, 0]) < 1e-4, part
    ema = models["generator_ema"]
    null = torch.full_like(y, ema.null_class)
    with torch.no_grad():
        v_c, v_u = -ema(x, 1 - s, y), -ema(x, 1 - s, null)
    assert rel_err(v_u, io["mix.v_uncond_ema"][:, 0]) < 1e-4
    assert rel_err(v_u + 1.5 * (v_c - v_u), io["mix.v_cfg_ema"][:, 0]) < 1e-4
    # 10 and 50 Euler steps with CFG 1.5 on the paper's interval [0.3, 0.9] (at 10 steps both
    # bounds are grid points; at 50, float32 linspace puts s_15 just below 0.3: not guided),
    # tokens scaled by the official scalar: denormalised = what their decode() feeds the decoder.
    for steps in (10, 50):
        tokens = sample_tokens(
            ema,
            TokenNormalizer.scalar(net["channels"], scale_factor),
            labels=io["gen.y"],
            scale=1.5,
            interval=(0.3, 0.9),
            steps=steps,
            noise=io["gen.noise"][:, 0],
        )
        assert rel_err(tokens / scale_factor, io[f"gen.tokens_{steps}"][:, 0]) < 1e-4, steps
        if steps == 10:
            assert rel_err(tokens, io["gen.tokens_10_unscaled"]) < 1e-4
    conventions = json.loads((OFFICIAL / "official.json").read_text())["conventions"]
    mask = conventions["cfg_guided_mask_50"]
    assert flow.Guidance(None, 1.5, (0.3, 0.9)).guided(50)[:50] == mask


def test_scalar_token_normalizer_is_the_official_division():
    z = torch.randn(7, 32) * 3
    norm = TokenNormalizer.scalar(32, 0.37)
    assert torch.equal(norm.normalize(z), z / 0.37)
    assert torch.allclose(norm.denormalize(norm.normalize(z)), z, atol=1e-6)
    with pytest.raises(ValueError, match="scale_factor"):
        TokenNormalizer.scalar(32, 0.0)


@pytest.mark.skipif(not torch.cuda.is_available() or ftm.triton is None, reason="needs CUDA")
@pytest.mark.parametrize("batch,hidden", [(4, 16), (4, 9), (64, 9), (300, 9)])
def test_fused_token_mix_matches_the_eager_block(batch, hidden):
    # batch <= 8 with a power-of-two hidden size takes the tile kernel, the rest the loop kernel.
    torch.manual_seed(0)
    block = MixerBlock(384, hidden, 4 * 384).cuda()
    with torch.no_grad():
        for p in block.token_mix.parameters():
            p.normal_(std=1.0)  # pre-activations of order 1-3: GELU's curved part
    x = torch.randn(batch, 3, 384, device="cuda")
    res = {}
    for fused in (False, True):
        MixerBlock.fused_token_mix = fused
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        grads = torch.autograd.grad(out.square().sum(), [xi, *block.token_mix.parameters()])
        res[fused] = [out, *grads]
    MixerBlock.fused_token_mix = True
    for name, a, b in zip(["out", "dx", "dw1", "db1", "dw2", "db2"], *res.values(), strict=True):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 1e-5, (name, rel)
