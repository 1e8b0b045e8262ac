"""FP8 per tensor and DeepSeek-V3 blockwise against a float64 re-derivation with ml_dtypes casts."""

import math

import numpy as np
import pytest
import torch

import fourbit

from oracles import cast_codes, decode, f32


def fp8_reference(x: np.ndarray, name: str, block, pow2: bool):
    """s_enc = max / amax per block (float32), codes = cast(x * s_enc), decode scale = 1 / s_enc."""
    fmax = {"E4M3": 448.0, "E5M2": 57344.0}[name]
    R, C = x.shape
    br, bc = block or (R, C)
    xb = x.astype(np.float64).reshape(R // br, br, C // bc, bc)
    amax = np.abs(xb).max(axis=(1, 3), keepdims=True)
    with np.errstate(divide="ignore"):
        s_enc = f32(fmax / amax).astype(np.float64)
    if pow2:
        s_enc = np.exp2(np.floor(np.log2(s_enc)))
    s_enc = np.where(amax == 0, 1.0, s_enc)
    codes = cast_codes(f32(xb * s_enc), name)
    scale = f32(1.0 / s_enc)
    return codes.reshape(R, C), scale.reshape(R // br, C // bc)


CASES = [
    ("E4M3", None, False),
    ("E5M2", None, False),
    ("E4M3", (1, 128), False),
    ("E4M3", (128, 128), False),
    ("E4M3", (1, 128), True),
]


@pytest.mark.parametrize("name,block,pow2", CASES, ids=["e4m3-tensor", "e5m2-tensor", "1x128", "128x128", "1x128-pow2"])
def test_matches_float64_rederivation(name, block, pow2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 384, generator=g) * torch.exp2(torch.randint(-8, 8, (256, 1), generator=g).float())
    x[:, :128] *= 10
    x[0] = 0.0
    q = fourbit.quantize(x, "fp8", fmt=name.lower(), block=block, pow2_scale=pow2)
    codes, scale = fp8_reference(x.numpy(), name, block, pow2)
    np.testing.assert_array_equal(q.data.numpy(), codes)
    assert q.scales.dtype == torch.float32
    np.testing.assert_array_equal(q.scales.numpy().reshape(scale.shape), scale)
    expected = decode(codes, name).reshape(x.shape) * np.repeat(
        np.repeat(scale.astype(np.float64), (block or x.shape)[0], 0), (block or x.shape)[1], 1
    )
    np.testing.assert_array_equal(q.dequantize().numpy(), f32(expected))


def test_per_tensor_scale_is_amax_over_448():
    x = torch.randn(16, 16)
    q = fourbit.quantize(x, "fp8")
    assert q.scales.shape == () and q.scales.item() == pytest.approx(float(x.abs().max()) / 448, rel=1e-6)
    assert fourbit.quantize(x, "fp8", fmt="e5m2").scales.item() == pytest.approx(float(x.abs().max()) / 57344, rel=1e-6)


def test_blockwise_shapes_and_padding():
    q = fourbit.quantize(torch.randn(4, 256), "fp8", block=(1, 128))
    assert q.scales.shape == (4, 2)
    with pytest.raises(ValueError, match=r"block \(128, 128\)"):
        fourbit.quantize(torch.randn(100, 256), "fp8", block=(128, 128))
    x = torch.randn(100, 200)
    q = fourbit.quantize(x, "fp8", block=(128, 128), pad=True)
    assert q.scales.shape == (1, 2) and q.dequantize().shape == x.shape
    assert torch.allclose(q.dequantize(), x, rtol=0.07, atol=float(x.abs().max()) / 448)


def test_non_finite_tensor_dequantizes_to_nan():
    x = torch.randn(4, 8)
    x[0, 0] = math.inf
    assert torch.isnan(fourbit.quantize(x, "fp8", check_finite=False).dequantize()).all()


@pytest.mark.parametrize("amax", [1e-37, 1e-38], ids=["1e-37", "subnormal-range"])
def test_per_tensor_tiny_amax_does_not_flush_to_zero(amax):
    """s_enc = min(448 / amax, FLT_MAX): a tensor whose amax is below 448 / FLT_MAX keeps its values (the
    decode scale 1 / FLT_MAX is a float32 subnormal) instead of overflowing s_enc and decoding to zeros."""
    x = torch.tensor([[amax, -amax / 2, amax / 4, 0.0]], dtype=torch.float32)
    q = fourbit.quantize(x, "fp8")
    x_hat = q.dequantize()
    assert (x_hat[0, :3] != 0).all()
    assert torch.allclose(x_hat, x, rtol=0.07, atol=0)  # E4M3: 3 mantissa bits, relative error <= 2^-4
