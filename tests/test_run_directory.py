"""What a run directory guarantees (``fourbit.harness.train``, ``docs/training.md``): a rerun never wipes a
run unless told to; SIGTERM checkpoints like Ctrl-C and the run resumes bit for bit; a damaged checkpoint,
run.json or metrics line is refused naming the file; a torn last metrics line and stale temporaries from a
killed process are cleaned up; ``--resume`` with no checkpoint says that it starts over."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch

from fourbit.cli import main as cli_main
from fourbit.harness import train as ht

TIMING = ("tokens_per_s", "elapsed_s")  # wall-clock fields: never reproducible
SIGTERM_STATUS = 128 + signal.SIGTERM
SLOW_STEP_S = 0.3  # the SIGTERM'd process sleeps this long per step, so the signal lands mid-run
START_TIMEOUT_S = 300  # a loaded CI machine can take long to import torch and build the model


def tiny_cfg(**kw) -> ht.TrainConfig:
    base = dict(steps=4, batch_size=2, log_every=2, eval_every=2, eval_tokens=256, ckpt_every=100)
    return ht.train_config("tiny", **{**base, **kw})


def _losses(run_dir):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in ht.read_metrics(run_dir)]


def _interrupted_at(cfg, out, at=2):
    def ctrl_c(step):
        if step == at:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        ht.train(cfg, out, progress=False, callback=ctrl_c)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted 4-step run: the reference every resumed run must reproduce."""
    return ht.train(tiny_cfg(), tmp_path_factory.mktemp("whole"), progress=False)


# -- nothing lost ---------------------------------------------------------------------------------------------


