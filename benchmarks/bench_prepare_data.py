"""Images/s of pipelines/prepare_data.py against a plain single-process Pillow loop.

    .venv/bin/python benchmarks/bench_prepare_data.py                 # all modes, both datasets
    .venv/bin/python benchmarks/bench_prepare_data.py --modes loop,inline   # no Ray at all

Datasets: the 10,000 Fashion-MNIST test images (prepared at 64 px, the preset), and a folder of
1,000 256-px JPEGs made here from Fashion-MNIST (tinted, noised, upsampled; prepared at 256 px).
Modes: `loop` = read, decode, ADM crop, PNG encode in one Python loop, no Parquet (the bound per
core); `inline` = the whole stage in this process (planning, Parquet writes, manifest);
`ray` = the stage through Ray Data on a local cluster (Ray start-up excluded, reported apart).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import prepare_data as pdata  # noqa: E402
from reptok_core import prepare as prep  # noqa: E402
from reptok_core.config import load_config  # noqa: E402
from reptok_core.images import encode_image, prepare_array, prepare_bytes  # noqa: E402
from reptok_core.prepare import builtin_datasets  # noqa: E402


def make_jpeg_folder(root: Path, n: int) -> None:
    if root.is_dir() and len(list(root.rglob("*.jpg"))) == n:
        return
    shutil.rmtree(root, ignore_errors=True)
    x, y = builtin_datasets.load_fashion_mnist("test")
    rng = np.random.default_rng(0)
    for i in range(n):
        tint = rng.uniform(0.3, 1.0, 3)
        rgb = (x[i][..., None] * tint).astype(np.uint8)
        img = Image.fromarray(rgb).resize((256, 256), Image.Resampling.BICUBIC)
        arr = np.clip(np.asarray(img, np.int16) + rng.integers(-12, 13, (256, 256, 3)), 0, 255)
        d = root / builtin_datasets.FASHION_MNIST_CLASSES[y[i]].replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)


def loop_folder(root: Path, res: int) -> int:
    n = 0
    for p in sorted(root.rglob("*.jpg")):
        encode_image(prepare_bytes(p.read_bytes(), res), "png")
        n += 1
    return n


def loop_fashion(n: int, res: int) -> int:
    x, _ = builtin_datasets.load_fashion_mnist("test")
    for i in range(n):
        encode_image(prepare_array(x[i], res), "png")
    return n


def run_stage(args: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(prep.PrepareConfig, None, [*args, f"output.uri={out}", "progress_s=1000"])
    return pdata.run(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", default="/tmp/bench_prepare_data")
    ap.add_argument("--modes", default="loop,inline,ray")
    ap.add_argument("--n-fashion", type=int, default=10000)
    ap.add_argument("--n-jpeg", type=int, default=1000)
    ap.add_argument("--shard-rows", type=int, default=500)
    a = ap.parse_args()
    modes = a.modes.split(",")
    work = Path(a.workdir)
    folder = work / "jpegs"
    make_jpeg_folder(folder, a.n_jpeg)
    builtin_datasets.load_fashion_mnist("test")  # warm the reader cache for the loop timing

    cases = {
        "fashion-mnist (64 px)": (
            lambda: loop_fashion(a.n_fashion, 64),
            [
                "source.kind=fashion-mnist",
                "source.split=test",
                f"source.limit={a.n_fashion}",
                "image.resolution=64",
            ],
        ),
        f"{a.n_jpeg} JPEGs 256 px (256 px)": (
            lambda: loop_folder(folder, 256),
            ["source.kind=folder", f"source.uri={folder}", "image.resolution=256"],
        ),
    }
    results = []
    if "ray" in modes:
        import ray

        t = time.perf_counter()
        ray.init(include_dashboard=False)
        results.append(
            {"case": "ray.init()", "mode": "ray", "seconds": round(time.perf_counter() - t, 2)}
        )
    for name, (loop, stage_args) in cases.items():
        for mode in modes:
            t = time.perf_counter()
            if mode == "loop":
                n = loop()
            else:
                m = run_stage(
                    [*stage_args, f"executor={mode}", f"output.shard_rows={a.shard_rows}"],
                    work / f"out-{mode}",
                )
                n = m["rows"]
            dt = time.perf_counter() - t
            results.append(
                {
                    "case": name,
                    "mode": mode,
                    "images": n,
                    "seconds": round(dt, 2),
                    "images_per_s": round(n / dt, 1),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    print(f"\ncpus={os.cpu_count()} load_avg={os.getloadavg()}")
    print("| case | mode | images | seconds | images/s |\n|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['mode']} | {r.get('images', '')} | {r['seconds']} | {r.get('images_per_s', '')} |"
        )


if __name__ == "__main__":
    main()
