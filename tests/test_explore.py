"""fourbit explore: block errors against a float64 definition, PNGs written, CLI on a tensor file."""

import pytest
import torch

from fourbit.cli import main
from fourbit.explore import block_errors, explore, load_tensors, summarize


def test_block_errors_match_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g)
    x_hat = x + 0.01 * torch.randn(4, 64, generator=g)
    x[1, :32] = 0  # an all-zero block is dropped, not divided by zero
    got = block_errors(x, x_hat)
    xb, hb = x.double().reshape(-1, 32), x_hat.double().reshape(-1, 32)
    expect = [float((xb[i] - hb[i]).norm() / xb[i].norm()) for i in range(8) if i != 2]
    assert got.shape == (7,)
    torch.testing.assert_close(got.double(), torch.tensor(expect, dtype=torch.float64), rtol=1e-6, atol=0)


def test_summary_orders_schemes_on_gaussian_weights():
    """On Gaussian data FP8 (3 mantissa bits) beats both 4-bit schemes, and NVFP4's finer E4M3 scales
    beat MXFP4's power-of-two ones (the formats table in the README shows the same ordering)."""
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    s = summarize({"w": x})["per_layer"]["w"]
    assert s["fp8"]["sqnr_db"] > s["nvfp4"]["sqnr_db"] > s["mxfp4"]["sqnr_db"]
    assert s["fp8"]["flushed"] <= s["nvfp4"]["flushed"]


def test_blocks_far_below_the_amax_flush_under_nvfp4_not_mxfp4():
    """Blocks 1e9 below the tensor amax: NVFP4's E4M3 block scales (range 2^-9..448 under one tensor
    scale) underflow to zero, MXFP4's E8M0 powers of two (2^-127..2^127) still reach them."""
    x = torch.full((16, 64), 1e-6)
    x[0, 0] = 1000.0
    s = summarize({"w": x})["per_layer"]["w"]
    assert s["nvfp4"]["flushed"] == 1023 / 1024  # every tiny value
    assert s["mxfp4"]["flushed"] == 31 / 1024  # only the 31 sharing a block (scale 2^7) with the 1000


def test_pngs_written(tmp_path):
    tensors = {"a": torch.randn(32, 64), "b": torch.randn(16, 32) * 1e-3}
    paths = explore(tensors, tmp_path)
    assert [p.name for p in paths] == ["ptq_block_error.png", "ptq_nvfp4_scales.png", "ptq_flush_to_zero.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_cli_on_tensor_file(tmp_path, capsys):
    f = tmp_path / "w.pt"
    torch.save({"w": torch.randn(32, 64), "skipped_1d": torch.randn(64)}, f)
    assert main(["explore", "--tensor", str(f), "--out", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    assert "nvfp4" in out and (tmp_path / "png" / "ptq_nvfp4_scales.png").exists()
    assert list(load_tensors(tensor=str(f))) == ["w"]


def test_nothing_to_explore(tmp_path):
    f = tmp_path / "v.pt"
    torch.save(torch.randn(30), f)
    with pytest.raises(ValueError, match="nothing to explore"):
        load_tensors(tensor=str(f))
