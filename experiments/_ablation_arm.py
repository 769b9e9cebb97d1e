"""One arm of the SSL ablation, end to end on one device (see experiments/ssl_ablation.py).

Stage 1 trains the `small` tokenizer (configs/tokenizer/small.yaml) with the arm's encoder
settings, stage 2 the `small` class-conditional MLP-Mixer (configs/generator/small.yaml) on the
EMA tokenizer's tokens of the train split. Every arm runs the same steps, batches and seeds, so
the encoder is the only difference. Each phase writes its output before the next starts, and a
re-run skips phases already done (`--out/<arm>/`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from _fashion32 import fashion32
from PIL import Image

from reptok_core.config import from_dict, read_yaml
from reptok_core.device import resolve_device, resolve_precision
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
from reptok_core.training.optim import EMA, OptimConfig, build_optimizer, lr_at, train_step

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


def tokenizer_config(arm: str, encoder: str) -> TokenizerConfig:
    spec = ARMS[arm]
    cfg = from_dict(TokenizerConfig, read_yaml("configs/tokenizer/small.yaml")["model"])
    if spec["ssl"]:
        if not encoder:
            raise ValueError(f"arm {arm} needs --encoder (the SSL encoder's safetensors)")
        cfg.encoder.weights = encoder
    cfg.encoder.cos_weight = spec.get("cos_weight", cfg.encoder.cos_weight)
    cfg.encoder.finetune = spec.get("finetune", cfg.encoder.finetune)
    return cfg


def train(model, loss_fn, optim: OptimConfig, steps: int, dev, log, name: str) -> EMA:
    """The shared step (bf16 autocast on GPU, AdamW, clipping, EMA) for `steps` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, optim, dev)
    ema = EMA(model, optim.ema_decay)
    t0 = time.time()
    for step in range(steps):
        out = train_step(
            model,
            optimizer,
            lambda step=step: loss_fn(step),
            lr=lr_at(step, steps, optim),
            grad_clip=optim.grad_clip,
            device=dev,
            precision=resolve_precision("auto", dev),
            ema=ema,
        )
        if (step + 1) % 250 == 0 or step + 1 == steps:
            log(phase=name, step=step + 1, loss=out["total"].item(),
                s_per_step=(time.time() - t0) / (step + 1))  # fmt: skip
    return ema


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
) -> dict:
    dev = resolve_device()
    work = os.path.join(out, arm)
    os.makedirs(work, exist_ok=True)
    logf = open(os.path.join(work, "log.jsonl"), "a")

    def log(**row) -> None:
        print(f"[{arm}] " + json.dumps(row), flush=True)
        logf.write(json.dumps(row) + "\n")
        logf.flush()

    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    train_x, train_y = fashion32("train", out, fm_root, limit)
    test_x, test_y = fashion32("test", out, fm_root, limit)
    train_gpu, train_y_gpu = train_x.to(dev), train_y.to(dev)
    t_start = time.time()

    # ---- stage 1
    tok_dir = os.path.join(work, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        torch.manual_seed(s.seed)
        cfg = tokenizer_config(arm, encoder)
        task = TokenizerTask(cfg, dev)
        optim = from_dict(OptimConfig, read_yaml("configs/tokenizer/small.yaml")["optim"])
        gen = torch.Generator(device=dev).manual_seed(s.seed)

        def tok_loss(step: int) -> dict:
            idx = torch.randint(0, len(train_gpu), (s.tok_batch,), generator=gen, device=dev)
            return task.loss({"image": train_gpu[idx]})

        ema = train(task.model, tok_loss, optim, s.tok_steps, dev, log, "stage1")
        with ema.swapped_in(task.model):
            state, sizes = task.model.state_dict(), task.model.decoder.sizes
            export_tokenizer(state, cfg, sizes, tok_dir, extra={"arm": arm})
    tokenizer = load_tokenizer(tok_dir, dev)

    # ---- tokens of both splits (train: stage 2's data; test: the k-NN queries)
    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), amp:
            return tokenizer.encode(images_from_uint8(images, dev)).float()

    train_tok = batched(encode, train_gpu, 1000)
    test_tok = batched(encode, test_x, 1000)
    result = {"arm": arm, **ARMS[arm], "settings": vars(s)}
    result["token_knn"] = knn_accuracy(train_tok[:10000], train_y[:10000], test_tok, test_y)
    # The encoder as stage 1 began (load_tokenizer's config says weights="random", so rebuild
    # it; the random arm gets the same init through the same seed).
    torch.manual_seed(s.seed)
    frozen = SSLEncoder(tokenizer_config(arm, encoder).encoder).to(dev).eval()
    with torch.no_grad():
        enc_bank = batched(lambda x: frozen(images_from_uint8(x, dev)), train_x[:10000], 1000)
        enc_query = batched(lambda x: frozen(images_from_uint8(x, dev)), test_x, 1000)
    result["encoder_knn"] = knn_accuracy(enc_bank, train_y[:10000], enc_query, test_y)

    # ---- stage 2
    gen_dir = os.path.join(work, "generator")
    if not os.path.exists(os.path.join(gen_dir, "generator.json")):
        torch.manual_seed(s.seed)
        preset = read_yaml("configs/generator/small.yaml")
        gcfg = from_dict(GeneratorConfig, preset["model"])
        normalizer = TokenNormalizer(train_tok.mean(0).cpu(), train_tok.std(0).cpu())
        gtask = GeneratorTask(gcfg, normalizer, dev)
        optim = from_dict(OptimConfig, preset["optim"])
        gen = torch.Generator(device=dev).manual_seed(s.seed)

        def gen_loss(step: int) -> dict:
            idx = torch.randint(0, len(train_tok), (s.gen_batch,), generator=gen, device=dev)
            return gtask.loss({"token": train_tok[idx], "label": train_y_gpu[idx]}, flip=False)

        ema = train(gtask.model, gen_loss, optim, s.gen_steps, dev, log, "stage2")
        with ema.swapped_in(gtask.model):
            state, sizes = gtask.model.state_dict(), gtask.model.sizes
            export_generator(state, gcfg, sizes, normalizer, gen_dir, {"arm": arm})
    generator = load_generator(gen_dir, dev)

    # ---- images: test reconstructions, samples with and without CFG (kept as uint8 files,
    # so the Inception phase can run in a later command)
    sets_file = os.path.join(work, "sets.npz")
    if not os.path.exists(sets_file):
        sets = sample_sets(tokenizer, generator, encode, test_x, s, result, dev)
        per = min(20, len(sets["recon"]) // 3)  # three rows of `per` images from each set
        rows = [sets[k][i * per : (i + 1) * per] for k in sets for i in range(3)]
        Image.fromarray(image_grid(rows)).save(os.path.join(out, f"grid_{arm}.png"))
        np.savez(sets_file, **sets)
        result["minutes"] = (time.time() - t_start) / 60
        write_result(out, arm, result)
    inception_metrics(out, arm, inception, dev)
    return json.load(open(result_path(out, arm)))


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
    for name, scale in (("cfg", gcfg.guidance_scale), ("no_cfg", 1.0)):
        chunks = []
        for i in range(0, s.samples, 1000):
            with amp:
                tok = sample_tokens(generator.model, generator.normalizer,
                                    labels=labels[i : i + 1000], scale=scale,
                                    interval=tuple(gcfg.guidance_interval), steps=50, seed=i)  # fmt: skip
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
