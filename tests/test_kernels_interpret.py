"""The Triton kernels under Triton's CPU interpreter (``TRITON_INTERPRET=1``): bit-exactness without a GPU.

Runs only where triton is installed and CUDA is not (on a GPU machine ``test_kernels.py`` covers the same
ground on the real compiler). The interpreter executes the kernels with numpy float32 arithmetic, so this
checks the algorithm (operation order, integer hash, encoders, packing, masks), not PTX code generation.
Small shapes: the interpreter is slow.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import fourbit
from fourbit.rounding import Rounding
from fourbit.schemes import NVFP4Config
from kernel_cases import BF16_TRUNC_RTOL, assert_same_bytes, edge_input, gemm_check, grid_operand

INTERPRET = importlib.util.find_spec("triton") is not None and not torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not INTERPRET, reason="needs triton without CUDA (the GPU tests cover it there)")

if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are first imported (below, lazily)
    import triton.runtime.interpreter as _interp

    # triton 3.6's interpreter turns a runtime loop bound into an int through int(ndarray of shape (1,)),
    # which numpy >= 2.4 refuses; take the one element instead
    _patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor


def _kernel_quantize(x, block=(1, 16), rounding="nearest", seed=None, amax=None, pad=False):
    from fourbit.kernels.nvfp4_quantize import quantize_nvfp4
    from fourbit.quantize import QuantizedTensor

    config = NVFP4Config(block=block)
    data, scales, ts = quantize_nvfp4(x, config, Rounding.parse(rounding), seed, amax, pad, tile=256, max_blocks=4)
    return QuantizedTensor(data, scales, ts, config, x.shape, x.dtype)


CASES = [
    ("random", (32, 128), torch.float32, (1, 16), "nearest"),
    ("random", (48, 96), torch.bfloat16, (16, 16), "stochastic"),
    ("ties", (16, 64), torch.float32, (1, 16), "nearest"),
    ("denormals", (16, 64), torch.float32, (16, 16), "stochastic"),
    ("denormals", (16, 64), torch.float16, (1, 16), "nearest"),  # (the interpreter flushes bf16 subnormals)
    ("huge", (16, 64), torch.float16, (1, 16), "stochastic"),
    ("zeros", (16, 64), torch.float32, (1, 16), "nearest"),
    ("mixed_scale", (32, 64), torch.float32, (1, 16), "stochastic"),
]


@pytest.mark.parametrize("kind,shape,dtype,block,rounding", CASES, ids=[f"{c[0]}-{c[3][0]}x16-{c[4]}" for c in CASES])
def test_quantize_bit_exact(kind, shape, dtype, block, rounding):
    x = edge_input(kind, shape, dtype, torch.Generator().manual_seed(len(kind)))
    seed = 77 if rounding == "stochastic" else None
    want = fourbit.quantize(x, "nvfp4", block=block, rounding=rounding, seed=seed, backend="reference")
    assert_same_bytes(_kernel_quantize(x, block, rounding, seed), want)


@pytest.mark.parametrize("block", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
def test_quantize_pad_nonfinite_amax(block):
    x = torch.randn(20, 40)
    x[1, 3], x[5, 30] = float("nan"), float("-inf")
    kw = dict(block=block, pad=True, check_finite=False)
    assert_same_bytes(_kernel_quantize(x, block, pad=True), fourbit.quantize(x, "nvfp4", backend="reference", **kw))
    y = torch.randn(16, 64)
    want = fourbit.quantize(y, "nvfp4", block=block, amax=0.25, backend="reference")
    assert_same_bytes(_kernel_quantize(y, block, amax=0.25), want)


def test_qmm_and_w4a16():
    from fourbit.kernels import nvfp4_gemm as g

    gen = torch.Generator().manual_seed(0)
    a, b = grid_operand(20, 80, gen), grid_operand(40, 80, gen, (16, 16))
    out = g._qmm(a, b, g._nvfp4_matrix(a, "a"), g._nvfp4_matrix(b, "b"), torch.float32, (16, 16, 32, 4, 1))
    gemm_check(out, a.dequantize(), b.dequantize())
    x = torch.randn(5, 80, generator=gen).bfloat16()
    for split in (1, 2):
        y = g._linear_w4a16(x, b, g._nvfp4_matrix(b, "w"), None, (16, 32, split, 4, 1))
        gemm_check(y, x.float(), b.dequantize(), rtol_out=BF16_TRUNC_RTOL)
