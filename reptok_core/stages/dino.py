"""Stage 0: DINO-style self-distillation that pretrains the tokenizer's SSL encoder from scratch.

Written from the DINO paper's description (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers"): a student ViT sees every crop of an image (2 global +
N local), a teacher ViT — an exponential moving average of the student, never trained by
gradients — sees the global crops only; the student matches the teacher's sharpened, centred
distribution over K prototypes with a cross-entropy summed over (teacher crop, other crop) pairs.

The backbones are built exactly like the tokenizer's encoder (`encoder.build_vit`), so the
teacher backbone exported by `save_teacher` loads into `SSLEncoder` the way DINOv2 does.
Pure PyTorch: the Ray pipeline (pipelines/pretrain_encoder.py) and a notebook both drive it.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors_bytes

from reptok_core.config import opt, section, to_dict
from reptok_core.models.encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderConfig,
    Preprocess,
    build_vit,
)
from reptok_core.storage import join, write_bytes_atomic

EXPORT_WEIGHTS = "encoder.safetensors"
EXPORT_CONFIG = "encoder.json"


@dataclass
class DinoConfig:
    encoder: EncoderConfig = section(
        lambda: EncoderConfig(weights="random"),
        "the backbone: same fields as the tokenizer's encoder; stage 0 trains it from scratch "
        "(weights='random')",
    )
    local_crops: int = opt(6, "local crops per image (besides the 2 global crops)")
    local_size: int = opt(0, "local crop side in px (0 = half the encoder's img_size)")
    global_scale: list[float] = opt([0.35, 1.0], "area range of the global random-resized crops")
    local_scale: list[float] = opt([0.1, 0.35], "area range of the local random-resized crops")
    jitter: float = opt(0.4, "colour jitter strength (brightness, contrast, saturation ±jitter)")
    jitter_prob: float = opt(0.8, "probability that a crop is colour-jittered")
    grey_prob: float = opt(0.2, "probability that a crop is turned grey")
    drop_path: float = opt(0.1, "stochastic depth of the student (the teacher has none)")
    head_hidden: int = opt(2048, "hidden width of the 3-layer DINO head MLP")
    head_bottleneck: int = opt(256, "bottleneck width before the prototypes")
    prototypes: int = opt(65536, "K, number of weight-normalised prototypes (output dim)")
    student_temp: float = opt(0.1, "student softmax temperature")
    teacher_temp: float = opt(0.04, "teacher softmax temperature after warm-up (sharpening)")
    warmup_teacher_temp: float = opt(0.04, "teacher temperature at step 0")
    teacher_temp_warmup_steps: int = opt(0, "steps of linear teacher-temperature warm-up")
    center_momentum: float = opt(0.9, "EMA momentum of the centre of teacher outputs")
    momentum: float = opt(0.996, "teacher EMA momentum at step 0 (cosine-raised to momentum_final)")
    momentum_final: float = opt(1.0, "teacher EMA momentum at the last step")
    freeze_prototypes_steps: int = opt(
        0, "steps during which the prototypes get no gradient (stabilises the start)"
    )
    total_steps: int = opt(0, "length of the schedules (the pipeline fills it from loop.steps)")


# ----------------------------------------------------------------------------- augmentation


def to_unit_images(batch: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1]; float (B, 3, H, W) in [-1, 1] too."""
    if batch.dtype == torch.uint8:
        return batch.permute(0, 3, 1, 2).float() / 255
    return (batch.float() + 1) / 2


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
) -> torch.Tensor:
    """One random crop (area fraction in `scale`, aspect in `ratio`) per image, resized to
    `size`, randomly mirrored; all images at once through one affine sampling grid."""
    b, dev = x.shape[0], x.device
    area = torch.empty(b, device=dev).uniform_(*scale)
    log_r = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)  # fractions of the side
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)  # keep the crop inside the image
    cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, device=dev) < flip_prob, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def colour_jitter(x: torch.Tensor, strength: float, prob: float, grey_prob: float) -> torch.Tensor:
    """Brightness, contrast, saturation (each ×U[1±strength]) with probability `prob`, then grey
    with probability `grey_prob`; per image, vectorised. Grey inputs only see the first two."""
    b, dev = x.shape[0], x.device

    def factor() -> torch.Tensor:
        f = torch.empty(b, 1, 1, 1, device=dev).uniform_(1 - strength, 1 + strength)
        on = torch.rand(b, 1, 1, 1, device=dev) < prob
        return torch.where(on, f, torch.ones_like(f))

    x = x * factor()
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    g = _grey(x)
    x = (x - g) * factor() + g
    to_grey = torch.rand(b, 1, 1, 1, device=dev) < grey_prob
    return torch.where(to_grey, _grey(x), x).clamp(0, 1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> ImageNet mean/std, the input convention of `encoder.Preprocess`."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def multi_crop(images: torch.Tensor, cfg: DinoConfig) -> list[torch.Tensor]:
    """[global crops (2B, 3, S, S), local crops (N·B, 3, s, s)] — crops of one resolution are
    stacked view-major (crop 0 of every image, then crop 1, …) so `chunk` recovers the views."""
    x = to_unit_images(images)
    size = cfg.encoder.img_size
    local = cfg.local_size or max(size // 2, cfg.encoder.arch.get("patch_size", 14))

    def view(side: int, scale: list[float]) -> torch.Tensor:
        crop = random_resized_crop(x, side, (scale[0], scale[1]))
        return normalise(colour_jitter(crop, cfg.jitter, cfg.jitter_prob, cfg.grey_prob))

    out = [torch.cat([view(size, cfg.global_scale) for _ in range(2)])]
    if cfg.local_crops > 0:
        out.append(torch.cat([view(local, cfg.local_scale) for _ in range(cfg.local_crops)]))
    return out


# ----------------------------------------------------------------------------- model


class DinoHead(nn.Module):
    """[cls] -> 3-layer MLP -> L2-normalised bottleneck -> cosine scores against K prototypes.

    The prototypes are weight-normalised with the norm fixed to 1 (DINO freezes weight_norm's
    g at 1), written directly as a row-normalised matrix so the parameter stays a plain tensor.
    """

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor, freeze_prototypes: bool = False) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        w = self.prototypes.detach() if freeze_prototypes else self.prototypes
        return x @ F.normalize(w, dim=-1).t()


def build_backbone(cfg: EncoderConfig, drop_path: float = 0.0) -> nn.Module:
    """The tokenizer's ViT (`build_vit`), accepting local crops of another size.

    `dynamic_img_size` only interpolates the position table at forward time; the parameters and
    their names are those of `build_vit(cfg)`, so the state dict loads there unchanged.
    """
    arch = {**cfg.arch, "dynamic_img_size": True, "drop_path_rate": drop_path}
    vit = build_vit(replace(cfg, arch=arch))
    vit.reset_classifier(0)
    return vit


class Dino(nn.Module):
    """Student (backbone + head, trained) and teacher (its EMA, no gradients) plus the centre.

    Parameter names `student.backbone.*` / `teacher.backbone.*` are the ones
    `encoder.load_vit_weights` strips, so even a raw checkpoint loads as an encoder.
    """

    def __init__(self, cfg: DinoConfig):
        super().__init__()
        self.cfg = cfg
        backbone = build_backbone(cfg.encoder, cfg.drop_path)
        head = DinoHead(backbone.embed_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.prototypes)
        self.student = nn.ModuleDict(dict(backbone=backbone, head=head))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        for m in self.teacher.modules():  # the teacher never drops paths
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
        self.register_buffer("center", torch.zeros(1, cfg.prototypes))
        # The schedules' position lives in the model so checkpoints restore it with the weights.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # A host copy of `step` for the schedules: reading the device buffer every step would
        # stall the CPU on the GPU and leave a small ViT launch-bound.
        self.host_step = 0
        self.register_load_state_dict_post_hook(_sync_host_step)
        self.teacher.eval()

    def train(self, mode: bool = True) -> Dino:
        super().train(mode)
        self.teacher.eval()
        return self

    @staticmethod
    def features(branch: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm'ed [cls] output — exactly the tokenizer's token z."""
        return branch["backbone"].forward_features(x)[:, 0]

    def teacher_temp(self) -> float:
        c, s = self.cfg, self.host_step
        if s >= c.teacher_temp_warmup_steps:
            return c.teacher_temp
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * (
            s / c.teacher_temp_warmup_steps
        )

    def momentum(self) -> float:
        """Cosine schedule from cfg.momentum to cfg.momentum_final over total_steps."""
        c = self.cfg
        progress = min(self.host_step / max(c.total_steps, 1), 1.0)
        return (
            c.momentum_final
            - (c.momentum_final - c.momentum) * (math.cos(math.pi * progress) + 1) / 2
        )

    def loss(self, crops: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cross-entropy H(teacher(g_i), student(v)) over every pair with v ≠ g_i, averaged."""
        freeze = self.host_step < self.cfg.freeze_prototypes_steps
        head = self.student["head"]
        s_out = torch.cat(
            [head(self.features(self.student, c), freeze_prototypes=freeze) for c in crops]
        )
        with torch.no_grad():
            t_out = self.teacher["head"](self.features(self.teacher, crops[0])).float()
            t_prob = F.softmax((t_out - self.center) / self.teacher_temp(), dim=-1)
        s_logp = F.log_softmax(s_out.float() / self.cfg.student_temp, dim=-1)
        n_views = s_out.shape[0] // (t_out.shape[0] // 2)
        t_views, s_views = t_prob.chunk(2), s_logp.chunk(n_views)
        total, pairs = s_out.new_zeros((), dtype=torch.float32), 0
        for i, t in enumerate(t_views):
            for v, s in enumerate(s_views):
                if v != i:
                    total = total - (t * s).sum(-1).mean()
                    pairs += 1
        loss = total / pairs
        self.update_center(t_out)
        with torch.no_grad():
            entropy = -(t_prob * t_prob.clamp_min(1e-12).log()).sum(-1).mean()
        return {"total": loss, "dino": loss.detach(), "teacher_entropy": entropy}

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the mean teacher output over the global batch (all ranks): centring keeps
        one prototype from dominating, sharpening keeps the output from going uniform."""
        mean = teacher_out.mean(0, keepdim=True)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        self.center.lerp_(mean, 1 - self.cfg.center_momentum)

    @torch.no_grad()
    def update_teacher(self, step: int) -> None:
        """teacher ← m·teacher + (1−m)·student, m from the momentum schedule at `step`."""
        self.step.fill_(step)
        self.host_step = step
        m = self.momentum()
        for pt, ps in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            pt.lerp_(ps.detach().to(pt.dtype), 1 - m)


def _sync_host_step(module: Dino, incompatible_keys) -> None:
    del incompatible_keys
    module.host_step = int(module.step)


# ----------------------------------------------------------------------------- k-NN probe


@torch.no_grad()
def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Weighted k-NN classifier on cosine similarity (votes weighted by exp(sim / T))."""
    train = F.normalize(train_feats.float(), dim=-1)
    test = F.normalize(test_feats.float(), dim=-1)
    k = min(k, train.shape[0])
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    sims, idx = (test @ train.t()).topk(k, dim=-1)
    votes = torch.zeros(test.shape[0], n_classes, device=test.device)
    votes.scatter_add_(1, train_labels.to(test.device)[idx], (sims / temperature).exp())
    return (votes.argmax(-1) == test_labels.to(test.device)).float().mean().item()


# ----------------------------------------------------------------------------- export


def teacher_backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full `Dino` state dict -> the teacher backbone in timm layout (`cls_token`, `blocks.*`)."""
    prefix = "teacher.backbone."
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ValueError("state dict has no teacher.backbone.* entries")
    return out


def save_teacher(state: dict[str, torch.Tensor], uri: str, fp16: bool = False) -> None:
    """Write the teacher backbone as a timm-layout safetensors file (fp16 halves the size)."""
    sd = teacher_backbone_state(state)
    sd = {k: (v.half() if fp16 else v.float()).contiguous().cpu() for k, v in sd.items()}
    write_bytes_atomic(uri, save_safetensors_bytes(sd))


def save_encoder_export(
    state: dict[str, torch.Tensor],
    cfg: DinoConfig,
    uri: str,
    fp16: bool = False,
    extra: dict[str, Any] | None = None,
) -> EncoderConfig:
    """`uri/encoder.safetensors` + `uri/encoder.json` (the EncoderConfig that loads it, plus
    `extra`: k-NN accuracy, command, run id). Returns that EncoderConfig."""
    weights = join(uri, EXPORT_WEIGHTS)
    save_teacher(state, weights, fp16=fp16)
    enc = replace(cfg.encoder, weights=weights, arch=dict(cfg.encoder.arch))
    meta = {"encoder": to_dict(enc), "dino": to_dict(cfg), "fp16": fp16, **(extra or {})}
    write_bytes_atomic(join(uri, EXPORT_CONFIG), json.dumps(meta, indent=2).encode())
    return enc


def export_encoder(
    state: dict[str, torch.Tensor],
    cfg: DinoConfig,
    uri: str,
    fp16: bool = False,
    extra: dict[str, Any] | None = None,
    probe: ProbeSet | None = None,
    queries: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Export, then reload the file through `SSLEncoder` (as the tokenizer will) and record its
    k-NN accuracy in the JSON, so the number describes exactly the shipped weights."""
    from reptok_core.models.encoder import SSLEncoder

    enc_cfg = save_encoder_export(state, cfg, uri, fp16=fp16, extra=extra)
    meta = {"encoder": to_dict(enc_cfg), "dino": to_dict(cfg), "fp16": fp16, **(extra or {})}
    if probe is not None and queries is not None:
        encoder = SSLEncoder(enc_cfg).eval()

        def encode(images: torch.Tensor) -> torch.Tensor:
            x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.no_grad():
                return torch.cat([encoder(c) for c in x.split(probe.batch)])

        feats = encode(probe.bank_images)
        q_images, q_labels = queries
        meta["knn_accuracy"] = knn_accuracy(
            feats, probe.bank_labels, encode(q_images), torch.as_tensor(q_labels), k=probe.k
        )
        meta["knn"] = {"k": probe.k, "bank": len(probe.bank_labels), "queries": len(q_labels)}
        write_bytes_atomic(join(uri, EXPORT_CONFIG), json.dumps(meta, indent=2).encode())
    return meta


# ----------------------------------------------------------------------------- training task


@dataclass
class ProbeSet:
    """Labelled images for the k-NN probe: a bank to vote and held-out queries."""

    bank_images: torch.Tensor
    bank_labels: torch.Tensor
    k: int = 20
    batch: int = 256


class DinoTask:
    """The training-loop task (reptok_core/training/loop.py) of stage 0.

    The loop's own EMA tracks the student and is harmless here; what matters is `after_step`,
    which moves the teacher after every optimiser step, and the teacher is what is exported.
    """

    def __init__(self, cfg: DinoConfig, device: torch.device, probe: ProbeSet | None = None):
        self.cfg = cfg
        self.device = device
        self.model = Dino(cfg).to(device)
        self.probe = probe
        self.preprocess = Preprocess(cfg.encoder.img_size).to(device)

    def shard(self) -> None:
        """Small ViTs stay replicated: the loop all-reduces the grads of unsharded parameters
        (data parallel), and the teacher EMA then sees identical students on every rank."""

    def blocks(self) -> list[nn.Module]:
        return list(self.model.student["backbone"].blocks)

    def loss(self, batch: dict[str, Any], flip: bool = True) -> dict[str, torch.Tensor]:
        del flip  # the crops mirror at random themselves
        images = batch["image"].to(self.device, non_blocking=True)
        return self.model.loss(multi_crop(images, self.cfg))

    def after_step(self, step: int) -> None:
        self.model.update_teacher(step)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher tokens of (B, H, W, 3) uint8 images, through the tokenizer's preprocessing."""
        feats = []
        for i in range(0, images.shape[0], 256):
            x = images[i : i + 256].to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            feats.append(Dino.features(self.model.teacher, self.preprocess(x)).float())
        return torch.cat(feats)

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any], steps: int = 0) -> tuple[dict[str, float], None]:
        """k-NN accuracy of the teacher's token on the held-out batch against the probe bank."""
        del steps
        metrics = {"center_norm": self.model.center.norm().item()}
        if self.probe is not None and "label" in batch:
            acc = knn_accuracy(
                self.encode(self.probe.bank_images),
                self.probe.bank_labels,
                self.encode(batch["image"]),
                torch.as_tensor(batch["label"]),
                k=self.probe.k,
            )
            metrics["knn_acc"] = acc
        return metrics, None
