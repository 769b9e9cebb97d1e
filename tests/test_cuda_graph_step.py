"""When the training loop captures its step as a CUDA graph (the capture itself needs a GPU and
is checked by benchmarks/bench_graph_step.py: bitwise equal to the eager step on an H200)."""

import numpy as np
import pytest
import torch

from reptok_core.training.cuda_graph_step import _signature, resolve

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_captures_only_one_cuda_worker_with_a_capture_safe_task():
    assert resolve("auto", CUDA, distributed=False, capturable=True)
    assert not resolve("auto", CUDA, distributed=True, capturable=True)  # FSDP2 does not capture
    assert not resolve("auto", CUDA, distributed=False, capturable=False)
    assert not resolve("auto", CPU, distributed=False, capturable=True)
    assert not resolve("off", CUDA, distributed=False, capturable=True)


def test_on_where_impossible_names_the_option():
    with pytest.raises(ValueError, match="loop.cuda_graph=on needs one CUDA worker"):
        resolve("on", CPU, distributed=False, capturable=True)
    with pytest.raises(ValueError, match="loop.cuda_graph='maybe'"):
        resolve("maybe", CUDA, distributed=False, capturable=True)


def test_batches_with_other_shapes_or_text_fields_are_not_replayed():
    batch = {"token": torch.zeros(4, 8), "label": np.zeros(4, dtype=np.int64)}
    assert _signature(batch) == _signature({k: v.copy() if isinstance(v, np.ndarray) else v.clone()
                                            for k, v in batch.items()})  # fmt: skip
    assert _signature({**batch, "token": torch.zeros(3, 8)}) != _signature(batch)
    assert _signature({**batch, "token": torch.zeros(4, 8, dtype=torch.float16)}) != _signature(
        batch
    )
    assert _signature({**batch, "caption": np.array(["a", "b", "c", "d"], dtype=object)}) is None
    assert _signature({**batch, "caption": ["a", "b", "c", "d"]}) is None
