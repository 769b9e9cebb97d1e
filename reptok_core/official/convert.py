"""The official RepTok checkpoint (CompVis/RepTok `reptok-xl-600k-ImageNet.ckpt`) mapped onto
this project's models, weight for weight.

The release is a Lightning checkpoint of the official generator trainer. Its state dict holds
  first_stage.decoder.decoder.*   the tokenizer: the fine-tuned DINOv2 (`encoder.dino.model`),
                                  its frozen target (`encoder.dino.target_model`), the token
                                  path (`temp_pos_embed`, `new_reg`, `backbone` projection), the
                                  decoder (`backbone.*`, `time_emb`, `time_in_proj`, `mapping`)
                                  and the SD-VAE (`ae.ae.*`, diffusers layout);
  first_stage.encoder.encoder.*   a bf16 copy of the fine-tuned DINOv2 (used by their `encode`);
  model.net.* / ema_model.net.*   the class-conditional MLP-Mixer (raw / EMA);
  metric_tracker.*                their FID network (skipped).
Sizes that the weights do not record (the encoder's input size and head count, the VAE's
GroupNorm groups, the image size) come from the hyper-parameters or the official defaults.
Dropped on purpose: `new_reg` (two extra tokens whose outputs the official model discards:
they cannot change the decoder's input) and the RoPE frequency table (a fixed function of the
sizes; checked against ours instead of copied).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from reptok_core.formats.token_stats import TokenNormalizer
from reptok_core.models.decoder import DecoderConfig, axial_rope_angles
from reptok_core.models.encoder import EncoderConfig, convert_official_dinov2
from reptok_core.models.generator import GeneratorConfig
from reptok_core.models.latent_space import SD_VAE_FT_MSE, LatentSpaceConfig, SDVAESpace
from reptok_core.models.mixer import mixer_from_official
from reptok_core.models.tokenizer import Tokenizer, TokenizerConfig
from reptok_core.official.checkpoint import OfficialCheckpointError

FIRST_STAGE = "first_stage.decoder.decoder."
DINO = FIRST_STAGE + "encoder.dino."


@dataclass
class EncoderSizes:
    """What the DINOv2 weights do not record. The release: DINOv2-B/14 reg at 224 px, whose
    heads are 64 channels wide."""

    img_size: int = 224
    num_heads: int = 0  # 0: embed_dim // 64, DINOv2's head size


@dataclass
class OfficialTokenizer:
    config: TokenizerConfig
    sizes: dict[str, int]  # the decoder's derived sizes (Decoder.sizes)
    state: dict[str, torch.Tensor]  # this project's Tokenizer keys, incl. latent_space.vae.*
    vae_config: dict = field(default_factory=dict)


def _take(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _need(part: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in part:
        raise OfficialCheckpointError(f"official checkpoint lacks {what} ({key!r})")
    return part[key]


def _count(part: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in part if (m := rx.match(k))})


def encoder_config(dino: dict[str, torch.Tensor], sizes: EncoderSizes) -> EncoderConfig:
    """A timm DINOv2-with-registers config of the official ViT's shape."""
    patch = _need(dino, "patch_embed.proj.weight", "the DINOv2 patch embedding")
    dim, p = patch.shape[0], patch.shape[-1]
    regs = dino["register_tokens"].shape[1] if "register_tokens" in dino else 0
    depth = _count(dino, r"blocks\.(\d+)\.")
    mlp_ratio = dino["blocks.0.mlp.fc1.weight"].shape[0] / dim
    heads = sizes.num_heads or dim // 64
    arch = dict(patch_size=p, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio)
    if (dim, depth, heads, p, mlp_ratio) == (768, 12, 12, 14, 4.0):
        arch = {}  # exactly timm's DINOv2-B/14
    if regs != 4:
        arch["reg_tokens"] = regs
    return EncoderConfig(
        timm_name="vit_base_patch14_reg4_dinov2",
        img_size=sizes.img_size,
        arch=arch,
        weights="random",
        finetune="cls",
    )


