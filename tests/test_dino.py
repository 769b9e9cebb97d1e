"""Stage 0 core (reptok_core/stages/dino.py) on CPU: crops, loss, teacher EMA, centring, k-NN, export."""

import dataclasses

import numpy as np
import pytest
import torch

from reptok_core.config import preset_section
from reptok_core.images import prepare_array
from reptok_core.models.encoder import SSLEncoder
from reptok_core.prepare.builtin_datasets import load_fashion_mnist
from reptok_core.stages.dino import (
    DinoConfig,
    DinoTask,
    export_encoder,
    knn_accuracy,
    multi_crop,
    save_encoder_export,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    pixels, _ = load_fashion_mnist("train")
    return torch.from_numpy(np.stack([prepare_array(pixels[i], 16) for i in range(32)]))


def dino_tiny() -> DinoConfig:
    return preset_section(DinoConfig, "pretrain/tiny")


def _task(**kw) -> DinoTask:
    torch.manual_seed(0)
    cfg = dataclasses.replace(dino_tiny(), total_steps=10, **kw)
    return DinoTask(cfg, CPU)


def test_multi_crop_shapes_and_range(images):
    cfg = dino_tiny()
    crops = multi_crop(images[:4], cfg)
    assert [tuple(c.shape) for c in crops] == [(8, 3, 16, 16), (8, 3, 8, 8)]
    # ImageNet-normalised [0, 1] pixels stay within these bounds
    assert all(torch.isfinite(c).all() and c.min() >= -2.2 and c.max() <= 2.7 for c in crops)
    assert not torch.equal(crops[0][:4], crops[0][4:])  # the two global views differ


def test_loss_finite_and_student_learns(images):
    # Teacher and centre frozen (momentum 1, centre momentum 1): the targets are fixed, so the
    # cross-entropy must fall as the student learns to match them.
    task = _task(momentum=1.0, momentum_final=1.0, center_momentum=1.0)
    params = [p for p in task.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(8):
        out = task.loss({"image": images})
        assert torch.isfinite(out["total"])
        out["total"].backward()
        opt.step()
        opt.zero_grad()
        task.after_step(step + 1)
        losses.append(out["dino"].item())
    assert np.mean(losses[-2:]) < 0.85 * np.mean(losses[:2]), losses


def test_teacher_moves_only_by_ema(images):
    task = _task()
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert {id(p) for p in params}.isdisjoint(id(p) for p in model.teacher.parameters())
    before = [p.detach().clone() for p in model.teacher.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    task.loss({"image": images[:8]})["total"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    opt.step()
    for b, p in zip(before, model.teacher.parameters(), strict=True):
        assert torch.equal(b, p)  # the optimiser step leaves the teacher alone
    task.after_step(1)
    m = model.momentum()
    assert 0.99 <= m < 1.0
    for b, pt, ps in zip(
        before, model.teacher.parameters(), model.student.parameters(), strict=True
    ):
        torch.testing.assert_close(pt, m * b + (1 - m) * ps.detach())
    assert int(model.step) == 1


def test_schedules_resume_at_the_loaded_step():
    # The schedules read a host copy of the step; loading a checkpoint must restore it too.
    task = _task(teacher_temp_warmup_steps=10, warmup_teacher_temp=0.02, teacher_temp=0.06)
    task.after_step(7)
    state = task.model.state_dict()
    fresh = _task(teacher_temp_warmup_steps=10, warmup_teacher_temp=0.02, teacher_temp=0.06)
    assert fresh.model.host_step == 0
    fresh.model.load_state_dict(state)
    assert fresh.model.host_step == 7
    assert fresh.model.teacher_temp() == pytest.approx(task.model.teacher_temp())
    assert fresh.model.momentum() == pytest.approx(task.model.momentum())


def test_centre_is_ema_of_teacher_output(images):
    task = _task()
    model = task.model
    crops = multi_crop(images[:8], model.cfg)
    with torch.no_grad():
        expected = model.teacher["head"](model.features(model.teacher, crops[0])).mean(0)
    model.loss(crops)
    torch.testing.assert_close(model.center[0], (1 - model.cfg.center_momentum) * expected)


def test_knn_accuracy_toy():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 5
    labels = torch.randint(0, 5, (400,), generator=g)
    feats = centres[labels] + torch.randn(400, 16, generator=g) * 0.3
    acc = knn_accuracy(feats[:300], labels[:300], feats[300:], labels[300:], k=20)
    assert acc > 0.98
    noise = torch.randn(2000, 16, generator=g)
    rand = torch.randint(0, 10, (2000,), generator=g)
    acc = knn_accuracy(noise[:1000], rand[:1000], noise[1000:], rand[1000:], k=20)
    assert abs(acc - 0.1) < 0.05


@pytest.mark.parametrize("fp16", [False, True])
def test_export_loads_as_ssl_encoder(images, tmp_path, fp16):
    task = _task()
    opt = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(2):  # teacher != initial student, so the test sees the real teacher
        task.loss({"image": images[:8]})["total"].backward()
        opt.step()
        opt.zero_grad()
        task.after_step(step + 1)
    enc_cfg = save_encoder_export(task.model.state_dict(), task.cfg, str(tmp_path), fp16=fp16)
    encoder = SSLEncoder(enc_cfg).eval()
    x = images[:8].permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = encoder(x)
    if fp16:
        torch.testing.assert_close(z, task.encode(images[:8]), atol=2e-2, rtol=2e-2)
    else:
        assert torch.equal(z, task.encode(images[:8]))
        assert torch.equal(encoder.target(x), z)  # z_frozen is the same pretrained encoder


def test_export_json_records_knn(images, tmp_path):
    from reptok_core.stages.dino import ProbeSet

    pixels, labels = load_fashion_mnist("train")
    task = _task()
    probe = ProbeSet(images, torch.from_numpy(labels[:32]), k=5)
    meta = export_encoder(
        task.model.state_dict(),
        task.cfg,
        str(tmp_path),
        extra={"command": "test"},
        probe=probe,
        queries=(images[:8], torch.from_numpy(labels[:8])),
    )
    assert 0.0 <= meta["knn_accuracy"] <= 1.0 and meta["command"] == "test"
    assert (tmp_path / "encoder.json").is_file() and (tmp_path / "encoder.safetensors").is_file()
