"""Build the folder that carries Ray, MLflow and their missing dependencies to a GPU machine
whose image has Python 3.12 and PyTorch but no Ray, and nothing to download them from.

    python cluster/gpu_bundle.py --dest .gpu_bundle           # here, with network to PyPI
    # there:
    mkdir -p /tmp/site && tar -xJf .gpu_bundle/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site

What it does: `pip download` (cp312, manylinux x86_64, no dependencies resolved there) of the
pinned wheels in cluster/gpu_bundle.txt, a `pip install --target` of them into one site
folder, then prunes what a Python-only Ray never loads (the Java worker's 33 MB jar, RLlib,
the dashboard's web build, byte code) and strips the debug symbols of Ray's native binaries
(gcs_server, raylet, _raylet.so: 120 MB -> 84 MB), and packs the folder with xz. Measured on
2026-12-01: site.tar.xz 31 MB against the 79 MB ray wheel alone, so Ray, MLflow (with its
SQLite store) and the SD-VAE's diffusers fit the 64 MiB that travels with a working tree.
Unpacking takes a few seconds; nothing is compiled there.

`--data` also prepares a small Fashion-MNIST images Parquet (32 px) with the real
prepare_data entry point (Debian's dataset-fashion-mnist, on this side only), and `--code`
copies this checkout's code, for a tool that ships another checkout than the one you edit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLATFORMS = [
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
]
# Relative to the site folder: never imported by a Python-only Ray pipeline.
PRUNE = [
    "ray/jars",  # the Java worker (ray_dist.jar, 33 MB)
    "ray/rllib",
    "ray/dashboard/client/build",  # the web UI; the dashboard head is not started without ray[default]
    "ray/llm",
    "bin",  # console scripts written for this machine's interpreter; use `python3 -m ...` there
]
STRIP = ["ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet"]
CODE = ["reptok_core", "pipelines", "benchmarks", "configs", "cluster", "pyproject.toml"]


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def pip_platform_args(python_version: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def requirements(path: str) -> list[str]:
    with open(path) as f:
        lines = [ln.split("#", 1)[0].strip() for ln in f]
    reqs = [ln for ln in lines if ln]
    unpinned = [r for r in reqs if "==" not in r]
    if unpinned:
        raise SystemExit(f"error: {path}: pin every requirement (NAME==VERSION): {unpinned}")
    return reqs


def build_site(dest: str, reqs: list[str], python_version: str) -> str:
    wheels = os.path.join(dest, "cache", "wheels")
    site = os.path.join(dest, "cache", "site")
    os.makedirs(wheels, exist_ok=True)
    plat = pip_platform_args(python_version)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "download", "-q", "--no-deps", *plat, "-d", wheels, *reqs])
    shutil.rmtree(site, ignore_errors=True)
    run([*pip, "install", "-q", "--no-deps", "--no-compile", "--no-index", "--find-links",
         wheels, "--target", site, *plat, *reqs])  # fmt: skip
    for rel in PRUNE:
        shutil.rmtree(os.path.join(site, rel), ignore_errors=True)
    for top, dirs, files in os.walk(site):
        for d in [d for d in dirs if d == "__pycache__"]:
            shutil.rmtree(os.path.join(top, d))
            dirs.remove(d)
        for f in files:
            if f.endswith(".js.map"):
                os.remove(os.path.join(top, f))
    if shutil.which("strip"):
        for rel in STRIP:
            run(["strip", "--strip-unneeded", os.path.join(site, rel)])
    else:
        print("strip not found: Ray's binaries keep their symbols (about 10 MB more packed)")
    return site


def pack(site: str, dest: str) -> str:
    out = os.path.join(dest, "site.tar.xz")
    env = {**os.environ, "XZ_OPT": "-6 -T0"}
    run(["tar", "-cJf", out, "-C", site, "."], env=env)
    return out


def prepare_data(dest: str, train: int, val: int) -> None:
    """A small 32-px Fashion-MNIST images Parquet with the real entry point (executor=inline:
    no Ray needed here)."""
    out = os.path.join(dest, "data", "fashion32")
    shutil.rmtree(out, ignore_errors=True)
    frac = val / (train + val)
    run([sys.executable, os.path.join(ROOT, "pipelines", "prepare_data.py"),
         "--config", os.path.join(ROOT, "configs", "prepare", "fashion-mnist.yaml"),
         f"output.uri={out}", "image.resolution=32", f"source.limit={train + val}",
         f"output.val_fraction={frac:.4f}", "output.shard_rows=2000", "executor=inline"],
        cwd=ROOT)  # fmt: skip


def copy_code(dest: str) -> None:
    repo = os.path.join(dest, "repo")
    shutil.rmtree(repo, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    for name in CODE:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(repo, name), ignore=ignore)
        else:
            shutil.copy2(src, os.path.join(repo, name))


def size_mb(path: str) -> float:
    if os.path.isfile(path):
        return os.path.getsize(path) / 2**20
    return (
        sum(os.path.getsize(os.path.join(t, f)) for t, _, fs in os.walk(path) for f in fs) / 2**20
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dest", default=".gpu_bundle", help="bundle folder (ignore it in git)")
    p.add_argument("--requirements", default=os.path.join(ROOT, "cluster", "gpu_bundle.txt"))
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    p.add_argument("--data", action="store_true", help="also prepare the Fashion-MNIST Parquet")
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--val-images", type=int, default=500)
    p.add_argument("--code", action="store_true", help="also copy this checkout's code (repo/)")
    p.add_argument("--budget-mb", type=float, default=64, help="fail when the bundle is larger")
    args = p.parse_args()
    dest = os.path.abspath(args.dest)
    site = build_site(dest, requirements(args.requirements), args.python_version)
    packed = pack(site, dest)
    if args.data:
        prepare_data(dest, args.train_images, args.val_images)
    if args.code:
        copy_code(dest)
    travels = [packed] + [os.path.join(dest, d) for d in ("data", "repo")]
    total = sum(size_mb(t) for t in travels if os.path.exists(t))
    print(f"site {size_mb(site):.0f} MB unpacked, {size_mb(packed):.1f} MB packed; "
          f"travels {total:.1f} MB (carry {dest} without its cache/)")  # fmt: skip
    if total > args.budget_mb:
        raise SystemExit(f"error: the bundle is {total:.1f} MB, over --budget-mb {args.budget_mb}")


if __name__ == "__main__":
    main()
