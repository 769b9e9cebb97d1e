"""The self-supervised ViT encoder whose `[cls]` output is the image's single token.

Faithful to RepTok: every encoder weight is frozen except the input `[cls]` embedding
(`cls_token`, D numbers); the token is the final LayerNorm'ed `[cls]` output; a frozen copy of
the original encoder provides z_frozen for the cosine regulariser λ·(1 − cos(z, z_frozen)).
Ablations: random init, fine-tuning the full encoder or its last N blocks, or nothing at all.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from reptok_core.config import opt
from reptok_core.weights import load_state_dict_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EncoderConfig:
    timm_name: str = opt(
        "vit_base_patch14_reg4_dinov2", "timm ViT with registers (the paper: DINOv2-B/14 reg4)"
    )
    img_size: int = opt(224, "encoder input side; images are center-cropped and resized to it")
    arch: dict[str, Any] = opt(
        {}, "timm.create_model overrides: embed_dim, depth, num_heads, patch_size…"
    )
    weights: str = opt(
        "hub",
        "'hub' (timm pretrained), 'random', 'builtin:NAME' (shipped in reptok_core/pretrained), "
        "or a file / s3:// URI (timm or official DINOv2 layout)",
    )
    finetune: str = opt(
        "cls", "'cls' (the paper: [cls] embedding only), 'full', 'last:N' blocks, 'none'"
    )
    cos_weight: float = opt(
        0.1, "λ of the cosine regulariser λ·(1 − cos(z, z_frozen)); 0 disables it"
    )


def build_vit(cfg: EncoderConfig) -> nn.Module:
    """A timm ViT with registers, with weights from the hub, a file / URI, or random init."""
    pretrained = cfg.weights == "hub"
    model = timm.create_model(
        cfg.timm_name, pretrained=pretrained, img_size=cfg.img_size, num_classes=0, **cfg.arch
    )
    if cfg.weights not in ("hub", "random"):
        load_vit_weights(model, cfg.weights)
    return model


def _is_official_dinov2(sd: dict[str, torch.Tensor]) -> bool:
    return "register_tokens" in sd or "mask_token" in sd


def convert_official_dinov2(
    sd: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Official facebookresearch/dinov2 keys -> timm layout, preserving the function exactly.

    DINOv2 adds pos_embed[0] to the [cls] token and keeps registers un-embedded; timm's
    `no_embed_class` ViT has no [cls] position, so we fold that position into the cls_token.
    """
    out: dict[str, torch.Tensor] = {}
    pos = sd["pos_embed"]
    n_prefix_pos = pos.shape[1] - _grid_tokens(pos.shape[1] - 1)
    for k, v in sd.items():
        if k in ("mask_token", "pos_embed"):
            continue
        k = k.replace("register_tokens", "reg_token")
        k = k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[k] = v
    if n_prefix_pos == 1:
        out["cls_token"] = sd["cls_token"] + pos[:, :1]
        pos = pos[:, 1:]
    out["pos_embed"] = _resample_grid(pos, model.pos_embed.shape[1])
    return out


def _grid_tokens(n: int) -> int:
    side = int(round(n**0.5))
    return side * side if side * side == n else n + 1


def _resample_grid(pos: torch.Tensor, n_target: int) -> torch.Tensor:
    if pos.shape[1] == n_target:
        return pos
    src, dst = int(round(pos.shape[1] ** 0.5)), int(round(n_target**0.5))
    grid = pos.reshape(1, src, src, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False, antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(1, dst * dst, -1).to(pos.dtype)


def load_vit_weights(model: nn.Module, uri: str) -> None:
    """Load a timm-layout or official-DINOv2-layout state dict from a file or s3:// URI."""
    sd = load_state_dict_file(uri)
    for prefix in ("teacher.backbone.", "student.backbone.", "backbone.", "module."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if _is_official_dinov2(sd):
        sd = convert_official_dinov2(sd, model)
    elif "pos_embed" in sd:
        sd["pos_embed"] = _resample_grid(sd["pos_embed"], model.pos_embed.shape[1])
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(
            f"encoder weights {uri!r} do not match the ViT: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )


class Preprocess(nn.Module):
    """[-1, 1] images (any square-or-not size) -> the encoder's normalised input, as the
    official RepTok encoder resizes: centre crop to a square (torchvision's rounding of the
    offset), average-pool by side // size when that is >= 2, then bilinear to the encoder's
    size WITHOUT antialiasing, then ImageNet mean/std. The same 256-px image gives a token 12%
    away (relative) under an antialiased resize, so this is part of the model.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = min(h, w)
        if h != w:
            top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
            x = x[..., top : top + s, left : left + s]
        factor = s // self.size
        if factor > 1:
            x = F.avg_pool2d(x, factor)
        if x.shape[-1] != self.size:
            x = F.interpolate(
                x,
                size=(self.size, self.size),
                mode="bilinear",
                antialias=False,
                align_corners=False,
            )
        x = (x + 1) / 2
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def set_trainable(vit: nn.Module, finetune: str) -> None:
    """Freeze the ViT except what `finetune` names ('cls', 'full', 'last:N', 'none')."""
    for p in vit.parameters():
        p.requires_grad_(False)
    if finetune == "none":
        return
    if finetune == "full":
        for p in vit.parameters():
            p.requires_grad_(True)
        return
    vit.cls_token.requires_grad_(True)
    if finetune == "cls":
        return
    if finetune.startswith("last:"):
        n = int(finetune.split(":", 1)[1])
        for blk in list(vit.blocks)[len(vit.blocks) - n :]:
            for p in blk.parameters():
                p.requires_grad_(True)
        for p in vit.norm.parameters():
            p.requires_grad_(True)
        return
    raise ValueError(f"encoder.finetune={finetune!r}; expected cls, full, last:N or none")


class SSLEncoder(nn.Module):
    """Trainable encoder + frozen target copy; `forward` gives z, `target` gives z_frozen."""

    def __init__(self, cfg: EncoderConfig, vit: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.vit = vit if vit is not None else build_vit(cfg)
        self.vit.reset_classifier(0)
        # The target is the encoder as loaded, before any update: deep-copied, frozen, eval.
        self.frozen = copy.deepcopy(self.vit).eval().requires_grad_(False)
        set_trainable(self.vit, cfg.finetune)
        self.preprocess = Preprocess(cfg.img_size)
        self.dim = self.vit.embed_dim

    def train(self, mode: bool = True) -> SSLEncoder:
        super().train(mode)
        # Frozen parts have no dropout / drop-path to toggle, but keep the target in eval always.
        self.frozen.eval()
        return self

    def _token(self, vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return vit.forward_features(self.preprocess(images))[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._token(self.vit, images)

    @torch.no_grad()
    def target(self, images: torch.Tensor) -> torch.Tensor:
        return self._token(self.frozen, images)


def cosine_loss(z: torch.Tensor, z_frozen: torch.Tensor, weight: float) -> torch.Tensor:
    """λ · (1 − cos(z, z_frozen)), averaged over the batch."""
    return weight * (1 - F.cosine_similarity(z.float(), z_frozen.float(), dim=-1)).mean()
