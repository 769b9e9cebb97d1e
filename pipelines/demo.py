"""`make demo`: the whole pipeline on embedded defaults, on a laptop, in about 15 minutes.

prepare (Fashion-MNIST from Debian's package, 32 px) -> train tokenizer -> encode tokens ->
train the class-conditional generator -> evaluate -> Ray Serve: request images, save, stop.
Local Ray, MLflow on SQLite, everything under `demo.out`. Re-running skips finished work
(each stage is idempotent / resumes), so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import common  # noqa: E402
from reptok_core.config import opt, preset_section, section  # noqa: E402
from reptok_core.models.tokenizer import TokenizerConfig  # noqa: E402


@dataclass
class DemoSettings:
    out: str = opt("demo_out", "folder for data, runs, the MLflow store and the generated images")
    images: int = opt(4000, "Fashion-MNIST training images to prepare (of 60,000)")
    eval_images: int = opt(100, "held-out images / samples for evaluate (FID on CPU is slow)")
    port: int = opt(8000, "port of the demo's Serve endpoint on 127.0.0.1")


@dataclass
class DemoConfig:
    demo: DemoSettings = section(DemoSettings, "demo settings")


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _request_images(url: str, out_dir: str) -> list[str]:
    import requests

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for label in range(10):
        r = requests.post(
            f"{url}/generate",
            json={"label": label, "n": 4, "steps": 25, "seed": label, "format": "json"},
            timeout=300,
        )
        r.raise_for_status()
        for i, b64 in enumerate(r.json()["images"]):
            path = os.path.join(out_dir, f"class{label}_{i}.png")
            with open(path, "wb") as f:
                f.write(base64.b64decode(b64))
            paths.append(path)
    r = requests.get(f"{url}/info", timeout=30)
    with open(os.path.join(out_dir, "info.json"), "w") as f:
        f.write(r.text)
    return paths


def main(argv: list[str] | None = None) -> None:
    cfg = common.parse_cli(DemoConfig, argv, __doc__).demo
    from pipelines import (
        encode_tokens,
        evaluate,
        prepare_data,
        serve,
        train_generator,
        train_tokenizer,
    )

    t0 = time.time()
    out = os.path.abspath(cfg.out)
    runs = os.path.join(out, "runs")
    # The images are prepared at the side the demo's tokenizer preset is built for.
    resolution = preset_section(TokenizerConfig, "demo/tokenizer").image_size
    data = os.path.join(out, "data", f"fashion-mnist-{resolution}")
    tokens = os.path.join(out, "tokens")
    common.init_ray(min_cpus=4)

    _banner("1/6 prepare_data: Fashion-MNIST -> images Parquet")
    prepare_data.main(
        [
            "--config",
            "configs/prepare/fashion-mnist.yaml",
            f"output.uri={data}",
            f"image.resolution={resolution}",
            f"source.limit={cfg.images}",
            "output.shard_rows=1000",
            "output.val_fraction=0.05",
        ]
    )
    _banner("2/6 train_tokenizer (stage 1)")
    train_tokenizer.main(
        [
            "--config",
            "configs/demo/tokenizer.yaml",
            f"data.train={data}/train",
            f"data.val={data}/val",
            f"run.storage={runs}",
        ]
    )
    tokenizer = os.path.join(runs, "tokenizer-demo", "export")
    _banner("3/6 encode_tokens: images -> one token each")
    encode_tokens.main(
        [
            f"encode.images={data}/train",
            f"encode.output={tokens}",
            f"encode.tokenizer={tokenizer}",
            f"run.storage={runs}",
            "run.name=encode-demo",
            "encode.batch_size=256",
            "encode.max_actors=1",
        ]
    )
    _banner("4/6 train_generator (stage 2, class-conditional)")
    train_generator.main(
        ["--config", "configs/demo/generator.yaml", f"data.train={tokens}", f"run.storage={runs}"]
    )
    generator = os.path.join(runs, "generator-demo", "export")
    _banner("5/6 evaluate: PSNR / SSIM / rFID, gFID / IS")
    metrics = evaluate.main(
        [
            f"tokenizer={tokenizer}",
            f"generator={generator}",
            f"val={data}/val",
            f"run.storage={runs}",
            "run.name=evaluate-demo",
            f"recon.num_images={cfg.eval_images}",
            f"gen.num_samples={cfg.eval_images}",
            f"gen.num_reference={cfg.eval_images}",
            "recon.steps=25",
            "gen.steps=25",
            "recon.lpips=false",
        ]
    )
    _banner("6/6 serve: request 40 generated images over HTTP")
    serve_cfg = common.parse_cli(
        serve.ServeConfig,
        [
            f"model.tokenizer={tokenizer}",
            f"model.generator={generator}",
            f"http.port={cfg.port}",
        ],
        "",
    )
    url = serve.start(serve_cfg)
    try:
        paths = _request_images(url, os.path.join(out, "images"))
    finally:
        from ray import serve as ray_serve

        ray_serve.shutdown()

    _banner(f"done in {time.time() - t0:.0f} s")
    print(f"generated images : {os.path.join(out, 'images')} ({len(paths)} PNGs)")
    print(f"metrics          : {json.dumps({k: round(v, 4) for k, v in metrics.items()})}")
    print(f"exports          : {tokenizer}  ·  {generator}")
    print(f"compare runs     : .venv/bin/mlflow ui --backend-store-uri sqlite:///{runs}/mlflow.db")


if __name__ == "__main__":
    main()
