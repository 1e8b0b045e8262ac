"""``fourbit formats``."""

import re

from fourbit.cli import main


def test_formats_prints_value_tables_and_error_table(capsys):
    assert main(["formats", "--format", "e2m1", "--numel", "16384"]) == 0
    out = capsys.readouterr().out
    assert "non-negative values: 0 0.5 1 1.5 2 3 4 6" in out
    rows = {line.split()[0] + (" 4/6" if "4/6" in line else ""): line for line in out.splitlines() if re.match(r"^(nvfp4|mxfp|fp8)", line)}
    sqnr = {k: float(v.split()[2 if "4/6" in k else 1]) for k, v in rows.items()}
    # 16-element E4M3-scaled blocks beat 32-element power-of-two blocks on Gaussian data; FP8 beats both
    assert sqnr["nvfp4"] > sqnr["mxfp4"] + 1.0
    assert sqnr["fp8"] > sqnr["nvfp4"] + 5.0


def test_unknown_format_is_a_one_line_error(capsys):
    assert main(["formats", "--format", "int4"]) == 2
    assert "unknown format" in capsys.readouterr().err
