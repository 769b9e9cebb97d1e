"""The serving path (`reptok_core.serving.inference`): padded batch buckets and the graph cache must
give every row what the plain per-request calls give. On CPU the graph cache runs the calls
directly; the CUDA replay is checked on the GPU (benchmarks/bench_serving.py: bitwise equal to
the eager path)."""

import dataclasses

import pytest
import torch

from reptok_core import flow
from reptok_core.config import preset_section
from reptok_core.exports.generator import LoadedGenerator
from reptok_core.formats.token_stats import TokenNormalizer
from reptok_core.models.generator import (
    GeneratorConfig,
    build_model,
    sample_tokens,
    seeded_token_noise,
)
from reptok_core.models.tokenizer import Tokenizer, TokenizerConfig
from reptok_core.serving.graph_cache import GraphCache, bucket
from reptok_core.serving.inference import Inference, cast_weights


def _nonzero(model: torch.nn.Module) -> torch.nn.Module:
    # Zero-initialised output layers would make every velocity 0 and these checks vacuous.
    for p in model.parameters():
        if p.ndim >= 2 and not p.detach().any():
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = preset_section(TokenizerConfig, "tokenizer/tiny")
    cfg.encoder = dataclasses.replace(cfg.encoder, weights="random")
    tok = Tokenizer(cfg)
    _nonzero(tok.decoder)
    gcfg = preset_section(GeneratorConfig, "generator/tiny")
    norm = TokenNormalizer(torch.randn(tok.token_dim), torch.rand(tok.token_dim) + 0.5)
    model = _nonzero(build_model(gcfg, tok.token_dim))
    return tok.eval(), LoadedGenerator(model, norm, gcfg, {})


def _text_generator(token_dim: int) -> tuple[GeneratorConfig, torch.nn.Module]:
    """The tiny text generator over 12-wide caption states."""
    tcfg = preset_section(GeneratorConfig, "generator/tiny")
    tcfg.kind = "text"
    return tcfg, _nonzero(build_model(tcfg, token_dim, text_dim=12))


def test_bucket_pads_to_powers_of_two_up_to_the_largest_batch():
    assert [bucket(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert bucket(20, 16) == 20  # more rows than the largest bucket: no padding, no truncation
    with pytest.raises(ValueError, match="batch of 0 rows"):
        bucket(0, 16)


def test_decode_rows_match_single_requests_with_their_seeds(models):
    tok, _ = models
    z = torch.randn(3, tok.token_dim)
    seeds = [5, 0, 11]
    rows = Inference(max_batch=16).decode(tok, z, steps=4, seeds=seeds)  # padded to 4 rows
    assert rows.shape == (3, 3, 16, 16)
    for i, s in enumerate(seeds):
        alone = tok.decode(z[i : i + 1], 4, seed=s)
        torch.testing.assert_close(rows[i : i + 1], alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(rows[0], rows[1])  # different tokens and seeds, different images


def test_class_and_text_tokens_match_sample_tokens(models):
    _, g = models
    inf = Inference(max_batch=8)
    labels = [1, 4, 7]
    got = inf.tokens(g, labels, scale=1.5, steps=5, seed=3)  # padded with the null class
    want = sample_tokens(g.model, g.normalizer, labels=torch.tensor(labels), scale=1.5,
                         interval=tuple(g.cfg.guidance_interval), steps=5, seed=3)  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, inf.tokens(g, labels, scale=1.5, steps=5, seed=4))

    tcfg, text_model = _text_generator(g.model.token_dim)
    t = LoadedGenerator(text_model, g.normalizer, tcfg, {})
    states, mask = torch.randn(3, 5, 12), torch.tensor([[1, 1, 1, 0, 0]] * 3).bool()
    got = inf.tokens(t, (states, mask), scale=2.0, steps=5, seed=3)  # padded to 4 rows
    want = sample_tokens(t.model, t.normalizer, text=(states, mask), scale=2.0,
                         interval=tuple(tcfg.guidance_interval), steps=5, seed=3)  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_graph_cache_runs_plain_calls_off_the_gpu():
    cache = GraphCache()
    out = cache.run("double", lambda x: 2 * x, torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0)) and cache.captures == 0


def test_cast_weights_keeps_buffers_in_float32(models):
    _, g = models
    model = cast_weights(build_model(g.cfg, **g.model.sizes), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())


def test_paired_cfg_forward_equals_two_separate_forwards(models):
    """sample_tokens runs guided steps as one doubled batch; the math is the two-forward CFG."""
    _, g = models
    y = torch.tensor([2, 5])
    null = torch.full_like(y, g.model.null_class)
    noise = seeded_token_noise(2, g.normalizer, 9)
    both = flow.Guidance(lambda x, t: (g.model(x, t, y), g.model(x, t, null)), 3.0, (0.3, 0.9))
    z = flow.sample(lambda x, t: g.model(x, t, y), noise, 6, guidance=both)
    want = g.normalizer.denormalize(z)
    got = sample_tokens(g.model, g.normalizer, labels=y, scale=3.0, interval=(0.3, 0.9),
                        steps=6, seed=9)  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    unguided = sample_tokens(g.model, g.normalizer, labels=y, scale=1.0, steps=6, seed=9)
    assert (got - unguided).abs().max() > 1e-3  # the guidance did something

    _, model = _text_generator(g.model.token_dim)
    states, mask = torch.randn(2, 5, 12), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
    null = torch.ones(2, dtype=torch.bool)

    def branches(x, t):
        return model(x, t, states, mask), model(x, t, states, mask, null=null)

    z = flow.sample(lambda x, t: model(x, t, states, mask), noise, 6,
                    guidance=flow.Guidance(branches, 3.0, (0.3, 0.9)))  # fmt: skip
    got = sample_tokens(model, g.normalizer, text=(states, mask), scale=3.0, interval=(0.3, 0.9),
                        steps=6, seed=9)  # fmt: skip
    torch.testing.assert_close(got, g.normalizer.denormalize(z), atol=1e-5, rtol=1e-5)


def test_concurrent_class_requests_share_one_solve_with_their_own_seeds(models):
    _, g = models
    inf = Inference(max_batch=8)
    requests = [([1, 4], 3), ([7], 9), ([0, 0, 2], 3)]
    together = inf.tokens_of(requests, g, scale=1.5, steps=5)
    assert [t.shape[0] for t in together] == [2, 1, 3]
    for (labels, seed), got in zip(requests, together, strict=True):
        alone = inf.tokens(g, labels, scale=1.5, steps=5, seed=seed)
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)
