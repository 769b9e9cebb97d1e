"""FSDP2 sharding and sharded checkpoints (torch.distributed.checkpoint), free of Ray.

Works the same under Ray Train (which creates the process group) and under torchrun.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def init_from_env(backend: str | None = None) -> torch.device:
    """Join the process group torchrun describes (no-op when already joined or single process)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_blocks(
    model: nn.Module, blocks: nn.ModuleList, root: nn.Module, bf16_params: bool = False
) -> None:
    """fully_shard every block, then the module that owns them (its leftover params).

    Only call in a process group. `bf16_params` computes in bf16 with fp32 master weights
    and fp32 gradient reduction.
    """
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16_params
        else None
    )
    kw: dict[str, Any] = {"mp_policy": mp} if mp else {}
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(root, **kw)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def save_sharded(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
) -> None:
    """Every rank writes its shards of model + optimizer (+ small `extra` tensors) to `path`."""
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd, "extra": extra}, checkpoint_id=path)


def load_sharded(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
) -> None:
    """Load into the current sharding, whatever world size wrote the checkpoint; `extra` in place."""
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd, "extra": extra}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded model state on CPU (rank 0 gets it; call on every rank)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)
