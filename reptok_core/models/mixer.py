"""Class-conditional token generator: the official RepTok MLP-Mixer (`MLPMixer1D` of
CompVis/RepTok), parameter for parameter.

Three tokens at the image-token dimension D: [noisy token + pos, class embedding, time
embedding] (classes + 1 null for CFG; DiT's sinusoidal time embedding) -> one shared
Linear(D -> width) -> blocks of pre-LayerNorm residual token mixing (an MLP across the 3 tokens,
3 x token_expansion hidden units) and channel mixing (an MLP of width x channel_expansion) ->
LayerNorm -> Linear(width -> D) on the first token. GELU is the exact (erf) one.

Time and velocity follow the official generator: the network sees s = 1 - t (s = 0 at noise)
and predicts data - noise; `forward` takes and returns the flow's own t and velocity
(reptok_core/flow.py, where all conventions are written down), so an imported official mixer
works unchanged. `official_mixer_state_dict` maps an official state dict onto this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from reptok_core.config import opt
from reptok_core.models import fused_token_mix as ftm
from reptok_core.models.layers import MLP, SinusoidalTimeEmbedding

N_TOKENS = 3  # [image token, class, time]


@dataclass
class MixerConfig:
    """The mixer's own sizes; the token dimension D is the data's (`MixerGenerator` token_dim)."""

    width: int = opt(1536, "mixer width (paper XL: 1536 x 28 blocks = 533M parameters)")
    depth: int = opt(28, "mixer blocks")
    token_expansion: float = opt(
        3.0, "token-mixing MLP hidden size = int(3 tokens x this) (official expansion_factor)"
    )
    channel_expansion: float = opt(
        4.0,
        "channel-mixing MLP hidden size as a multiple of width (official expansion_factor_token)",
    )
    num_classes: int = opt(1000, "classes; label num_classes is the null class used by CFG")
    class_dropout: float = opt(0.1, "label dropout that trains the null class (CFG)")

    @property
    def token_hidden(self) -> int:
        return int(N_TOKENS * self.token_expansion)

    @property
    def channel_hidden(self) -> int:
        return int(self.width * self.channel_expansion)


class MixerBlock(nn.Module):
    # On CUDA the token-mixing MLP runs as the fused Triton kernels of
    # reptok_core/models/fused_token_mix.py (same function, 1.45x faster training step on an H200,
    # benchmarks/NOTES.md); False keeps the two matmuls everywhere.
    fused_token_mix = True

    def __init__(self, width: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.token_mix = MLP(N_TOKENS, token_hidden)  # official: Conv1d(3, H, 1) over tokens
        self.norm2 = nn.LayerNorm(width)
        self.channel_mix = MLP(width, channel_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        mlp = self.token_mix
        if self.fused_token_mix and ftm.available(y, N_TOKENS, mlp.fc1.out_features):
            w1, b1, w2, b2 = mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
            x = x + torch.ops.reptok.token_mix(y, w1, b1, w2, b2).to(x.dtype)
        else:
            x = x + self.token_mix(y.transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mix(self.norm2(x))


class MixerGenerator(nn.Module):
    """v_θ(z_t, t | y) for normalised tokens z (B, D), labels y (B,) with y == num_classes = null;
    t and v in the flow's convention (t = 1 at noise, v = noise - data). `token_dim` is D, the
    tokens' dimension (the tokenizer's encoder width)."""

    def __init__(self, cfg: MixerConfig, token_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_dim = token_dim
        d, w = token_dim, cfg.width
        # Initialised as the official module is (N(0, 1) position and label embeddings, PyTorch
        # defaults elsewhere), except for the zero output layer: start at zero velocity.
        self.pos_embed = nn.Parameter(torch.randn(1, 1, d))
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d)
        self.time_embed = SinusoidalTimeEmbedding(d)
        self.proj_in = nn.Linear(d, w)  # shared by the three tokens
        self.blocks = nn.ModuleList(
            MixerBlock(w, cfg.token_hidden, cfg.channel_hidden) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(w)
        self.out = nn.Linear(w, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def sizes(self) -> dict[str, int]:
        """The sizes it was built with besides its config (an export records them)."""
        return {"token_dim": self.token_dim}

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Replace labels by the null class with probability class_dropout (training only)."""
        drop = torch.rand(y.shape, device=y.device) < self.cfg.class_dropout
        return torch.where(drop, torch.full_like(y, self.null_class), y)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = 1 - t.float()  # the official generator's time: 0 at noise
        dt = z_t.dtype
        x = z_t + self.pos_embed[:, 0].to(dt)
        tokens = torch.stack([x, self.class_embed(y).to(dt), self.time_embed(s).to(dt)], dim=1)
        h = self.proj_in(tokens)
        for block in self.blocks:
            h = block(h)
        # The final norm and projection act per token; only the image token's output is used.
        return -self.out(self.norm(h[:, 0]))  # official data - noise -> flow's noise - data


