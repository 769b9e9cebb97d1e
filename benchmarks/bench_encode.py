"""Token encoding throughput (`encode_tokens`: images -> tokens) on one device, without Ray.

`actor`: what one `encode_tokens` actor does per batch of decoded images: uint8 (B, 256, 256, 3)
from host memory -> device -> [-1, 1] -> the encoder's preprocessing (centre crop, resize to 224,
ImageNet normalisation) -> ViT under bf16 autocast -> fp32 tokens back on the host.
`forward`: the bound: the same ViT on inputs already preprocessed on the device (no copies).
Both with the `paper` encoder (DINOv2-B/14 with registers; random weights: speed only) unless
--tiny. Images/s, FLOPs per image counted on the forward, MFU against a measured matmul peak.

    python benchmarks/bench_encode.py --batches 64,256 --out encode.json
    python benchmarks/bench_encode.py --tiny --device cpu --batches 4     # smoke
"""

from __future__ import annotations

import argparse
import dataclasses

import _bench_common as bc  # first: puts the repo root on sys.path
import torch

from reptok_core.config import preset_section
from reptok_core.images import images_from_uint8
from reptok_core.models.encoder import EncoderConfig, SSLEncoder
from reptok_core.perf import count_flops, measure_matmul_peak, time_calls


def measure(
    encoder: SSLEncoder, b: int, size: int, dev: torch.device, iters: int, peak: float
) -> list[dict]:
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    host = torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8)
    host = host.pin_memory() if dev.type == "cuda" else host
    ready = encoder.preprocess(images_from_uint8(host, dev))

    @torch.no_grad()
    def actor() -> torch.Tensor:
        with amp:
            return encoder(images_from_uint8(host, dev)).float().cpu()

    @torch.no_grad()
    def forward() -> torch.Tensor:
        with amp:
            return encoder.vit.forward_features(ready)

    flops = count_flops(forward) / b
    rows = []
    for name, fn in (("actor", actor), ("forward", forward)):
        step = sorted(time_calls(fn, dev, iters, warmup=3))[iters // 2]
        rows.append({"mode": name, "batch": b, "step_s": step, "images_per_s": b / step,
                     "gflop_per_image": flops / 1e9, "mfu": flops * b / step / peak})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", default="64,256", help="comma-separated batch sizes")
    p.add_argument("--image-size", type=int, default=256, help="side of the decoded images")
    p.add_argument("--tiny", action="store_true", help="the tiny encoder (CPU smoke run)")
    p.add_argument("--device", default=None)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="", help="JSON results file")
    args = p.parse_args()
    dev = bc.pick_device(args.device)
    size = "tiny" if args.tiny else "paper"
    cfg = preset_section(EncoderConfig, f"tokenizer/{size}", "model.encoder")
    encoder = SSLEncoder(dataclasses.replace(cfg, weights="random")).to(dev).eval()
    size = 16 if args.tiny else args.image_size
    peak = measure_matmul_peak(dev) if dev.type == "cuda" else float("nan")
    results = bc.Results(args.out, {"env": bc.environment(dev), "peak_flops": peak})
    for b in (int(x) for x in args.batches.split(",")):
        for row in measure(encoder, b, size, dev, args.iters, peak):
            results.add(row)


if __name__ == "__main__":
    main()
