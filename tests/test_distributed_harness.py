"""`fourbit train` under torchrun on CPU (gloo, 2 processes): DDP and FSDP2 match one process with the
same global batch, and a sharded checkpoint saved on 2 ranks resumes on 1.

Tolerances: bf16 differs from one process only in float32 summation order (the all-reduce adds the two
ranks' partial gradients), ~1e-7 relative per step. The quantized recipes quantize each shard exactly
as one process quantizes the whole batch (all-reduced amax, SR indexed by position in the global batch,
see fourbit/nn/linear.py; tests/test_distributed.py checks the gradients to 1e-5), but a
summation-order difference in a weight can move it across a rounding boundary of its FP4 grid in a later
step, so the losses of a 4-step run agree to ~1e-4 relative rather than to float32 round-off.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SCRIPT = HERE / "_dist_train.py"
STEPS = 4
RTOL = {"bf16": 1e-5, "nvfp4": 1e-3}  # see the module docstring


def run(out: Path, recipe: str, parallel: str = "none", nproc: int = 1, stop_after: int = 0, resume: bool = False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    args = [str(out), recipe, parallel, str(STEPS), str(stop_after), "resume" if resume else "fresh"]
    if nproc == 1 and parallel == "none":
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        torchrun = shutil.which("torchrun") or "torchrun"
        cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(metrics: list[dict]) -> list[tuple[int, float, float]]:
    return [(m["step"], m["train_loss"], m["val_loss"]) for m in metrics if m["train_loss"] is not None]


def assert_losses_close(a, b, rtol):
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(1, STEPS + 1))
    for (step, ta, va), (_, tb, vb) in zip(a, b):
        assert ta == pytest.approx(tb, rel=rtol), f"train loss at step {step}"
        assert va == pytest.approx(vb, rel=rtol), f"val loss at step {step}"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return {r: losses(run(root / r, r)) for r in RTOL}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
@pytest.mark.parametrize("recipe", list(RTOL))
def test_two_ranks_match_one_process(single, recipe, parallel, tmp_path):
    assert_losses_close(losses(run(tmp_path / "run", recipe, parallel, nproc=2)), single[recipe], RTOL[recipe])


def test_sharded_checkpoint_from_two_ranks_resumes_on_one(single, tmp_path):
    out = tmp_path / "run"
    run(out, "nvfp4", "fsdp2", nproc=2, stop_after=2)
    assert (out / "ckpt_dcp").is_dir() and not (out / "ckpt.pt").exists()
    resumed = losses(run(out, "nvfp4", resume=True))
    assert_losses_close(resumed, single["nvfp4"], RTOL["nvfp4"])


def test_parallel_without_torchrun_is_a_clear_error(tmp_path):
    from fourbit.cli import main

    env_backup = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        assert main(["train", "--parallel", "ddp", "--steps", "1", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    finally:
        os.environ.update(env_backup)