# The official MLPMixer1D's parameter names (its `mixer` is an nn.Sequential, torch.compile'd:
# `_orig_mod.` sits inside the keys) -> ours. Block i of `depth` is Sequential index i + 1; the
# input Linear is index 0, the final LayerNorm and Linear are depth + 1 and depth + 2.
_OFFICIAL_BLOCK = {
    "0.norm": "norm1",
    "0.fn.0": "token_mix.fc1",
    "0.fn.3": "token_mix.fc2",
    "1.norm": "norm2",
    "1.fn.0": "channel_mix.fc1",
    "1.fn.3": "channel_mix.fc2",
}
_OFFICIAL_EMBED = {
    "pos_embed": "pos_embed",
    "label_embedder.embedding_table.weight": "class_embed.weight",
    "t_embedder.mlp.0.weight": "time_embed.mlp.0.weight",
    "t_embedder.mlp.0.bias": "time_embed.mlp.0.bias",
    "t_embedder.mlp.2.weight": "time_embed.mlp.2.weight",
    "t_embedder.mlp.2.bias": "time_embed.mlp.2.bias",
}


def official_mixer_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official `MLPMixer1D` state dict (the keys under `model.net.` or `ema_model.net.` of a
    RepTok checkpoint, that prefix removed; `_orig_mod.` anywhere is dropped) -> this module's
    state dict. Conv1d(k=1) token-mixing weights lose their kernel axis. Raises ValueError
    naming the keys it cannot place."""
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
    depth = sum(1 for k in sd if re.fullmatch(r"mixer\.\d+\.0\.norm\.weight", k))
    ends = {0: "proj_in", depth + 1: "norm", depth + 2: "out"}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        m = re.fullmatch(r"mixer\.(\d+)\.(?:(.+)\.)?(weight|bias)", key)
        i = int(m.group(1)) if m else -1
        if key in _OFFICIAL_EMBED:
            out[_OFFICIAL_EMBED[key]] = value
        elif m and m.group(2) is None and i in ends:
            out[f"{ends[i]}.{m.group(3)}"] = value
        elif m and 1 <= i <= depth and m.group(2) in _OFFICIAL_BLOCK:
            conv = m.group(2).startswith("0.fn.") and m.group(3) == "weight"
            out[f"blocks.{i - 1}.{_OFFICIAL_BLOCK[m.group(2)]}.{m.group(3)}"] = (
                value.squeeze(-1) if conv else value
            )
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"official mixer state dict: keys with no counterpart {sorted(unknown)}")
    return out


def mixer_from_official(
    sd: dict[str, torch.Tensor], num_classes: int, class_dropout: float = 0.1
) -> MixerGenerator:
    """A MixerGenerator holding an official `MLPMixer1D`'s weights (state dict as for
    `official_mixer_state_dict`); sizes are read from the tensors' shapes. `num_classes` (the
    official `num_classes` hyper-parameter) checks that the label table has its null row."""
    ours = official_mixer_state_dict(sd)
    need = ("pos_embed", "class_embed.weight", "proj_in.weight", "blocks.0.norm1.weight")
    if missing := [k for k in need if k not in ours]:
        raise ValueError(f"official mixer state dict lacks {missing} (a class-conditional "
                         "MLPMixer1D has a label embedder, position embedding and blocks)")  # fmt: skip
    rows, d = ours["class_embed.weight"].shape
    if rows != num_classes + 1:
        raise ValueError(
            f"official label table has {rows} rows for num_classes={num_classes}; expected "
            f"{num_classes + 1} (the last is the null class: it exists only when the mixer was "
            "trained with class_dropout_prob > 0)"
        )
    if ours["pos_embed"].shape != (1, 1, d):
        raise ValueError(f"official pos_embed {tuple(ours['pos_embed'].shape)}: only "
                         f"n_channels=1 (one image token of {d} dims) is supported")  # fmt: skip
    hidden, n = ours["blocks.0.token_mix.fc1.weight"].shape
    width = ours["proj_in.weight"].shape[0]
    cfg = MixerConfig(
        width=width,
        depth=sum(1 for k in ours if re.fullmatch(r"blocks\.\d+\.norm1\.weight", k)),
        token_expansion=hidden / n,
        channel_expansion=ours["blocks.0.channel_mix.fc1.weight"].shape[0] / width,
        num_classes=num_classes,
        class_dropout=class_dropout,
    )
    model = MixerGenerator(cfg, token_dim=d)
    try:
        model.load_state_dict(ours)
    except RuntimeError as e:  # missing keys or wrong shapes: name them
        raise ValueError(f"official mixer state dict does not fit MLPMixer1D: {e}") from e
    return model
