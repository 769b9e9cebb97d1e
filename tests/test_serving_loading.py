"""Which model settings make a Serve replica load again (no Ray needed: the loading step)."""

import pytest
import torch

from pipelines.serving.config import ModelSettings
from pipelines.serving.loading import load_changed, warm_up
from reptok_core.config import preset_section
from reptok_core.exports.generator import LoadedGenerator
from reptok_core.formats.token_stats import TokenNormalizer
from reptok_core.models.generator import GeneratorConfig, build_model

CPU = torch.device("cpu")


def test_reload_only_when_a_reference_or_a_preparation_setting_changes(tiny_tokenizer_export):
    settings = ModelSettings(tokenizer=tiny_tokenizer_export)
    first = load_changed(None, settings, CPU)
    assert first is not None and load_changed(first, settings, CPU) is None
    assert next(first.tokenizer.decoder.parameters()).dtype == torch.float32  # auto on CPU
    # Weights are cast / compiled in place, so a new precision prepares fresh copies; the graph
    # cache is per generation of models.
    bf16 = load_changed(
        first, ModelSettings(tokenizer=tiny_tokenizer_export, precision="bf16"), CPU
    )
    assert bf16 is not None and bf16.tokenizer is not first.tokenizer
    assert next(bf16.tokenizer.decoder.parameters()).dtype == torch.bfloat16
    assert next(first.tokenizer.decoder.parameters()).dtype == torch.float32
    assert bf16.inference is not first.inference
    graphs = load_changed(bf16, ModelSettings(tokenizer=tiny_tokenizer_export, precision="bf16",
                                              max_graphs=0), CPU)  # fmt: skip
    assert graphs is not None and graphs.inference.graphs.max_graphs == 0


@pytest.mark.parametrize("key,value", [("precision", "fp16"), ("compile", "maybe")])
def test_bad_preparation_settings_name_the_option(tiny_tokenizer_export, key, value):
    settings = ModelSettings(tokenizer=tiny_tokenizer_export, **{key: value})
    with pytest.raises(ValueError, match=f"model.{key}={value!r}"):
        load_changed(None, settings, CPU)


def test_warm_up_runs_every_loaded_model(tiny_tokenizer_export):
    # On a GPU this compiles and captures before the first request; here it must at least run
    # the same calls (class tokens -> decode) without error.
    m = load_changed(None, ModelSettings(tokenizer=tiny_tokenizer_export), CPU)
    cfg = preset_section(GeneratorConfig, "generator/tiny")
    norm = TokenNormalizer.identity(m.tokenizer.token_dim)
    m.generator = LoadedGenerator(build_model(cfg, m.tokenizer.token_dim).eval(), norm, cfg, {})
    warm_up(m, steps=2)
    assert m.inference.graphs.captures == 0  # graphs exist only on CUDA
