"""Stage 2 as a training task: token batches -> flow loss (label / caption dropout for CFG,
token flips, normalisation), evaluation with samples and grids.

Pure PyTorch; the training loop (reptok_core/training/loop.py) drives it under Ray
(`pipelines/train_generator.py`) or plain python/torchrun (experiments, benchmarks). The model,
its conditioning and `sample_tokens` are reptok_core/models/generator.py's; the export folder
and `load_generator` are reptok_core/exports/generator.py's.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from reptok_core import flow
from reptok_core.formats.token_stats import TokenNormalizer
from reptok_core.models.generator import GeneratorConfig, conditioning
from reptok_core.training.batches import TensorBatches
from reptok_core.training.distributed import shard_blocks

if TYPE_CHECKING:  # gfid imports this module for sample_tokens
    from reptok_core.evaluation.gfid import TrainingFid


def finetune_generator_config(
    requested: GeneratorConfig, exported: GeneratorConfig
) -> GeneratorConfig:
    """Fine-tuning an export: its model (kind, sizes, token scaling), with the requested
    training and sampling choices (the flow's t, guidance scale and interval)."""
    cfg = copy.deepcopy(exported)
    cfg.flow = copy.deepcopy(requested.flow)
    cfg.guidance_scale = requested.guidance_scale
    cfg.guidance_interval = list(requested.guidance_interval)
    return cfg


class GeneratorTask:
    """Model + normaliser + the training set (in memory or streamed), optionally a decoder for
    grids and a gFID at evaluations.

    Batches hold `token` (B, D) raw tokens, optionally `token_flip` (tokens of the mirrored
    images), and `label` (B,) or `caption_idx` (B,) into `captions` = (states (U, L, E), mask).
    The training set is `data` (those columns as tensors over every row) or `stream`, an object
    whose `epoch_batches(epoch, batch_size, seed)` yields this rank's batches
    (reptok_core.formats.token_stream.TokenStream).
    """

    # The loss has fixed shapes and no host syncs, so a single-GPU run may capture the step as
    # a CUDA graph (reptok_core/training/cuda_graph_step.py).
    capture_safe = True

    def __init__(
        self,
        cfg: GeneratorConfig,
        normalizer: TokenNormalizer,
        device: torch.device,
        *,
        data: dict[str, torch.Tensor] | None = None,
        stream: Any = None,
        captions: tuple[torch.Tensor, torch.Tensor] | None = None,
        decoder: Any = None,
        fid: TrainingFid | None = None,
        init_state: dict[str, torch.Tensor] | None = None,
    ):
        self.conditioning = conditioning(cfg)
        if self.conditioning.uses_captions and captions is None:
            raise ValueError("a text generator needs the caption cache (captions=(states, mask))")
        if fid is not None and (self.conditioning.num_classes(cfg) is None or decoder is None):
            raise ValueError("gFID needs a class-conditional generator and a decoder")
        self.cfg = cfg
        self.device = device
        # The model's widths are the data's: the tokens' (the normaliser's) and the captions'.
        text_dim = None if captions is None else captions[0].shape[-1]
        self.model = self.conditioning.build(cfg, normalizer.mean.numel(), text_dim)
        if init_state is not None:  # fine-tuning an export (finetune_generator_config)
            self.model.load_state_dict(init_state)
        self.model.to(device)
        self.normalizer = normalizer.to(device)
        self.data = data
        self.stream = stream
        # Caption states stay on the device once: stage 2 never runs the text encoder per step.
        self.captions = None if captions is None else tuple(c.to(device) for c in captions)
        self.decoder = decoder
        self.fid = fid

    def shard(self, bf16_params: bool = False) -> None:
        shard_blocks(self.model, self.model.blocks, self.model, bf16_params)

    def blocks(self) -> list[torch.nn.Module]:
        return list(self.model.blocks)

    def epoch_batches(self, epoch: int, batch_size: int, seed: int):
        """This rank's batches of one epoch: from the stream, or from the in-memory set
        (training/batches.TensorBatches), so a resumed run can skip exactly the batches already
        seen."""
        if self.stream is not None:
            return self.stream.epoch_batches(epoch, batch_size, seed)
        if self.data is None:
            raise ValueError("GeneratorTask was built without training data")
        return TensorBatches(self.data, batch_size, seed).epoch(epoch)

    def _tokens(self, batch: dict[str, Any], flip: bool) -> torch.Tensor:
        z = torch.as_tensor(batch["token"]).to(self.device).float()
        if flip and "token_flip" in batch:
            # Mirrored images are the stage-1 augmentation; here it is a per-sample token swap.
            zf = torch.as_tensor(batch["token_flip"]).to(self.device).float()
            pick = torch.rand(z.shape[0], device=self.device) < 0.5
            z = torch.where(pick[:, None], zf, z)
        return self.normalizer.normalize(z)

    def _condition(self, batch: dict[str, Any], drop: bool):
        """Returns a function (x, t) -> v conditioned on the batch (with CFG dropout if `drop`)."""
        condition = self.conditioning.condition(batch, self.captions, self.device)
        return self.conditioning.velocity(self.model, condition, drop)

    def loss(self, batch: dict[str, Any], flip: bool = True) -> dict[str, torch.Tensor]:
        z = self._tokens(batch, flip)
        loss = flow.flow_loss(self._condition(batch, drop=True), z, self.cfg.flow)
        return {"flow": loss, "total": loss}

    def sample(self, batch: dict[str, Any], steps: int, seed: int = 0) -> torch.Tensor:
        """Denormalised samples for the batch's conditions, with the config's guidance."""
        return self.conditioning.sample(
            self.model,
            self.normalizer,
            self.conditioning.condition(batch, self.captions, self.device),
            scale=self.cfg.guidance_scale,
            interval=tuple(self.cfg.guidance_interval),
            steps=steps,
            seed=seed,
        )

    @torch.no_grad()
    def evaluate(
        self, batch: dict[str, Any], steps: int, seed: int = 0
    ) -> tuple[dict[str, float], np.ndarray | None]:
        """Token-space metrics on held-out tokens, plus a decoded sample grid when a decoder is set.

        val_flow: fixed-t flow loss; sample_std: per-dim std of the (normalised) samples (≈1 when
        the spread matches the data); class mode adds class_dist, the mean RMS distance of each
        sample to its class's held-out mean, and class_acc, how often that mean is the nearest;
        with a `fid`, rank 0 adds gfid.
        """
        z = self._tokens(batch, flip=False)
        val = flow.validation_loss(self._condition(batch, drop=False), z, seed=seed)
        samples = self.normalizer.normalize(self.sample(batch, steps, seed))
        metrics = {"val_flow": val.mean().item(), "sample_std": samples.std(0).mean().item()}
        if "label" in batch:  # class generators: how close samples come to their class
            metrics.update(class_distances(samples, z, torch.as_tensor(batch["label"])))
        if self.fid is not None:
            gfid = self.fid.measure(
                self.model,
                self.normalizer,
                self.decoder,
                scale=self.cfg.guidance_scale,
                interval=tuple(self.cfg.guidance_interval),
                steps=steps,
                seed=seed,
            )
            if gfid is not None:  # rank 0 only
                metrics["gfid"] = gfid
        grid = None
        if self.decoder is not None:
            from reptok_core.images import image_grid, images_to_uint8

            n = min(8, samples.shape[0])
            tokens = self.normalizer.denormalize(samples[:n]).to(self.device)
            images = self.decoder.decode(tokens, steps=steps, seed=seed)
            grid = image_grid([images_to_uint8(images)])
        return metrics, grid


def class_distances(
    samples: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """RMS distance of samples to their label's mean of `reference`, and nearest-mean accuracy."""
    labels = labels.to(samples.device).long()
    classes = labels.unique()
    means = torch.stack([reference[labels == c].mean(0) for c in classes])
    d = torch.cdist(samples.float(), means.float()) / samples.shape[1] ** 0.5
    own = (labels[:, None] == classes[None]).float().argmax(1)
    return {
        "class_dist": d.gather(1, own[:, None]).mean().item(),
        "class_acc": (d.argmin(1) == own).float().mean().item(),
    }
