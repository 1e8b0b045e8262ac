"""`fourbit ptq` on a checkpoint of the evidence harness: scored on the run's own held-out plays."""

import math

import pytest
import torch

from fourbit.cli import main
from fourbit.eval import load_harness_run, perplexity
from fourbit.harness import train as ht


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = ht.train_config("tiny", steps=20, log_every=10, eval_every=10, eval_tokens=1024, ckpt_every=20)
    ht.train(cfg, out, progress=False)
    return out


def test_loads_the_trained_weights_and_the_validation_stream(run_dir):
    model, val = load_harness_run(run_dir)
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt.items())
    # perplexity through fourbit.eval equals exp of the model's own mean cross-entropy on the same windows
    T = model.config.block_size
    ids = val[: 4 * T]
    windows = ids.reshape(4, T)
    with torch.no_grad():  # the model's own loss: each window's first T-1 tokens predict the next ones
        _, loss = model(windows[:, :-1], windows[:, 1:])
    ppl = perplexity(model, ids, seq_len=T)  # fourbit.eval scores the same T-1 targets per window
    assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_ptq_command_on_a_run_directory(run_dir, capsys):
    assert main(["ptq", "--model", str(run_dir), "--scheme", "nvfp4", "--activations",
                 "--calib-tokens", "128", "--max-tokens", "512"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:2]): float(line.split()[2]) for line in out.splitlines()
            if line.startswith(("bf16", "nvfp4"))}  # fmt: skip
    assert set(rows) == {("bf16", "-"), ("nvfp4", "W"), ("nvfp4", "W+A")}
    assert all(math.isfinite(v) and v > 1 for v in rows.values())
