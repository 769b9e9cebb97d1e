"""The README's cluster path on one machine: `ray start --head` with token authentication,
`ray job submit --working-dir`, then the registered model loaded from a fresh process after
the job's working directory (Ray's temporary copy of it) is gone."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")

pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _run(cmd: list[str], env: dict, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def token_auth_head(tmp_path):
    """A separate local head (not the session's cluster) with token authentication on, as
    Ray 2.60 turns it on for local clusters; yields (dashboard address, client env, Ray's temp
    dir, the head process)."""
    # Ray's socket paths must stay under 108 characters: a short temp dir, not tmp_path.
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, metrics, rt_env = _free_ports(7)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=uuid.uuid4().hex,
        HOME=str(tmp_path / "home"),  # no ~/.ray/auth_token from other runs
    )
    start = [
        RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}", f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    # --block: the head lives as our child; ending it ends its Ray processes (never `ray stop`,
    # which would stop every Ray on the machine, the session's cluster included).
    head = subprocess.Popen(
        [*start, "--block"], env=env, cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # answering (401 without the token): up
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                assert time.time() < deadline, "the head did not come up"
                time.sleep(1)
        yield address, env, temp, head
    finally:
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)


def _stop(head: subprocess.Popen) -> None:
    if head.poll() is None:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # anything of ours left in its process group
    except ProcessLookupError:
        pass


def test_job_submit_registers_a_model_that_outlives_the_job(
    token_auth_head, fashion_parquet, tmp_path
):
    address, env, ray_temp, head = token_auth_head
    work = tmp_path / "checkout"  # the repository as a user has it, minus the venv
    for part in ("pipelines", "reptok_core", "configs"):
        shutil.copytree(REPO / part, work / part, ignore=shutil.ignore_patterns("__pycache__"))
    store = tmp_path / "jobsubmit_runs"
    entry = [
        sys.executable, "pipelines/train_tokenizer.py", "--config", "configs/tokenizer/tiny.yaml",
        f"data.train={fashion_parquet / 'train'}", f"run.storage={store}", "run.name=job",
        "run.register_as=job-tok", "loop.steps=4", "loop.checkpoint_every=4",
        "loop.eval_every=4", "loop.log_every=2",
    ]  # fmt: skip
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(work), "--", *entry]

    # Without the token the head refuses the client, as the README warns.
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    refused = _run(submit, no_token, cwd=work)
    assert refused.returncode != 0
    assert "authentication" in (refused.stdout + refused.stderr).lower()

    done = _run(submit, env, timeout=600, cwd=work)
    log = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0 and "succeeded" in log.lower(), log
    # Everything the job wrote is in the run store; nothing in the checkout.
    assert (store / "mlflow.db").is_file() and (store / "mlartifacts").is_dir()
    assert not (work / "mlruns").exists()
    registry = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    source = registry.get_model_version_by_alias("job-tok", "current").source
    assert source.startswith((store / "mlartifacts").as_uri()), source
    _stop(head)
    shutil.rmtree(ray_temp, ignore_errors=True)  # the job's working directory is gone
    shutil.rmtree(work)

    code = (
        "import sys, torch\n"
        "from pipelines import model_uri\n"
        "from reptok_core.stages.tokenizer import load_tokenizer\n"
        "got = model_uri.resolve('models:/job-tok@current', sys.argv[1], sys.argv[2])\n"
        "tok = load_tokenizer(got.folder)\n"
        "z = tok.encode(torch.zeros(1, 3, 16, 16))\n"
        "print('loaded version', got.version, tuple(z.shape))\n"
    )
    fresh = _run(
        [sys.executable, "-c", code, f"sqlite:///{store / 'mlflow.db'}", str(tmp_path / "dl")],
        {**os.environ, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "loaded version 1 (1, 32)" in fresh.stdout
