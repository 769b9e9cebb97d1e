"""The safe reader of the official RepTok release, against a tiny checkpoint that the official
code saved the way the release was (tests/fixtures/official, see official.json)."""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from reptok_core.official.checkpoint import (
    OfficialCheckpointError,
    load_official_checkpoint,
    official_parts,
    to_plain,
)

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CKPT = FIXTURES / "reptok-tiny.ckpt"
META = json.loads((FIXTURES / "official.json").read_text())


@pytest.fixture(scope="module")
def ckpt():
    return load_official_checkpoint(CKPT)


def _plain_only(obj, where="hp"):
    """Every leaf is a builtin scalar/None; every container a dict or list."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), f"{where}: key {k!r}"
            _plain_only(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _plain_only(v, f"{where}[{i}]")
    else:
        assert obj is None or type(obj) in (str, int, float, bool), f"{where}: {type(obj)}"


def test_state_dict_is_the_official_one(ckpt):
    expected = META["checkpoint_state_dict"]
    assert list(ckpt.state_dict) == list(expected)
    for k, (shape, dtype) in expected.items():
        t = ckpt.state_dict[k]
        assert list(t.shape) == shape and t.dtype == getattr(torch, dtype), k


def test_hyper_parameters_become_plain_data(ckpt):
    hp = ckpt.hyper_parameters
    _plain_only(hp)
    assert hp == META["hyper_parameters"]  # what OmegaConf.to_container gave at creation
    net = hp["flow_cfg"]["params"]["net_cfg"]
    assert net["target"] == "reptok.models.mlp-mixer.MLPMixer1D"
    assert net["params"]["num_classes"] == 10 and net["params"]["channels"] == 32
    scale = hp["first_stage_cfg"]["params"]["scale_factor"]
    assert type(scale) is float and scale == META["conventions"]["scale_factor"]
    assert hp["lr_scheduler_cfg"]["params"]["milestones"] == [400000, 500000]  # a ListConfig
    assert hp["tokenizer_cfg"] is None
    assert ckpt.extra["hparams_name"] == "kwargs"
    assert ckpt.extra["pytorch-lightning_version"] == META["versions"]["lightning"]


def test_reading_imports_nothing_from_the_pickle():
    code = (
        "import sys; from reptok_core.official.checkpoint import load_official_checkpoint as L;"
        f"L({str(CKPT)!r}); print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('omegaconf', 'lightning', 'pytorch_lightning', 'reptok')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_tensors_are_memory_mapped(ckpt):
    maps = Path("/proc/self/maps").read_text()
    assert str(CKPT.resolve()) in maps


def test_parts(ckpt):
    p = official_parts(ckpt.state_dict)
    assert p.unknown == []
    assert p.skipped and all(k.startswith("metric_tracker.") for k in p.skipped)
    n = sum(len(v) for v in p.parts.values()) + len(p.skipped)
    assert n == len(ckpt.state_dict)  # every key lands in exactly one place
    assert not any("_orig_mod." in k for part in p.parts.values() for k in part)
    assert "mixer.0.weight" in p.parts["generator"] and "mixer.0.weight" in p.parts["generator_ema"]
    assert not torch.equal(p.parts["generator"]["pos_embed"], p.parts["generator_ema"]["pos_embed"])
    assert set(p.parts["token_adapter"]) == {
        "temp_pos_embed",
        "new_reg",
        "backbone.fc.weight",
        "backbone.fc.bias",
        "backbone.ln.weight",
        "backbone.ln.bias",
    }
    assert set(p.parts["mapping"]) >= {"time_emb.weight", "time_in_proj.weight"}
    assert "encoder.conv_in.weight" in p.parts["vae"]
    assert "mid_level.0.self_attn.scale" in p.parts["decoder"]
    enc, tgt, bf16 = p.parts["encoder"], p.parts["target"], p.parts["encoder_bf16"]
    assert enc.keys() == tgt.keys() == bf16.keys()
    # fine-tuning unfroze only the cls token; the bf16 copy is the fine-tuned encoder rounded
    assert [k for k in enc if not torch.equal(enc[k], tgt[k])] == ["cls_token"]
    assert all(bf16[k].dtype == torch.bfloat16 for k in bf16)
    assert all(torch.equal(bf16[k], enc[k].bfloat16()) for k in enc)


def test_unknown_keys_are_reported(ckpt):
    sd = dict(ckpt.state_dict)
    sd["first_stage.decoder.decoder.something_new.weight"] = torch.zeros(1)
    sd["tokenizer.proj.weight"] = torch.zeros(1)
    p = official_parts(sd)
    assert p.unknown == [
        "first_stage.decoder.decoder.something_new.weight",
        "tokenizer.proj.weight",
    ]


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(tmp_path, keep):
    data = CKPT.read_bytes()
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(OfficialCheckpointError, match="truncated") as e:
        load_official_checkpoint(bad)
    assert str(bad) in str(e.value)


def test_corrupt_tensor_data(tmp_path):
    """An archive whose index is intact but one record's bytes are not what it says."""
    bad = tmp_path / "corrupt.ckpt"
    with zipfile.ZipFile(CKPT) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data/0"):
                data = data[: len(data) // 2]
            dst.writestr(info, data)
    with pytest.raises(OfficialCheckpointError, match="record data/0 holds") as e:
        load_official_checkpoint(bad)
    assert str(bad) in str(e.value)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello\n")
    with pytest.raises(OfficialCheckpointError, match="not a PyTorch checkpoint") as e:
        load_official_checkpoint(text)
    assert str(text) in str(e.value)

    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(OfficialCheckpointError, match="not a torch.save checkpoint"):
        load_official_checkpoint(other_zip)

    with pytest.raises(OfficialCheckpointError, match="no such file"):
        load_official_checkpoint(tmp_path / "missing.ckpt")

    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, weights)
    with pytest.raises(OfficialCheckpointError, match="not a Lightning checkpoint"):
        load_official_checkpoint(weights)

    lightning_other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(2)}, "hyper_parameters": {}}, lightning_other)
    with pytest.raises(OfficialCheckpointError, match="not a RepTok checkpoint") as e:
        load_official_checkpoint(lightning_other)
    assert str(lightning_other) in str(e.value)


class Evil:
    """Unpickling this with plain pickle would run `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Mode(enum.Enum):
    FAST = "fast"


def test_pickled_code_is_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    sd = {"first_stage.x": torch.ones(1), "model.net.y": torch.ones(1)}
    torch.save({"state_dict": sd, "hyper_parameters": {"a": Evil(marker), "mode": Mode.FAST}}, path)
    ck = load_official_checkpoint(path)
    assert not marker.exists()
    assert ck.hyper_parameters == {"a": f"touch {marker}", "mode": "fast"}
    assert torch.equal(ck.state_dict["model.net.y"], torch.ones(1))


def test_to_plain_passes_plain_data_through():
    data = {"a": [1, 2.5, "x", None, True], "b": {"c": (3,)}}
    assert to_plain(data) == data