def test_a_rerun_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    cfg = tiny_cfg(steps=2)
    ht.train(cfg, tmp_path, progress=False)
    before = (tmp_path / ht.METRICS).read_text()
    with pytest.raises(ValueError, match=r"holds a previous run \(run.json, metrics.jsonl, ckpt.pt\).*--overwrite"):
        ht.train(cfg, tmp_path, progress=False)
    assert (tmp_path / ht.METRICS).read_text() == before and (tmp_path / ht.CHECKPOINT).exists()
    with pytest.raises(ValueError, match="exclusive"):
        ht.train(cfg, tmp_path, resume=True, overwrite=True, progress=False)
    ht.train(cfg, tmp_path, overwrite=True, progress=False)  # starts over
    assert _losses(tmp_path) == [{k: v for k, v in m.items() if k not in TIMING} for m in map(json.loads, before.splitlines())]
    # the command line says the same in one line, exit status 2
    assert cli_main(["train", "--steps", "2", "--batch-size", "2", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--resume" in err and "--overwrite" in err


def test_sigterm_checkpoints_frees_the_lock_and_resumes_bit_exact(tmp_path):
    """``fourbit train`` in a child process, its steps slowed down, gets SIGTERM after its first checkpoint
    (``--ckpt-every 2``): it saves at the step boundary, exits 143 and leaves no .lock; ``--resume`` then
    finishes with the losses and weights of an uninterrupted run."""
    argv = ["train", "--steps", "12", "--batch-size", "2", "--ckpt-every", "2", "--no-progress"]
    cut = tmp_path / "cut"
    script = textwrap.dedent(f"""
        import sys, time
        from fourbit.harness import train as ht
        step = ht.train_step
        ht.train_step = lambda *a: (time.sleep({SLOW_STEP_S}), step(*a))[1]
        from fourbit.cli import main
        sys.exit(main({argv + ["--out", str(cut)]!r}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (cut / ht.CHECKPOINT).exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=START_TIMEOUT_S)
    assert child.returncode == SIGTERM_STATUS, err
    assert "SIGTERM after step" in err and not (cut / ".lock").exists()
    stopped = ht.load_checkpoint(cut / ht.CHECKPOINT)["step"]
    assert 2 <= stopped < 12

    assert cli_main(argv + ["--out", str(tmp_path / "whole")]) == 0
    assert cli_main(argv + ["--out", str(cut), "--resume"]) == 0
    assert _losses(cut) == _losses(tmp_path / "whole")  # bit-exact: floats compared with ==
    a = ht.load_checkpoint(cut / ht.CHECKPOINT)["model"]
    b = ht.load_checkpoint(tmp_path / "whole" / ht.CHECKPOINT)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_resume_without_a_checkpoint_says_it_starts_over(tmp_path, capsys, whole):
    """A run killed (SIGKILL) before its first checkpoint left run.json and metrics.jsonl only."""
    ht.train(tiny_cfg(), tmp_path, progress=False)
    (tmp_path / ht.CHECKPOINT).unlink()
    capsys.readouterr()
    ht.train(tiny_cfg(), tmp_path, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "holds no checkpoint" in err and "starting from step 0" in err
    assert _losses(tmp_path) == _losses(whole)


def test_stale_temporaries_of_a_killed_process_are_removed(tmp_path, whole):
    _interrupted_at(tiny_cfg(), tmp_path)
    torn = tmp_path / f"{ht.CHECKPOINT}.tmp999999"
    torn.write_bytes(b"PK\x03\x04 half a checkpoint")
    probe = tmp_path / ".write-test-999999"
    probe.write_bytes(b"")
    ht.train(tiny_cfg(), tmp_path, resume=True, progress=False)
    assert not torn.exists() and not probe.exists()
    assert _losses(tmp_path) == _losses(whole)


# -- nothing damaged goes unseen ----------------------------------------------------------------------------


def _tensor_bytes_offset(path) -> int:
    """File offset of the middle of the largest tensor stored in a torch.save zip."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def test_a_flipped_byte_in_a_tensor_is_refused(tmp_path):
    _interrupted_at(tiny_cfg(), tmp_path)
    ckpt = tmp_path / ht.CHECKPOINT
    raw = bytearray(ckpt.read_bytes())
    raw[_tensor_bytes_offset(ckpt)] ^= 0x40
    ckpt.write_bytes(bytes(raw))
    torch.load(ckpt, weights_only=True)  # torch itself reads the damaged weights without complaint
    # the largest tensor is the embedding, tied to the LM head: both entries are its bytes
    with pytest.raises(ValueError, match=rf"{ckpt.name}.*damaged: 2 of \d+ entries do not match.*wte.weight.*--overwrite"):
        ht.train(tiny_cfg(), tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"PK\x03\x04truncated"], ids=["empty", "garbage", "torn-zip"])
def test_an_unreadable_checkpoint_names_the_file(tmp_path, content):
    _interrupted_at(tiny_cfg(), tmp_path)
    (tmp_path / ht.CHECKPOINT).write_bytes(content)
    with pytest.raises(ValueError, match=rf"checkpoint '.*{ht.CHECKPOINT}' cannot be read.*--resume"):
        ht.train(tiny_cfg(), tmp_path, resume=True, progress=False)


def test_a_bad_run_json_names_the_file(tmp_path):
    _interrupted_at(tiny_cfg(), tmp_path)
    (tmp_path / ht.RUN_META).write_text('{"config": {"steps": 4')
    with pytest.raises(ValueError, match=rf"{ht.RUN_META}' is not a run record.*restore it"):
        ht.train(tiny_cfg(), tmp_path, resume=True, progress=False)
    (tmp_path / ht.RUN_META).unlink()
    with pytest.raises(ValueError, match=rf"no {ht.RUN_META}"):
        ht.train(tiny_cfg(), tmp_path, resume=True, progress=False)


def test_a_torn_last_metrics_line_is_cut_on_resume(tmp_path, capsys, whole):
    """Killed while writing a metrics line: read_metrics names the torn line, resume cuts it and carries on
    (with another checkpoint interval: it does not change the math, so it is no config mismatch)."""
    _interrupted_at(tiny_cfg(), tmp_path, at=3)
    metrics = tmp_path / ht.METRICS
    with open(metrics, "a") as f:
        f.write('{"step": 4, "tokens": 10')
    with pytest.raises(ValueError, match=rf"{ht.METRICS}'.*line 3, the last, is torn"):
        ht.read_metrics(tmp_path)
    ht.train(tiny_cfg(ckpt_every=1), tmp_path, resume=True, progress=False)
    assert "cut to the records up to it" in capsys.readouterr().err
    assert _losses(tmp_path) == _losses(whole)


def test_a_bad_metrics_line_before_the_last_names_file_and_line(tmp_path):
    _interrupted_at(tiny_cfg(), tmp_path, at=3)
    metrics = tmp_path / ht.METRICS
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{ht.METRICS}' line 2 is not a metrics record"):
        ht.train(tiny_cfg(), tmp_path, resume=True, progress=False)
