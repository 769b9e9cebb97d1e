"""Issue 7's experiment (skeleton): does a self-supervised encoder make a better RepTok latent space?

Fashion-MNIST at 32 px, pixel space. Step 1 pretrains a ViT-S/4 with DINO (this file, plain
PyTorch, no Ray: it runs under a 10-minute command limit, resuming from `--out` each time).
Step 2 prints the stage-1 / stage-2 commands of the four arms (the pipelines do that work):

    (a) SSL encoder, λ = 0.1        (b) same ViT, random init
    (c) SSL encoder, λ = 0          (d) SSL encoder, [cls] embedding frozen (finetune=none)

    python benchmarks/ssl_ablation.py pretrain --preset configs/pretrain/small.yaml --out runs/ssl --minutes 9
    python benchmarks/ssl_ablation.py plan --out runs/ssl --data runs/fm32

Claims to check (paper Table 4 / Fig. 9): gFID(a) ≪ gFID(b); gFID(a) < gFID(c); PSNR(a) > PSNR(d).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from reptok_core.builtin_datasets import load_fashion_mnist  # noqa: E402
from reptok_core.config import from_dict, read_yaml  # noqa: E402
from reptok_core.dino import DinoConfig, DinoTask, ProbeSet, export_encoder, knn_accuracy  # noqa: E402
from reptok_core.images import prepare_array  # noqa: E402
from reptok_core.training import OptimConfig, build_optimizer, lr_at, train_step  # noqa: E402

ARMS = {
    "a_ssl": ["model.encoder.weights={enc}"],
    "b_random": ["model.encoder.weights=random"],
    "c_ssl_no_cos": ["model.encoder.weights={enc}", "model.encoder.cos_weight=0"],
    "d_ssl_cls_frozen": ["model.encoder.weights={enc}", "model.encoder.finetune=none"],
}


def fashion(split: str, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, labels = load_fashion_mnist(split)
    images = np.stack([prepare_array(pixels[i], size) for i in range(min(n, len(labels)))])
    return torch.from_numpy(images), torch.from_numpy(labels[: len(images)])


def pretrain(args: argparse.Namespace) -> None:
    """DINO on the Fashion-MNIST train split; state in `--out/state.pt`, resumed on every call."""
    preset = read_yaml(args.preset)
    cfg = from_dict(DinoConfig, preset["model"])
    optim = from_dict(OptimConfig, preset.get("optim", {}))
    steps, batch = args.steps or preset["loop"]["steps"], args.batch or preset["loop"]["batch_size"]
    cfg.total_steps = steps
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = cfg.encoder.img_size
    train_x, _ = fashion("train", 60000, size)
    bank = ProbeSet(*fashion("train", args.knn_bank, size), k=20)
    queries = fashion("test", args.knn_queries, size)
    torch.manual_seed(0)
    task = DinoTask(cfg, device, bank)
    model = task.model
    optimizer = build_optimizer(model.parameters(), optim, device)
    os.makedirs(args.out, exist_ok=True)
    state_file, step = os.path.join(args.out, "state.pt"), 0
    if os.path.exists(state_file):
        st = torch.load(state_file, map_location=device, weights_only=True)
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optim"])
        step = int(st["step"])
    if step == 0:
        random_acc = knn_accuracy(
            task.encode(bank.bank_images), bank.bank_labels, task.encode(queries[0]), queries[1]
        )
        print(f"[ssl] random-init k-NN accuracy {random_acc:.4f}", flush=True)
    g = torch.Generator().manual_seed(step)
    t0, precision = time.time(), "bf16" if device.type == "cuda" else "fp32"
    while step < steps and time.time() - t0 < args.minutes * 60:
        idx = torch.randint(0, len(train_x), (batch,), generator=g)
        out = train_step(
            model,
            optimizer,
            lambda idx=idx: task.loss({"image": train_x[idx]}),
            lr=lr_at(step, steps, optim),
            grad_clip=optim.grad_clip,
            device=device,
            precision=precision,
        )
        step += 1
        task.after_step(step)
        if step % 50 == 0 or step == steps:
            print(f"[ssl] step {step}/{steps} dino {out['dino'].item():.4f}", flush=True)
    torch.save(
        {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}, state_file
    )
    meta = export_encoder(
        model.state_dict(),
        cfg,
        os.path.join(args.out, "export"),
        fp16=True,
        extra={"command": " ".join(sys.argv), "step": step},
        probe=bank,
        queries=queries,
    )
    print(f"[ssl] step {step}: k-NN accuracy {meta['knn_accuracy']:.4f}", flush=True)


def plan(args: argparse.Namespace) -> None:
    """The stage-1 and stage-2 commands of every arm (not run here: each fits its own command)."""
    enc = os.path.join(args.out, "export", "encoder.safetensors")
    meta = json.load(open(os.path.join(args.out, "export", "encoder.json")))
    arch = meta["encoder"]["arch"]
    common = [
        f"model.encoder.arch={json.dumps(arch).replace(' ', '')}",
        f"model.encoder.img_size={meta['encoder']['img_size']}",
    ]
    for arm, overrides in ARMS.items():
        ov = " ".join([o.format(enc=enc) for o in overrides] + common)
        print(
            f"python pipelines/train_tokenizer.py --config configs/tokenizer/small.yaml "
            f"data.train={args.data}/train data.val={args.data}/val run.name=tok-{arm} {ov}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pretrain", help="DINO on Fashion-MNIST, resumable, with k-NN probe")
    a.add_argument("--preset", default="configs/pretrain/small.yaml")
    a.add_argument("--out", default="runs/ssl")
    a.add_argument("--steps", type=int, default=0, help="0 = the preset's loop.steps")
    a.add_argument("--batch", type=int, default=0, help="0 = the preset's loop.batch_size")
    a.add_argument("--minutes", type=float, default=9.0, help="stop (and save) after this long")
    a.add_argument("--knn-bank", type=int, default=10000)
    a.add_argument("--knn-queries", type=int, default=2000)
    b = sub.add_parser("plan", help="print the stage-1 commands of the four arms")
    b.add_argument("--out", default="runs/ssl")
    b.add_argument("--data", default="runs/fm32", help="Fashion-MNIST 32 px images Parquet root")
    args = p.parse_args()
    pretrain(args) if args.cmd == "pretrain" else plan(args)


if __name__ == "__main__":
    main()
