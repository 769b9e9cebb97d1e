"""FSDP2 on 2 gloo processes takes the same step as 1 process on the same global batch, and a
checkpoint written at world size 2 loads (resharded) at world size 1 with the same loss: the
product's step (train_step with EMA) on the stages' real losses (stage 1 with its cosine term,
stage 2 with label dropout) and the loop's checkpoints (benchmarks/bench_scaling.py check)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_scaling.py"


def _torchrun(n: int, *args: str) -> dict:
    out = Path(args[args.index("--out") + 1])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={n}",
        "--standalone",
        str(SCRIPT),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage", ["1", "2"])
def test_two_process_step_equals_one_process_and_reshards(stage, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    two = _torchrun(
        2, "check", "--stage", stage, "--out", str(tmp_path / "n2.json"), "--ckpt", ckpt
    )
    one = _torchrun(1, "check", "--stage", stage, "--out", str(tmp_path / "n1.json"))
    loaded = _torchrun(
        1, "check", "--stage", stage, "--out", str(tmp_path / "l.json"), "--load", ckpt
    )
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["loss_after"] != two["loss_before"]  # the step did something
    if stage == "1":
        # The real loss: the cosine term (0 at init, the encoder being its own frozen copy) counts.
        assert two["terms_after"]["cos"] > 0
    for key in ("loss_before", "grad_norm", "loss_after"):
        assert abs(two[key] - one[key]) < 1e-5 * max(1.0, abs(one[key])), key
    for key, value in one["terms_after"].items():
        assert abs(two["terms_after"][key] - value) < 1e-5 * max(1.0, abs(value)), key
    assert abs(loaded["loaded_loss"] - two["loss_after"]) < 1e-6