def decoder_config(part: dict[str, torch.Tensor], latent_channels: int) -> DecoderConfig:
    """The decoder's own sizes; its token and latent sizes follow from the encoder and VAE."""
    merge = _need(part, "backbone.mid_merge.pre_proj.proj.weight", "the decoder's patch merge")
    width = merge.shape[0]
    patch = math.isqrt(merge.shape[1] // latent_channels)
    heads = _need(part, "backbone.mid_level.0.self_attn.scale", "decoder layer 0").shape[0]
    ff = part["backbone.mid_level.0.ff.up_proj.weight"].shape[0] // 2
    mapping_width = _need(part, "time_in_proj.weight", "the time projection").shape[0]
    mapping_ff = part["mapping.blocks.0.up_proj.weight"].shape[0] // 2
    if ff * mapping_width != mapping_ff * width:
        raise OfficialCheckpointError(
            f"decoder SwiGLU ratio {ff / width} differs from the mapping's {mapping_ff / mapping_width}"
        )
    return DecoderConfig(
        patch_size=patch,
        width=width,
        depth=_count(part, r"backbone\.mid_level\.(\d+)\."),
        head_dim=width // heads,
        ff_ratio=ff // width,
        mapping_width=mapping_width,
        mapping_depth=_count(part, r"mapping\.blocks\.(\d+)\."),
    )


def decoder_state(part: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Official first-stage keys (prefix removed) -> `Decoder` keys."""
    out = {
        "token_proj.offset": part["encoder.dino.temp_pos_embed"].reshape(-1),
        "token_proj.linear.weight": part["encoder.dino.backbone.fc.weight"],
        "token_proj.linear.bias": part["encoder.dino.backbone.fc.bias"],
        "token_proj.norm.weight": part["encoder.dino.backbone.ln.weight"],
        "token_proj.norm.bias": part["encoder.dino.backbone.ln.bias"],
        "patch_merge.weight": part["backbone.mid_merge.pre_proj.proj.weight"],
        "in_proj.weight": part["backbone.mid_merge.proj.weight"],
        "out_norm.weight": part["backbone.mid_split.post_proj.norm.scale"],
        "out_proj.weight": part["backbone.mid_split.post_proj.proj.weight"],
        "time.fourier": part["time_emb.weight"],
        "time.in_proj.weight": part["time_in_proj.weight"],
        "time.in_norm.weight": part["mapping.in_norm.scale"],
        "time.out_norm.weight": part["mapping.out_norm.scale"],
    }
    for j in range(cfg.mapping_depth):
        src, dst = f"mapping.blocks.{j}.", f"time.blocks.{j}."
        out[dst + "norm.weight"] = part[src + "norm.scale"]
        out[dst + "ff.up.weight"] = part[src + "up_proj.weight"]
        out[dst + "ff.down.weight"] = part[src + "down_proj.weight"]
    for i in range(cfg.depth):
        src, dst = f"backbone.mid_level.{i}.", f"blocks.{i}."
        out[dst + "attn_norm.linear.weight"] = part[src + "self_attn.norm.linear.weight"]
        out[dst + "qkv.weight"] = part[src + "self_attn.qkv_proj.weight"]
        out[dst + "scale"] = part[src + "self_attn.scale"]
        out[dst + "out.weight"] = part[src + "self_attn.out_proj.weight"]
        out[dst + "ff_norm.linear.weight"] = part[src + "ff.norm.linear.weight"]
        out[dst + "ff.up.weight"] = part[src + "ff.up_proj.weight"]
        out[dst + "ff.down.weight"] = part[src + "ff.down_proj.weight"]
        _check_rope(part.get(src + "self_attn.pos_emb.freqs"), cfg, i)
    return out


def _check_rope(freqs: torch.Tensor | None, cfg: DecoderConfig, layer: int) -> None:
    """The official (2, heads, head_dim/8) frequency table must be the one ours computes."""
    if freqs is None:
        return
    heads = cfg.width // cfg.head_dim
    unit = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # angle = frequency at y = 1
    ours = axial_rope_angles(unit, heads, cfg.head_dim)[0, :, : cfg.head_dim // 8]
    if freqs.shape != (2, *ours.shape) or not torch.allclose(
        freqs.double(), ours.expand(2, -1, -1), rtol=1e-5
    ):
        raise OfficialCheckpointError(
            f"decoder layer {layer}: RoPE frequencies {tuple(freqs.shape)} differ from the "
            "official scheme this project implements"
        )


# diffusers renamed the VAE's attention weights; checkpoints saved before that use the old names.
_OLD_VAE_ATTENTION = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


def vae_state(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in part.items():
        for old, new in _OLD_VAE_ATTENTION.items():
            k = k.replace(old, new)
        out[k] = v
    return out


def tokenizer_from_official(
    sd: dict[str, torch.Tensor],
    image_size: int = 256,
    encoder_sizes: EncoderSizes | None = None,
    vae_config: dict | None = None,
    cos_weight: float = 0.1,
) -> OfficialTokenizer:
    """The official first stage as this project's `Tokenizer` (config + state dict)."""
    part = _take(sd, FIRST_STAGE)
    if not part:
        raise OfficialCheckpointError(f"no first-stage weights ({FIRST_STAGE}*) in the checkpoint")
    dino = _take(part, "encoder.dino.model.")
    target = _take(part, "encoder.dino.target_model.") or dino
    vae_cfg = dict(vae_config or SD_VAE_FT_MSE)
    vae_sd = vae_state(_take(part, "ae.ae."))
    if not vae_sd:
        raise OfficialCheckpointError("no SD-VAE weights (first_stage.decoder.decoder.ae.ae.*)")
    enc_cfg = encoder_config(dino, encoder_sizes or EncoderSizes())
    enc_cfg.cos_weight = cos_weight
    dec_cfg = decoder_config(part, vae_cfg["latent_channels"])
    cfg = TokenizerConfig(
        encoder=enc_cfg,
        decoder=dec_cfg,
        # The release trained on sd-vae-ft-mse; its weights travel in the export.
        latent=LatentSpaceConfig(kind="sd-vae", vae="stabilityai/sd-vae-ft-mse", sample=True),
        image_size=image_size,
    )
    # A model of that shape gives the ViT's target layout (pos_embed grid at img_size).
    shell = Tokenizer(cfg, latent_space=SDVAESpace.from_config(vae_cfg))
    state = {
        f"encoder.vit.{k}": v for k, v in convert_official_dinov2(dino, shell.encoder.vit).items()
    }
    state |= {
        f"encoder.frozen.{k}": v
        for k, v in convert_official_dinov2(target, shell.encoder.frozen).items()
    }
    try:
        dec_state = decoder_state(part, dec_cfg)
    except KeyError as e:
        raise OfficialCheckpointError(
            f"official checkpoint lacks {FIRST_STAGE}{e.args[0]} (decoder of {dec_cfg.depth} layers)"
        ) from None
    state |= {f"decoder.{k}": v for k, v in dec_state.items()}
    state |= {f"latent_space.vae.{k}": v for k, v in vae_sd.items()}
    _check_complete(shell, state, "tokenizer")
    return OfficialTokenizer(cfg, shell.decoder.sizes, state, vae_cfg)


def _check_complete(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or extra or shapes:
        raise OfficialCheckpointError(
            f"official {what} does not map onto this project's model: missing {missing[:5]}, "
            f"unexpected {extra[:5]}, shape mismatches {shapes[:5]}"
        )


@dataclass
class OfficialGenerator:
    config: GeneratorConfig
    sizes: dict[str, int]  # the mixer's token_dim (MixerGenerator.sizes)
    state: dict[str, torch.Tensor]  # MixerGenerator keys
    normalizer: TokenNormalizer


def _param(hparams: dict, *path: str):
    node = hparams
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise OfficialCheckpointError(f"hyper_parameters lack {'.'.join(path)}")
        node = node[key]
    return node


def first_stage_params(hparams: dict) -> dict:
    """`first_stage_cfg.params` of the release: image_size and the token `scale_factor`."""
    return _param(hparams, "first_stage_cfg", "params")


def generator_from_official(
    sd: dict[str, torch.Tensor], hparams: dict, ema: bool = True
) -> OfficialGenerator:
    """The official class-conditional MLP-Mixer (EMA weights by default) as this project's
    generator, with the official scalar token scaling and the paper's CFG (1.5 on [0.3, 0.9]
    in the generator's time; reptok_core/flow.py)."""
    prefix = "ema_model.net." if ema else "model.net."
    net = _take(sd, prefix)
    if not net:
        raise OfficialCheckpointError(f"no generator weights ({prefix}*) in the checkpoint")
    net_params = _param(hparams, "flow_cfg", "params", "net_cfg", "params")
    model = mixer_from_official(
        net, int(net_params["num_classes"]), float(net_params.get("class_dropout_prob", 0.1))
    )
    scale = float(first_stage_params(hparams)["scale_factor"])
    cfg = GeneratorConfig(kind="class", mixer=model.cfg, token_scale=scale)
    sampler = _param(hparams, "flow_cfg", "params").get("timestep_sampler") or {}
    if sampler.get("target", "").endswith("LogitNormalSampler"):
        p = sampler.get("params", {})
        cfg.flow.t_sampler = "logit_normal"
        cfg.flow.t_mean, cfg.flow.t_std = float(p.get("loc", 0.0)), float(p.get("scale", 1.0))
    normalizer = TokenNormalizer.scalar(model.token_dim, scale)
    return OfficialGenerator(cfg, model.sizes, model.state_dict(), normalizer)
