"""Caller mistakes raise clear errors; nothing is silent."""

import math
import os
import subprocess
import sys

import pytest
import torch

import fourbit


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.complex64, torch.bool], ids=str)
def test_non_float_dtypes_raise_type_error(dtype):
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        fourbit.quantize(torch.zeros(4, 16, dtype=dtype), "nvfp4")


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        fourbit.quantize([1.0] * 16, "nvfp4")


@pytest.mark.parametrize(
    "scheme,shape,kw",
    [("nvfp4", (4, 20), {}), ("nvfp4", (20, 32), {"block": (16, 16)}), ("mxfp4", (2, 48), {}), ("fp8", (3, 100), {"block": (1, 128)})],
    ids=["nvfp4-cols", "nvfp4-2d-rows", "mxfp4", "fp8-tiles"],
)
def test_indivisible_shapes_name_shape_and_block_and_pad_fixes_them(scheme, shape, kw):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=r"shape \(.*\) is not divisible by block .*pad=True"):
        fourbit.quantize(x, scheme, **kw)
    q = fourbit.quantize(x, scheme, pad=True, **kw)
    assert q.dequantize().shape == x.shape


def test_padding_is_zero_and_exact():
    x = torch.randn(3, 20)
    q = fourbit.quantize(x, "nvfp4", pad=True)
    # the padded tail of the last block holds zeros, and the real part equals a padded quantization
    xp = torch.nn.functional.pad(x, (0, 12))
    assert torch.equal(q.dequantize(), fourbit.quantize(xp, "nvfp4").dequantize()[:, :20])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_inputs_raise_with_count(bad):
    x = torch.randn(4, 32)
    x[0, :3] = bad
    with pytest.raises(ValueError, match="3 non-finite"):
        fourbit.quantize(x, "nvfp4")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: nvfp4, nvfp4-2d, mxfp4"):
        fourbit.quantize(torch.randn(16), "int4")
    with pytest.raises(ValueError, match="known: nearest, stochastic"):
        fourbit.quantize(torch.randn(16), "nvfp4", rounding="up")
    with pytest.raises(ValueError, match="no option 'four_over_six'"):
        fourbit.quantize(torch.randn(32), "mxfp4", four_over_six=True)
    with pytest.raises(ValueError, match="block must be"):
        fourbit.quantize(torch.randn(32), "nvfp4", block=(1, 32))
    with pytest.raises(ValueError, match="unknown backend"):
        fourbit.quantize(torch.randn(16), "nvfp4", backend="cuda")


def test_scalars_and_cuda_only_options_on_cpu():
    with pytest.raises(ValueError, match="at least one dim"):
        fourbit.quantize(torch.tensor(1.0), "nvfp4")
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        fourbit.quantize(torch.randn(16), "nvfp4", backend="triton")


def test_device_seed_keys_need_a_cuda_counter():
    """``kernels.seed_keys`` runs on the GPU (or under Triton's interpreter): a CPU step counter is a clear
    error, not Triton's driver message. In a fresh process, as the interpreter tests set TRITON_INTERPRET."""
    pytest.importorskip("triton")
    code = "import torch; from fourbit.kernels import seed_keys; seed_keys(torch.zeros(1, dtype=torch.int64), 5, True)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "the step counter must be a CUDA tensor" in proc.stderr, proc.stderr[-2000:]


def test_dequantized_mm_takes_dequantized_operands():
    from fourbit.kernels import dequantized_mm

    with pytest.raises(TypeError, match="two Dequantized operands"):
        dequantized_mm(torch.randn(16, 64), torch.randn(16, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs_quantize_their_exact_values(dtype):
    x = torch.randn(4, 32).to(dtype)
    assert torch.equal(fourbit.quantize(x, "nvfp4").data, fourbit.quantize(x.float(), "nvfp4").data)


def test_options_a_scheme_would_ignore_are_refused():
    """nvfp4 always encodes E2M1 with E4M3 scales and MX blocks hold 32 elements: options saying otherwise
    used to be accepted and ignored (or to change the scheme silently)."""
    with pytest.raises(ValueError, match="nvfp4: elements are always E2M1, got fmt 'E4M3'"):
        fourbit.quantize(torch.randn(32), "nvfp4", fmt="e4m3")
    with pytest.raises(ValueError, match="block scales are always E4M3"):
        fourbit.NVFP4Config(scale_format=fourbit.E8M0)
    with pytest.raises(ValueError, match=r"mxfp4: OCP MX blocks hold 32.*got \(16, 16\)"):
        fourbit.quantize(torch.randn(32, 32), "mxfp4", block=(16, 16))
    with pytest.raises(ValueError, match="use 'mxfp8'"):
        fourbit.resolve_scheme("mxfp4", fmt="e4m3")
    assert fourbit.resolve_scheme("mxfp6", fmt="e3m2").elem == fourbit.E3M2  # documented variants still work
    assert fourbit.resolve_scheme("mxfp4", block=(32, 32)).block == (32, 32)


@pytest.mark.parametrize("amax", [-1.0, float("nan"), float("inf"), torch.tensor(float("nan")), torch.tensor(-2.0)],
                         ids=["negative", "nan", "inf", "nan-tensor", "negative-tensor"])
def test_quantize_rejects_a_bad_amax(amax):
    with pytest.raises(ValueError, match="amax must be"):
        fourbit.quantize(torch.randn(4, 32), "nvfp4", amax=amax)


def test_quantize_rejects_float64_beyond_float32_range():
    x = torch.randn(4, 32, dtype=torch.float64)
    x[1, 3] = 1e300  # finite in float64, inf in float32: every scale would be NaN or 0
    with pytest.raises(ValueError, match="exceeds float32's range"):
        fourbit.quantize(x, "nvfp4")


@pytest.mark.parametrize("seed", [2**64, -1, 1.5], ids=["2**64", "negative", "float"])
def test_quantize_rejects_seeds_outside_64_bits(seed):
    with pytest.raises(ValueError, match="seed must be an int"):
        fourbit.quantize(torch.randn(4, 32), "nvfp4", rounding="stochastic", seed=seed)


def test_quantize_seeds_use_all_64_bits():
    """2**63 + 5 and 5 are different seeds (an op's int64 argument carries the top bit, not a wrap to 5)."""
    x = torch.randn(64, 64)
    a = fourbit.quantize(x, "nvfp4", rounding="stochastic", seed=5)
    b = fourbit.quantize(x, "nvfp4", rounding="stochastic", seed=2**63 + 5)
    assert not torch.equal(a.data, b.data)


def test_quantize_rejects_an_empty_tensor():
    with pytest.raises(ValueError, match="non-empty"):
        fourbit.quantize(torch.empty(0, 32), "nvfp4")
