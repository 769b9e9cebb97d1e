"""One arm of the SSL ablation, end to end (see experiments/ssl_ablation.py).

Stage 1 trains the `small` tokenizer (configs/tokenizer/small.yaml) with the arm's encoder
settings, stage 2 the `small` class-conditional MLP-Mixer (configs/generator/small.yaml) on the
EMA tokenizer's tokens of the train split; both through the product's loop
(reptok_core/training/launch.train) with the stages' real tasks. Every arm runs the same steps,
batches and seeds, so the encoder is the only difference. Each phase writes its output before
the next starts; a re-run skips phases already done and resumes one the time budget cut short
(`--out/<arm>/`). Under torchrun the training phases shard the batch; rank 0 makes the images
and metrics.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from _fashion32 import fashion32
from PIL import Image

from reptok_core.config import preset_section
from reptok_core.evaluation.fid import FeatureStats, InceptionFeatures, extract_features, fid
from reptok_core.evaluation.metrics import psnr, ssim
from reptok_core.exports.generator import export_generator, load_generator
from reptok_core.exports.tokenizer import export_tokenizer, load_tokenizer
from reptok_core.formats.token_stats import TokenNormalizer
from reptok_core.images import image_grid, images_from_uint8, images_to_uint8
from reptok_core.models.encoder import SSLEncoder
from reptok_core.models.generator import GeneratorConfig, sample_tokens
from reptok_core.models.tokenizer import TokenizerConfig
from reptok_core.stages.dino import knn_accuracy
from reptok_core.stages.generator import GeneratorTask
from reptok_core.stages.tokenizer import TokenizerTask
from reptok_core.training.batches import TensorBatches
from reptok_core.training.distributed import init_from_env, is_distributed, world
from reptok_core.training.launch import train
from reptok_core.training.loop import LoopConfig
from reptok_core.training.optim import OptimConfig

ARMS = {
    "a_ssl": dict(ssl=True),
    "b_random": dict(ssl=False),
    "c_ssl_no_cos": dict(ssl=True, cos_weight=0.0),
    "d_ssl_cls_frozen": dict(ssl=True, finetune="none"),
}


@dataclass
class ArmSettings:
    tok_steps: int = 4000
    tok_batch: int = 256
    gen_steps: int = 6000
    gen_batch: int = 512
    samples: int = 10000
    decode_steps: int = 25
    seed: int = 0
    minutes: float = 9.0  # training time of one call; the next call resumes


def tokenizer_config(arm: str, encoder: str) -> TokenizerConfig:
    spec = ARMS[arm]
    cfg = preset_section(TokenizerConfig, "tokenizer/small")
    if spec["ssl"] and not encoder:
        raise ValueError(f"arm {arm} needs --encoder (the SSL encoder's safetensors)")
    # Not the preset's weights: they are the shipped SSL encoder, which the random arm must not get.
    cfg.encoder.weights = encoder if spec["ssl"] else "random"
    cfg.encoder.cos_weight = spec.get("cos_weight", cfg.encoder.cos_weight)
    cfg.encoder.finetune = spec.get("finetune", cfg.encoder.finetune)
    return cfg


def run_phase(
    run_dir: str,
    done_file: str,
    make_task: Callable,
    loop: LoopConfig,
    optim: OptimConfig,
    deadline: float,
    export: Callable[[dict[str, torch.Tensor]], None],
    batches: TensorBatches | None = None,
) -> bool:
    """One training phase through the product's loop, with checkpoints and metrics.jsonl in
    `run_dir`, stopped (and checkpointed) at `deadline`; True once its export has written
    `done_file` (the loop exports on rank 0 after the last step)."""
    left = (deadline - time.time()) / 60
    if not os.path.exists(done_file) and left > 0:
        train(make_task, replace(loop, max_minutes=left), optim, out=run_dir, batches=batches,
              export=export)  # fmt: skip
    if is_distributed():
        dist.barrier()  # the other ranks wait for rank 0's export
    return os.path.exists(done_file)


def batched(fn, x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)])


def run_arm(
    arm: str,
    encoder: str,
    s: ArmSettings,
    out: str,
    fm_root: str,
    inception: str | None,
    limit: int = 0,
) -> dict | None:
    """The arm's result (None while a training phase still has steps to go: run again)."""
    t_start = time.time()
    deadline = t_start + s.minutes * 60
    dev = init_from_env()
    work = os.path.join(out, arm)
    os.makedirs(work, exist_ok=True)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    train_x, train_y = fashion32("train", out, fm_root, limit)
    test_x, test_y = fashion32("test", out, fm_root, limit)
    train_gpu, train_y_gpu = train_x.to(dev), train_y.to(dev)

    # ---- stage 1
    tok_dir = os.path.join(work, "tokenizer")
    cfg = tokenizer_config(arm, encoder)
    built = []  # the phase's task: the export records the sizes its parts gave the decoder

    def make_tokenizer_task(device: torch.device) -> TokenizerTask:
        built.append(TokenizerTask(cfg, device))
        return built[-1]

    loop = LoopConfig(steps=s.tok_steps, batch_size=s.tok_batch, log_every=250,
                      checkpoint_every=1000, eval_every=0, seed=s.seed)  # fmt: skip
    if not run_phase(
        os.path.join(work, "stage1"),
        os.path.join(tok_dir, "tokenizer.json"),
        make_tokenizer_task,
        loop,
        preset_section(OptimConfig, "tokenizer/small", "optim"),
        deadline,
        lambda state: export_tokenizer(
            state, cfg, built[-1].model.decoder.sizes, tok_dir, extra={"arm": arm}
        ),
        TensorBatches({"image": train_gpu}, s.tok_batch, s.seed),
    ):
        return _unfinished(arm, "stage 1")
    tokenizer = load_tokenizer(tok_dir, dev)

    # ---- tokens of both splits (train: stage 2's data; test: the k-NN queries)
    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), amp:
            return tokenizer.encode(images_from_uint8(images, dev)).float()

    train_tok = batched(encode, train_gpu, 1000)

    # ---- stage 2
    gen_dir = os.path.join(work, "generator")
    gcfg = preset_section(GeneratorConfig, "generator/small")
    normalizer = TokenNormalizer(train_tok.mean(0).cpu(), train_tok.std(0).cpu())
    data = {"token": train_tok, "label": train_y_gpu}
    loop = LoopConfig(steps=s.gen_steps, batch_size=s.gen_batch, log_every=250,
                      checkpoint_every=1000, eval_every=0, flip=False, seed=s.seed)  # fmt: skip
    if not run_phase(
        os.path.join(work, "stage2"),
        os.path.join(gen_dir, "generator.json"),
        lambda device: GeneratorTask(gcfg, normalizer, device, data=data),
        loop,
        preset_section(OptimConfig, "generator/small", "optim"),
        deadline,
        lambda state: export_generator(
            state, gcfg, {"token_dim": train_tok.shape[1]}, normalizer, gen_dir, {"arm": arm}
        ),
    ):
        return _unfinished(arm, "stage 2")
    if world()[0] != 0:
        return None
    generator = load_generator(gen_dir, dev)

    sets_file = os.path.join(work, "sets.npz")
    if not os.path.exists(sets_file):
        result = {"arm": arm, **ARMS[arm], "settings": vars(s)}
        test_tok = batched(encode, test_x, 1000)
        result["token_knn"] = knn_accuracy(train_tok[:10000], train_y[:10000], test_tok, test_y)
        # The encoder as stage 1 began (load_tokenizer's config says weights="random", so
        # rebuild it; the random arm gets the same init through the same seed).
        torch.manual_seed(s.seed)
        frozen = SSLEncoder(tokenizer_config(arm, encoder).encoder).to(dev).eval()
        with torch.no_grad():
            enc_bank = batched(lambda x: frozen(images_from_uint8(x, dev)), train_x[:10000], 1000)
            enc_query = batched(lambda x: frozen(images_from_uint8(x, dev)), test_x, 1000)
        result["encoder_knn"] = knn_accuracy(enc_bank, train_y[:10000], enc_query, test_y)
        # images: test reconstructions, samples with and without CFG (kept as uint8 files,
        # so the Inception phase can run in a later command)
        sets = sample_sets(tokenizer, generator, encode, test_x, s, result, dev)
        per = min(20, len(sets["recon"]) // 3)  # three rows of `per` images from each set
        rows = [sets[k][i * per : (i + 1) * per] for k in sets for i in range(3)]
        Image.fromarray(image_grid(rows)).save(os.path.join(out, f"grid_{arm}.png"))
        np.savez(sets_file, **sets)
        result["minutes"] = (time.time() - t_start) / 60
        write_result(out, arm, result)
    inception_metrics(out, arm, inception, dev)
    return json.load(open(result_path(out, arm)))


def _unfinished(arm: str, phase: str) -> None:
    if world()[0] == 0:
        print(f"[{arm}] {phase} stopped by the time budget: run the same command to resume")


def result_path(out: str, arm: str) -> str:
    return os.path.join(out, f"arm_{arm}.json")


def write_result(out: str, arm: str, result: dict) -> None:
    with open(result_path(out, arm), "w") as f:
        json.dump(result, f, indent=2)
    print(f"[{arm}] " + json.dumps({k: v for k, v in result.items() if k != "settings"}))


def sample_sets(tokenizer, generator, encode, test_x, s: ArmSettings, result: dict, dev) -> dict:
    """uint8 (N, 32, 32, 3) sets: test reconstructions, class samples with and without CFG
    (classes in turn); records PSNR / SSIM of the reconstructions in `result`."""
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def decode(tokens: torch.Tensor, seed: int) -> torch.Tensor:
        with torch.no_grad(), amp:
            return tokenizer.decode(tokens, steps=s.decode_steps, seed=seed).float().clamp(-1, 1)

    n = min(s.samples, len(test_x))
    recon = batched(lambda x: decode(encode(x), 1), test_x[:n], 1000)
    real = images_from_uint8(test_x[:n], dev)
    result["psnr"] = psnr(recon, real).mean().item()
    result["ssim"] = ssim(recon, real).mean().item()
    sets = {"recon": images_to_uint8(recon)}
    labels = torch.arange(s.samples, device=dev) % 10
    gcfg = generator.cfg
    steps = preset_section(LoopConfig, "generator/small", "loop").sample_steps
    for name, scale in (("cfg", gcfg.guidance_scale), ("no_cfg", 1.0)):
        chunks = []
        for i in range(0, s.samples, 1000):
            with amp:
                tok = sample_tokens(generator.model, generator.normalizer,
                                    labels=labels[i : i + 1000], scale=scale,
                                    interval=tuple(gcfg.guidance_interval), steps=steps, seed=i)  # fmt: skip
            chunks.append(images_to_uint8(decode(tok, seed=10**6 + i)))
        sets[name] = np.concatenate(chunks)
    result["guidance_scale"], result["guidance_interval"] = (
        gcfg.guidance_scale,
        gcfg.guidance_interval,
    )
    return sets


def inception_metrics(out: str, arm: str, inception: str | None, dev) -> None:
    """rFID (reconstructions vs the test split) and gFID with / without CFG (vs the train
    split) into the arm's JSON, once `ssl_ablation.py fid-ref` has written the references."""
    ref = {sp: os.path.join(out, f"fid_{sp}.npz") for sp in ("train", "test")}
    if not all(os.path.exists(p) for p in ref.values()):
        print(f"[{arm}] no FID references in {out} (run fid-ref): Inception metrics skipped")
        return
    net = InceptionFeatures(inception).to(dev)
    result = json.load(open(result_path(out, arm)))
    with np.load(os.path.join(out, arm, "sets.npz")) as sets:

        def stats(name: str) -> FeatureStats:
            x = torch.from_numpy(sets[name]).permute(0, 3, 1, 2)
            return FeatureStats.from_features(extract_features(net, x, 500))

        result["rfid"] = fid(stats("recon"), FeatureStats.load(ref["test"]))
        train_ref = FeatureStats.load(ref["train"])
        result["gfid_cfg"] = fid(stats("cfg"), train_ref)
        result["gfid_no_cfg"] = fid(stats("no_cfg"), train_ref)
    write_result(out, arm, result)
