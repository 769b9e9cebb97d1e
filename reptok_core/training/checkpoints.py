"""What a training checkpoint holds, and the Ray-free store that keeps them in a folder.

A checkpoint is one folder `checkpoint_XXXXXXXX` (the step, 8 digits) holding the sharded model,
optimiser and EMA state (torch.distributed.checkpoint: one shard file per rank + metadata), each
rank's RNG state (`rng_<rank>.pt`) and `trainer_state.json` (step, epoch, batch_in_epoch: where
the data stream resumes). The loop writes a checkpoint into a local folder a store hands it and
reads one from a local folder the store hands it; where checkpoints live is the store's business
(FolderCheckpoints here; Ray Train's storage in pipelines/ray_loop.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from reptok_core import storage
from reptok_core.training.distributed import load_sharded, save_sharded, world
from reptok_core.training.optim import EMA

TRAINER_STATE = "trainer_state.json"
FRESH = {"step": 0, "epoch": 0, "batch_in_epoch": 0}


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def write_checkpoint(
    folder: str, model, optimizer, ema: EMA, trainer_state: dict[str, Any]
) -> None:
    """This rank's part of a checkpoint into a local folder; rank 0 adds `trainer_state.json`."""
    rank = world()[0]
    save_sharded(folder, model, optimizer, {"ema": ema.state_dict()})
    rng = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    torch.save(rng, os.path.join(folder, f"rng_{rank}.pt"))
    if rank == 0:
        with open(os.path.join(folder, TRAINER_STATE), "w") as f:
            json.dump(trainer_state, f)


def read_checkpoint(folder: str, model, optimizer, ema: EMA) -> dict[str, Any]:
    """Load a checkpoint into the current sharding (any world size wrote it); its trainer state."""
    extra = {"ema": ema.state_dict()}
    load_sharded(folder, model, optimizer, extra)
    ema.load_state_dict(extra["ema"])
    rng_file = os.path.join(folder, f"rng_{world()[0]}.pt")
    if os.path.exists(rng_file):  # absent when resuming at a different world size
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    with open(os.path.join(folder, TRAINER_STATE)) as f:
        return json.load(f)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class FolderCheckpoints:
    """Checkpoints under `root` (a local path or s3://), the newest `keep` kept.

    A checkpoint is complete once its `trainer_state.json` is there: rank 0 writes it last,
    after every rank's shards are in place (locally the whole folder appears by one rename), so
    a run killed mid-save resumes from the previous one. Under torchrun on several nodes a local
    `root` must be a shared file system.
    """

    def __init__(self, root: str, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep={keep}: FolderCheckpoints must keep at least one checkpoint")
        self.root = root
        self.keep = keep

    def complete(self) -> list[str]:
        """Complete checkpoint folders under root, oldest first."""
        folders = {f.rsplit("/", 2)[-2] for f in storage.list_files(self.root, TRAINER_STATE)}
        names = {n for n in folders if re.fullmatch(r"checkpoint_\d{8}", n)}
        return [storage.join(self.root, n) for n in sorted(names)]

    @contextlib.contextmanager
    def saving(self, step: int) -> Iterator[str]:
        rank = world()[0]
        final = storage.join(self.root, checkpoint_name(step))
        if storage.is_s3(self.root):
            with tempfile.TemporaryDirectory() as tmp:
                yield tmp
                self._upload(tmp, final, rank)
        else:
            # One shared temporary folder beside the final one: every rank writes its shards
            # there, rank 0 renames it when all are done.
            tmp = f"{final}.partial"
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            _barrier()
            yield tmp
            _barrier()
            if rank == 0:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
        _barrier()
        if rank == 0:
            for old in self.complete()[: -self.keep]:
                storage.delete(old)

    def _upload(self, local: str, uri: str, rank: int) -> None:
        for name in sorted(os.listdir(local)):
            if name != TRAINER_STATE:
                with open(os.path.join(local, name), "rb") as f:
                    storage.write_bytes_atomic(storage.join(uri, name), f.read())
        _barrier()
        if rank == 0:  # last: its presence marks the checkpoint complete
            with open(os.path.join(local, TRAINER_STATE), "rb") as f:
                storage.write_bytes_atomic(storage.join(uri, TRAINER_STATE), f.read())

    @contextlib.contextmanager
    def latest(self) -> Iterator[str | None]:
        found = self.complete()
        if not found:
            yield None
        elif storage.is_s3(self.root):
            with tempfile.TemporaryDirectory() as tmp:
                for f in storage.list_files(found[-1]):
                    with open(os.path.join(tmp, f.rsplit("/", 1)[-1]), "wb") as out:
                        out.write(storage.read_bytes(f))
                yield tmp
        else:
            yield found[-1]
