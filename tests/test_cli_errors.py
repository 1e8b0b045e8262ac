"""User mistakes on the command line end in one ``fourbit <command>: error:`` line and exit status 2 (no
traceback), naming the bad file or value; ``python -m fourbit`` is the console script."""

import os
import subprocess
import sys

import pytest

from fourbit.cli import main


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"fourbit {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder, not a model")
    return path


def test_data_dir_that_is_a_file(capsys, a_file, tmp_path):
    _one_line_error(capsys, ["train", "--steps", "1", "--data-dir", str(a_file), "--out", str(tmp_path / "r"),
                             "--no-progress"], str(a_file), "not a folder")  # fmt: skip


def test_accumulate_out_that_is_a_file_fails_before_measuring(capsys, a_file, monkeypatch):
    from fourbit.commands import accumulate

    monkeypatch.setattr(accumulate, "measure", lambda *a, **k: pytest.fail("measured before checking --out"))
    _one_line_error(capsys, ["accumulate", "--out", str(a_file)], str(a_file), "not a folder")


@pytest.mark.parametrize("content", [b"", b"garbage"], ids=["empty", "garbage"])
def test_explore_tensor_file_that_is_not_a_tensor(capsys, tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    _one_line_error(capsys, ["explore", "--tensor", str(bad), "--out", str(tmp_path / "o")], str(bad), "readable")


def test_ptq_model_that_is_not_a_model(capsys, a_file):
    pytest.importorskip("transformers")
    _one_line_error(capsys, ["ptq", "--model", str(a_file), "--eval", str(a_file)], str(a_file))


def test_formats_numel_zero(capsys):
    _one_line_error(capsys, ["formats", "--numel", "0"], "--numel", "got 0")


def test_python_dash_m_fourbit():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "fourbit", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fourbit") and "train" in done.stdout
