"""The `Models` replica: tokenizer + optional generators on one device, batched encode / decode.

`encode` and `decode` are @serve.batch methods: concurrent requests (from every ingress replica)
are gathered into one forward pass; decoding, the 50-step flow decoder, is where almost all the
time goes. The model references arrive as the deployment's `user_config`, so `reconfigure` runs
on deploy and on every config edit and loads only what changed (see loading.py); with
`model.reload_poll_s > 0` a background task also notices registry aliases that moved.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import numpy as np
from ray import serve

from pipelines.serving.config import ModelSettings, ScalingSettings
from pipelines.serving.loading import Loaded, load_changed
from reptok_core.config import from_dict

log = logging.getLogger("ray.serve")


class Models:
    """Tokenizer + generators on one device; batched encode / decode."""

    def __init__(self, scaling: dict[str, Any]):
        from reptok_core.device import resolve_device

        s = from_dict(ScalingSettings, scaling)
        self.device = resolve_device()
        self.loaded: Loaded | None = None
        self.settings: ModelSettings | None = None
        self.max_batch_seen = 0
        self.batches = 0
        self.batched_items = 0
        self.reloads = 0
        self._reload_lock = threading.Lock()
        self._poller: asyncio.Task | None = None
        self.max_batch_size = s.max_batch_size
        for method in (self.encode, self.decode, self.class_tokens):
            method.set_max_batch_size(s.max_batch_size)
            method.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    # -- loading

    def _refresh(self, settings: ModelSettings) -> bool:
        """Load whatever changed (reference or registry version); True when anything did."""
        with self._reload_lock:
            new = load_changed(self.loaded, settings, self.device, self.max_batch_size)
            if new is None:
                return False
            self.loaded = new
            self.reloads += 1
            log.info("loaded models %s", new.refs)
            return True

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        settings = from_dict(ModelSettings, user_config)
        self.settings = settings
        await asyncio.to_thread(self._refresh, settings)
        if settings.reload_poll_s > 0 and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    def __del__(self) -> None:
        # Serve calls this on a graceful shutdown: stop polling before the replica's thread
        # pool closes under it (which logged an error on every healthy scale-down).
        if self._poller is not None:
            self._poller.cancel()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(max(self.settings.reload_poll_s, 0.1))
            if self.settings.reload_poll_s <= 0:
                continue
            try:
                await asyncio.to_thread(self._refresh, self.settings)
            except Exception:  # noqa: BLE001 - a broken new version must not take the old one down
                log.exception("reload failed; still serving %s", self.loaded and self.loaded.refs)

    # -- description

    def info(self) -> dict[str, Any]:
        m = self.loaded
        if m is None:
            return {"ready": False}
        tok = m.tokenizer

        def gen_info(role: str) -> dict[str, Any] | None:
            g = getattr(m, role)
            if g is None:
                return None
            ref, version = m.refs[role]
            out = {"uri": ref, "version": version, "kind": g.cfg.kind}
            out.update(
                guidance_scale=g.cfg.guidance_scale,
                guidance_interval=list(g.cfg.guidance_interval),
            )
            return {**out, **g.conditioning.describe(g.cfg, g.meta)}

        ref, version = m.refs["tokenizer"]
        return {
            "ready": True,
            "device": str(self.device),
            "tokenizer": {
                "uri": ref,
                "version": version,
                "image_size": tok.cfg.image_size,
                "token_dim": tok.token_dim,
                "latent": tok.cfg.latent.kind,
                "encoder": tok.cfg.encoder.timm_name,
                "decoder_width": tok.cfg.decoder.width,
                "decoder_depth": tok.cfg.decoder.depth,
            },
            "generator": gen_info("generator"),
            "text_generator": gen_info("text_generator"),
            "batching": {
                "max_batch_seen": self.max_batch_seen,
                "batches": self.batches,
                "items": self.batched_items,
            },
            "reloads": self.reloads,
        }

    def _count(self, n: int) -> None:
        self.max_batch_seen = max(self.max_batch_seen, n)
        self.batches += 1
        self.batched_items += n

    # -- batched work (compute runs in a thread so /info and health checks stay responsive)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def encode(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 (H, W, 3) images at the tokenizer's resolution -> float32 tokens (D,)."""
        self._count(len(images))
        return await asyncio.to_thread(self._encode, self.loaded.tokenizer, images)

    def _encode(self, tok: Any, images: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        from reptok_core.images import images_from_uint8

        with torch.no_grad():
            x = images_from_uint8(torch.from_numpy(np.stack(images)), self.device)
            return list(tok.encode(x).float().cpu().numpy())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def decode(
        self, tokens: list[np.ndarray], steps: list[int], seeds: list[int]
    ) -> list[np.ndarray]:
        """Tokens (D,) -> uint8 (H, W, 3). Each request keeps its own seed, so its image does
        not depend on which other requests it was batched with (up to kernel rounding)."""
        self._count(len(tokens))
        return await asyncio.to_thread(self._decode, self.loaded, tokens, steps, seeds)

    def _decode(
        self, m: Loaded, tokens: list[np.ndarray], steps: list[int], seeds: list[int]
    ) -> list[np.ndarray]:
        import torch

        from reptok_core.images import images_to_uint8

        out: list[np.ndarray | None] = [None] * len(tokens)
        for n_steps in sorted(set(steps)):  # one flow solve per step count in the batch
            idx = [i for i, s in enumerate(steps) if s == n_steps]
            z = torch.as_tensor(np.stack([tokens[i] for i in idx]), dtype=torch.float32)
            images = m.inference.decode(m.tokenizer, z, n_steps, [seeds[i] for i in idx])
            for i, p in zip(idx, images_to_uint8(images), strict=True):
                out[i] = p
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def class_tokens(
        self, labels: list[list[int]], scale: list[float], steps: list[int], seed: list[int]
    ) -> list[np.ndarray]:
        """Stage-2 sampling, batched like decoding: with one request at a time the mixer's and
        the decoder's solves alternate and every decode batch holds one image (6 images/s at
        concurrency 16 for the `paper` models on an H200, benchmarks/NOTES.md)."""
        m = self.loaded  # one snapshot: a reload during the request does not mix generations
        return await asyncio.to_thread(self._class_tokens, m, labels, scale, steps, seed)

    def _class_tokens(
        self, m: Loaded, labels: list, scale: list, steps: list, seed: list
    ) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(labels)
        for key in sorted(set(zip(scale, steps, strict=True))):  # one solve per (scale, steps)
            idx = [i for i, k in enumerate(zip(scale, steps, strict=True)) if k == key]
            tokens = m.inference.tokens_of([(labels[i], seed[i]) for i in idx], m.generator, *key)
            for i, t in zip(idx, tokens, strict=True):
                out[i] = t.cpu().numpy()
        return out

    async def text_tokens(
        self, prompt: str, n: int, scale: float, steps: int, seed: int
    ) -> np.ndarray:
        m = self.loaded

        def run() -> np.ndarray:
            text = m.text_encoder([prompt] * n)
            return m.inference.tokens(m.text_generator, text, scale, steps, seed).cpu().numpy()

        return await asyncio.to_thread(run)
