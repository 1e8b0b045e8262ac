"""MX (OCP v1.0) against torchao's to_mx (FLOOR and RCEIL) and a float64 re-derivation of the scale."""

import math

import numpy as np
import pytest
import torch

import fourbit
from fourbit.formats import E2M1, E2M3, E3M2, E4M3, E5M2
from fourbit.packing import unpack_fp4

from oracles import cast_codes

ELEMS = [E2M1, E2M3, E3M2, E4M3, E5M2]
EMAX = {"E2M1": 2, "E2M3": 2, "E3M2": 4, "E4M3": 8, "E5M2": 15}  # floor(log2(elem max)), OCP MX table


def mx_inputs(seed=0, shape=(16, 128)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 20, (shape[0], 1), generator=g).float())
    x[0, :32] = 0.0  # an all-zero block
    x[1, :32] = 1e-41  # float32 subnormals
    x[2, :32] *= 1e30
    return x


@pytest.mark.parametrize("elem", ELEMS, ids=lambda f: f.name)
def test_floor_scale_matches_float64_rederivation(elem):
    x = mx_inputs()
    q = fourbit.quantize(x, fourbit.MXConfig(elem))
    xb = x.double().reshape(16, 4, 32)
    amax = xb.abs().amax(-1).numpy()
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(amax > 0, amax, 2.0**-200))).astype(np.int64)
    e = np.maximum(e, -127)  # float32 subnormals and zero read as exponent -127 from the bits
    expected_scale = np.clip(e - EMAX[elem.name], -127, 127) + 127
    np.testing.assert_array_equal(q.scales.view(torch.uint8).numpy(), expected_scale)
    # elements: x / 2^e through ml_dtypes, saturating
    scaled = (xb.numpy() / np.exp2((expected_scale - 127).astype(np.float64))[..., None]).reshape(16, 128)
    expected = cast_codes(scaled.astype(np.float32), elem.name)
    codes = unpack_fp4(q.data) if elem.bits == 4 else q.data
    np.testing.assert_array_equal(codes.numpy(), expected)


def _torchao_dtype(elem):
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2

    return {
        "E2M1": torch.float4_e2m1fn_x2,
        "E2M3": DTYPE_FP6_E2M3,
        "E3M2": DTYPE_FP6_E3M2,
        "E4M3": torch.float8_e4m3fn,
        "E5M2": torch.float8_e5m2,
    }[elem.name]


@pytest.mark.parametrize("mode", ["floor", "rceil"])
@pytest.mark.parametrize("elem", ELEMS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_torchao_to_mx(elem, mode, dtype):
    """Scales everywhere; data in every block whose scale is not the smallest, 2^-127 (code 0): there
    torchao 0.18 scales the data by 2^126 (FLOOR clamps the scale to the smallest normal float) or by 1
    (RCEIL), not by the exact reciprocal 2^127 that its own later versions and fourbit use."""
    torchao_mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor", reason="torchao not installed")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    x = mx_inputs(seed=1).to(dtype)
    scale_ref, data_ref = torchao_mx.to_mx(x, _torchao_dtype(elem), 32, ScaleCalculationMode[mode.upper()])
    q = fourbit.quantize(x, fourbit.MXConfig(elem, scale_mode=fourbit.ScaleMode(mode)))
    assert torch.equal(q.scales.view(torch.uint8), scale_ref.view(torch.uint8))
    ours, theirs = q.data, data_ref.view(torch.uint8)
    if elem.bits == 4:
        ours, theirs = unpack_fp4(ours), unpack_fp4(theirs)
    regular = (scale_ref.view(torch.uint8) != 0).repeat_interleave(32, dim=-1)
    assert regular.float().mean() > 0.8
    assert torch.equal(ours[regular], theirs[regular])


def test_non_finite_block_gets_nan_scale():
    x = torch.randn(2, 64)
    x[0, 5] = math.nan
    q = fourbit.quantize(x, "mxfp4", check_finite=False)
    assert q.scales.view(torch.uint8)[0, 0] == 0xFF
    xh = q.dequantize()
    assert torch.isnan(xh[0, :32]).all() and torch.isfinite(xh[0, 32:]).all() and torch.isfinite(xh[1]).all()


def test_mx_layouts():
    q = fourbit.quantize(torch.randn(3, 5, 64), "mxfp4")
    assert q.data.shape == (3, 5, 32) and q.scales.shape == (3, 5, 2) and q.scales.dtype == torch.float8_e8m0fnu
    assert q.tensor_scale is None
    q8 = fourbit.quantize(torch.randn(4, 64), "mxfp8", fmt="e5m2")
    assert q8.data.shape == (4, 64) and q8.config.elem is E5M2
