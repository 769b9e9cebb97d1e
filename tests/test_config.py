"""Config loading: a preset plus key=value overrides, merged section by section."""

import pytest

from reptok_core.config import (
    CONFIGS_DIR,
    ConfigError,
    from_dict,
    load_config,
    merge,
    parse_overrides,
    read_yaml,
)
from reptok_core.models.encoder import SSLEncoder
from reptok_core.models.tokenizer import TokenizerConfig
from reptok_core.training.loop import LoopConfig


def _tiny(overrides: list[str]) -> TokenizerConfig:
    preset = merge(read_yaml(CONFIGS_DIR / "tokenizer" / "tiny.yaml"), parse_overrides(overrides))
    return from_dict(TokenizerConfig, preset["model"], "model")


def test_nested_override_keeps_the_sections_other_keys():
    cfg = _tiny(["model.encoder.arch.depth=1", "model.decoder.depth=3"])
    assert cfg.encoder.arch == {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
    assert cfg.encoder.img_size == 16 and cfg.encoder.weights == "random"
    assert cfg.decoder.depth == 3 and cfg.decoder.width == 64
    SSLEncoder(cfg.encoder)  # the override's value reaches timm as an int, not the string "1"


def test_merge_is_deep_and_leaves_its_inputs_alone():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    assert merge(base, {"a": {"b": 5}}) == {"a": {"b": 5, "c": 2}, "d": 3}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}


def test_bad_overrides_name_the_option():
    with pytest.raises(ConfigError, match="unknown option"):
        _tiny(["model.encoder.dept=1"])
    with pytest.raises(ConfigError, match="model.decoder.depth: expected int"):
        _tiny(["model.decoder.depth=two"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(LoopConfig, None, ["steps"])
