"""Stage 1 end to end on a real local Ray cluster and a real MLflow SQLite store."""

import subprocess
import sys

import mlflow
import pytest

from pipelines import train_tokenizer

pytestmark = pytest.mark.slow


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_train_stop_resume_fault_export(ray_cluster, fashion_parquet, tmp_path):
    store = tmp_path / "runs"
    args = [
        "--config",
        "configs/tokenizer/tiny.yaml",
        f"data.train={fashion_parquet / 'train'}",
        f"data.val={fashion_parquet / 'val'}",
        f"run.storage={store}",
        "run.name=t1",
        "run.num_workers=2",
        "loop.steps=30",
        "loop.checkpoint_every=10",
        "loop.log_every=5",
        "optim.lr=2e-3",
    ]
    # Part 1: two workers stop cleanly after the step-10 checkpoint.
    run_id = train_tokenizer.main([*args, "loop.stop_at_step=10"])
    assert (store / "t1" / "checkpoint_00000010").is_dir()
    assert not (store / "t1" / "export").exists()
    # Part 2: the same command resumes; a worker dies at step 15 and FailureConfig restarts
    # the group from the step-10 checkpoint; the run finishes and exports.
    run_id2 = train_tokenizer.main([*args, "loop.kill_worker_at_step=15"])
    assert run_id2 == run_id  # one MLflow run for both parts
    uri = f"sqlite:///{store / 'mlflow.db'}"
    assert (
        mlflow.MlflowClient(uri)
        .search_runs(
            [mlflow.MlflowClient(uri).get_experiment_by_name("reptok-tokenizer").experiment_id]
        )
        .__len__()
        == 1
    )
    resumed = [s for s, _ in _history(uri, run_id, "resumed_from_step")]
    assert resumed.count(10) == 2  # once after the stop, once after the killed worker
    assert (store / "t1" / "killed_once").exists()
    flow = _history(uri, run_id, "flow")
    steps = sorted({s for s, _ in flow})
    assert steps == [5, 10, 15, 20, 25, 30]
    first, last = flow[0][1], flow[-1][1]
    assert last < first, flow  # the loss drops
    assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    assert _history(uri, run_id, "eval/psnr")
    mv = mlflow.MlflowClient(uri).get_model_version_by_alias("reptok-tokenizer-tiny", "current")
    assert mv.run_id == run_id

    # The export loads in a fresh process and reconstructs an image.
    code = (
        "import sys, torch, numpy as np\n"
        "from reptok_core.exports.tokenizer import load_tokenizer\n"
        "from reptok_core.formats.images import heldout_batch\n"
        "tok = load_tokenizer(sys.argv[1])\n"
        "b = heldout_batch(sys.argv[2], 2)\n"
        "x = torch.from_numpy(b['image']).permute(0, 3, 1, 2).float() / 127.5 - 1\n"
        "y = tok.reconstruct(x, steps=4)\n"
        "assert y.shape == x.shape and torch.isfinite(y).all()\n"
        "print('reconstructed', tuple(y.shape))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(store / "t1" / "export"), str(fashion_parquet / "val")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "reconstructed (2, 3, 16, 16)" in out.stdout, out.stderr[-2000:]
