"""Fast kernels behind one dispatch point, bit-exact with the PyTorch reference.

``quantize(x, config, ...)`` returns a ``QuantizedTensor`` from a fused Triton kernel, or ``None`` when no
kernel covers the case (then ``fourbit.quantize`` runs the reference). ``backend="triton"`` insists on a
kernel and raises where none can run (a CPU tensor, no triton, an uncovered option).

Covered today (float32/bfloat16/float16 input; RNE and stochastic rounding, also with an ``ElementIndex``;
``pad``): NVFP4 (1x16 and 16x16 blocks; a given ``amax``), MX (``mx_quantize``: 1x32 blocks, every element
format, FLOOR/RCEIL scales) and FP8 (``fp8_quantize``: per tensor, 1x128, 128x128, pow2 scales). Not
covered, so they fall back to the reference: four-over-six, float64 input, empty tensors, and the MX/FP8
options ``covers`` rejects.

``quantize_swizzled(x, ...)`` is NVFP4 1x16 with the block scales written in Blackwell's SWIZZLE_32_4_4 order
(for native block-scaled GEMMs), by the same kernel.

``quantize_dequantized(x, config, ...)`` is NVFP4 straight to the operand the emulated GEMM multiplies
(``Dequantized``: e2m1 * block scale in BF16, exact, and the tensor scale apart), in one kernel that writes
no packed codes; ``dequantized_mm(a, b)`` multiplies two such operands. ``QuantLinear`` runs its three
GEMMs this way on Hopper (``quantize_wgrad(..., dequantized=True)`` for wgrad's operands): the same
numbers as quantize, dequantize, GEMM, with two fewer passes per operand.

``quantize_wgrad(t, config, ...)`` builds a wgrad operand, ``quantize(rht(pad(t^T)))``, from the
untransposed (tokens, features) tensor in one kernel (``wgrad_amax`` is its amax pass alone, for an
all-reduce between data-parallel ranks); ``QuantLinear`` uses it for NVFP4 wgrad operands on CUDA.

``quantize_dual(t, ...)`` gives both operands a linear layer takes from one activation or gradient: the
rowwise ``quantize(t)`` and the columnwise ``quantize_wgrad(t)``, from one amax pass and one quantize pass
(``nvfp4_dual``), bit-exact with the two separate kernels (on an H200 and under the interpreter).
No layer uses it: it did not shorten the measured training step (75.1 against 74.9 ms graphed, H200,
2026-12-02); it stays as a tested kernel for a producer-fused quantization to build on.

``seed_keys(counter, base, advance)`` computes a layer's six stochastic-rounding keys from a step counter in
device memory (``seeds``); every quantize kernel takes a key as an int or as such a one-element device
tensor. ``fourbit.nn.use_device_seeds`` switches ``QuantLinear`` to it, so a training step can be captured
in a CUDA graph and replayed with fresh random bits (``fourbit.harness.graphs``).

Non-contiguous inputs are copied to contiguous memory first (one extra read and write), except that the MX
and FP8 kernels read a transposed view of a contiguous matrix (wgrad's ``dy.T``, ``x.T``) in place, through
its strides (``tiling.row_reader``). Each entry point launches on its operands' CUDA device, whatever device
is current (``device.on_operand_device``).

GEMMs (CUDA only; each returns ``None`` where it does not apply, so callers fall back):

* ``qmm(a, b)``          NVFP4 x NVFP4, ``A @ B^T`` with both quantized along K (emulated on Hopper: each
                          FP4 operand dequantized once to BF16, exactly, then a BF16 tensor-core GEMM with
                          FP32 accumulation and the tensor scales in its epilogue; native ``scaled_mm`` on
                          compute capability >= 10, untested for want of such a GPU).
                          MXFP4 (1x32) x MXFP4 takes the same dequantize-then-GEMM path.
* ``linear_w4a16(x, w)`` BF16 activations times NVFP4 weights, for decode (batch 1-16).
* ``fp8_mm(a, b)``       FP8 x FP8 through ``torch.nn.functional.scaled_mm`` (per tensor, DeepSeek blockwise).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..rounding import Rounding
from .device import on_operand_device

__all__ = ["triton_available", "quantize", "quantize_swizzled", "quantize_dequantized", "Dequantized", "dequantized_mm",
           "quantize_wgrad", "wgrad_amax", "quantize_dual", "dual_amax", "seed_keys", "qmm", "linear_w4a16", "fp8_mm"]


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _unsupported(config, x, rounding) -> str | None:
    """Why no kernel covers this call, or None."""
    from ..schemes import NVFP4Config

    if not isinstance(config, NVFP4Config):
        return f"no triton kernel for {config.name} yet"
    if config.four_over_six:
        return "four_over_six has no triton kernel (its per-block error sums depend on reduction order)"
    if x.dtype not in _KERNEL_DTYPES:
        return f"the nvfp4 kernel takes float32/bfloat16/float16, got {x.dtype}"
    if x.numel() == 0:
        return "empty tensor"
    return None


@on_operand_device
def seed_keys(counter: torch.Tensor, base: int, advance: bool) -> torch.Tensor:
    """int32 (6,): ``seed_key(derive_seed(seed, layer, step, role))`` for each ``Role``, with ``step`` read from
    ``counter`` (int64, one element, CUDA or the interpreter) and ``base = seed_base(seed, layer)``; then
    ``counter += 1`` if ``advance``. One launch; no host sync."""
    from .seeds import seed_keys as _seed_keys

    return _seed_keys(counter, base, advance)


@on_operand_device
def quantize(x, config, *, rounding, seed, amax, pad, backend, sr_index=None):
    """The kernel for ``fourbit.quantize`` (inputs already validated there), or None to use the reference."""
    if backend == "triton" and not x.is_cuda:
        raise ValueError(f"backend='triton' needs a CUDA tensor, got one on {x.device}; use backend='reference'")
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs CUDA and the triton package")
    if not x.is_cuda or not triton_available():
        return None
    rounding = Rounding.parse(rounding)
    if x.dtype in _KERNEL_DTYPES and x.numel():
        from . import fp8_quantize, mx_quantize

        out = None
        if mx_quantize.covers(config):
            out = mx_quantize.quantize_mx(x, config, rounding, seed, pad, sr_index, strided=True)
        elif fp8_quantize.covers(config):
            out = fp8_quantize.quantize_fp8(x, config, rounding, seed, amax, pad, sr_index, strided=True)
        if out is not None:
            from ..qtensor import QuantizedTensor

            return QuantizedTensor(*out, None, config, x.shape, x.dtype)
    why = _unsupported(config, x, rounding)
    if why is not None:
        if backend == "triton":
            raise NotImplementedError(why)
        return None
    if amax is not None and isinstance(amax, torch.Tensor) and amax.device != x.device:
        amax = amax.to(x.device)

    from ..qtensor import QuantizedTensor
    from .nvfp4_quantize import quantize_nvfp4

    data, scales, tensor_scale = quantize_nvfp4(x, config, rounding, seed, amax, pad, sr_index)
    return QuantizedTensor(data, scales, tensor_scale, config, x.shape, x.dtype)


@on_operand_device
def quantize_swizzled(x, *, rounding="nearest", seed=None, amax=None, sr_index=None, pad=False):
    """NVFP4 (1x16) of a CUDA tensor with the block scales written straight into the SWIZZLE_32_4_4 layout
    that Blackwell's block-scaled GEMMs read: (packed codes (..., C/2) uint8, flat swizzled scales
    float8_e4m3fn, tensor scale float32 ()). The codes and the tensor scale are ``fourbit.quantize``'s;
    the scales are ``swizzle.to_blocked`` of its (rows, C/16) scales, zero-padded to 128 x 4 tiles."""
    from ..schemes import NVFP4Config

    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        raise ValueError("quantize_swizzled runs the CUDA kernel only: pass a CUDA tensor")
    if not triton_available():
        raise RuntimeError("quantize_swizzled needs the triton package")
    if x.dtype not in _KERNEL_DTYPES or x.numel() == 0:
        raise ValueError(f"quantize_swizzled takes a non-empty float32/bfloat16/float16 tensor, got {x.dtype} {tuple(x.shape)}")
    config = NVFP4Config()
    if x.dim() == 0:
        raise ValueError("quantize_swizzled expects at least one dim, got a scalar")
    if x.shape[-1] % 16 and not pad:  # the same error as fourbit.quantize for a ragged last dim
        raise ValueError(f"{config.name}: shape {tuple(x.shape)} is not divisible by block {config.block} "
                         f"(last dim {x.shape[-1]} by 16); pass pad=True to zero-pad")  # fmt: skip
    from .nvfp4_quantize import quantize_nvfp4

    rounding = Rounding.parse(rounding)
    if rounding is Rounding.STOCHASTIC and seed is None:
        raise ValueError("quantize_swizzled: stochastic rounding needs a seed")
    return quantize_nvfp4(x, config, rounding, seed, amax, pad, sr_index, swizzle=True)


class Dequantized(NamedTuple):
    """An NVFP4 operand as the emulated GEMM multiplies it: ``values[:rows] * tensor_scale`` is the dequantized
    (rows, K) matrix. ``values`` (bf16, rows and K zero-padded to whole blocks) holds each element's
    e2m1(code) * e4m3(block scale), exactly; ``tensor_scale`` (float32, 0-dim) is the decode scale."""

    values: torch.Tensor
    tensor_scale: torch.Tensor
    rows: int

    def t(self) -> "Dequantized":
        """The transposed operand, a view (exact for square 2D blocks, whose transpose is their quantization
        of the transposed matrix, as ``fourbit.gemm.transpose`` says)."""
        return Dequantized(self.values.T, self.tensor_scale, self.values.shape[1])


def dequantized_applies(x: torch.Tensor, config) -> bool:
    """Whether ``quantize_dequantized`` covers ``x`` and ``config`` (CUDA, triton, NVFP4 without four-over-six)."""
    from ..schemes import NVFP4Config

    return (
        isinstance(x, torch.Tensor) and x.is_cuda and triton_available() and x.dtype in _KERNEL_DTYPES and x.numel() > 0
        and isinstance(config, NVFP4Config) and not config.four_over_six
    )  # fmt: skip


@on_operand_device
def quantize_dequantized(x, config, *, rounding, seed=None, amax=None, sr_index=None) -> Dequantized | None:
    """NVFP4 of ``x`` (..., C) as a ``Dequantized`` (rows = x's rows), or None where no kernel covers it.

    The values are those of ``fourbit.quantize(x, config, pad=True, ...)``'s codes times its block scales,
    and the tensor scale is its tensor scale: ``values[:rows, :C] * tensor_scale == q.dequantize()``."""
    if not dequantized_applies(x, config):
        return None
    from .nvfp4_quantize import quantize_nvfp4_dequantized

    rounding = Rounding.parse(rounding)
    values, tscale = quantize_nvfp4_dequantized(x, config, rounding, seed, amax, sr_index)
    return Dequantized(values, tscale, x.numel() // x.shape[-1])


@on_operand_device
def dequantized_mm(a: Dequantized, b: Dequantized, *, out_dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """``A @ B^T`` (a.rows, b.rows) of two ``Dequantized`` operands padded to the same K: one BF16
    tensor-core GEMM, FP32 accumulation, both tensor scales in its epilogue; None where K (padded) is not
    a multiple of the GEMM's K step (``dequant_gemm.K_ALIGN``)."""
    from .dequant_gemm import K_ALIGN, scaled_gemm

    if not isinstance(a, Dequantized) or not isinstance(b, Dequantized):
        raise TypeError(f"dequantized_mm takes two Dequantized operands (quantize_dequantized), got "
                        f"{type(a).__name__} and {type(b).__name__}")  # fmt: skip
    K = a.values.shape[1]
    if b.values.shape[1] != K:
        raise ValueError(f"dequantized_mm: K differs, {tuple(a.values.shape)} vs {tuple(b.values.shape)}")
    if K % K_ALIGN:
        return None
    return scaled_gemm(a.values[: a.rows], b.values[: b.rows], a.tensor_scale, b.tensor_scale, out_dtype)


def _wgrad_kernel_applies(t, config, transform) -> bool:
    from ..schemes import NVFP4Config

    return (
        isinstance(t, torch.Tensor) and t.is_cuda and triton_available() and t.dim() == 2 and t.numel() > 0
        and t.dtype in _KERNEL_DTYPES and isinstance(config, NVFP4Config) and config.block == (1, 16)
        and not config.four_over_six and (transform is None or transform.size == 16)
    )  # fmt: skip


def _signs(transform, device):
    from ..hadamard import _signs_on

    return None if transform is None else _signs_on(transform, torch.float32, device)


@on_operand_device
def quantize_wgrad(t, config, *, rounding, seed, transform=None, amax=None, sr_index=None, dequantized=False):
    """A wgrad operand straight from ``t`` (tokens, features): ``quantize(rht(pad(t^T)))`` with tokens zero-padded
    to a multiple of 16, in one fused kernel (no transposed, padded or transformed copy), bit-exact with
    that reference chain; or None where the kernel does not apply (not NVFP4 1x16, not CUDA, ...).

    ``transform`` is a ``fourbit.hadamard.RHT`` of size 16 or None; ``amax`` (of the transformed tensor,
    e.g. all-reduced from ``wgrad_amax``) skips the amax pass. ``dequantized``: a ``Dequantized`` operand
    (features, tokens') instead of a ``QuantizedTensor``."""
    if not _wgrad_kernel_applies(t, config, transform):
        return None
    from ..qtensor import QuantizedTensor
    from .nvfp4_quantize import quantize_nvfp4_wgrad

    rounding = Rounding.parse(rounding)
    signs = _signs(transform, t.device)
    if dequantized:
        values, tscale = quantize_nvfp4_wgrad(t, config, rounding, seed, signs, amax, sr_index, dequantized=True)
        return Dequantized(values, tscale, t.shape[1])
    data, scales, tscale = quantize_nvfp4_wgrad(t, config, rounding, seed, signs, amax, sr_index)
    M, F = t.shape
    shape = torch.Size((F, M + (-M) % 16))
    return QuantizedTensor(data, scales, tscale, config, shape, torch.float32 if transform is not None else t.dtype)


@on_operand_device
def wgrad_amax(t, config, transform=None):
    """max |rht(pad(t^T))| as a float32 one-element tensor, or None where ``quantize_wgrad`` does not apply."""
    if not _wgrad_kernel_applies(t, config, transform):
        return None
    from .nvfp4_quantize import wgrad_amax as _amax

    return _amax(t, _signs(transform, t.device))


class DualOperand(NamedTuple):
    """How one output of ``quantize_dual`` is rounded: ``rounding``, its ``seed`` (stochastic only) and the
    ``ElementIndex`` that places the tensor in the global batch for stochastic rounding (or None)."""

    rounding: Rounding
    seed: int | None = None
    sr_index: object = None


def dual_applies(t, config, transform=None) -> bool:
    """Whether ``quantize_dual`` covers ``t`` and ``config``: where ``quantize_wgrad`` does (CUDA, 2D, NVFP4 1x16)
    and the features are a multiple of 16 (its rowwise output has no padding)."""
    return _wgrad_kernel_applies(t, config, transform) and t.shape[1] % 16 == 0


@on_operand_device
def dual_amax(t, config, transform=None):
    """(max |t|, max |rht(pad(t^T))|) as a float32 (2,) tensor from one read, or None where ``quantize_dual``
    does not apply: the amax pass alone, for an all-reduce between data-parallel ranks."""
    if not dual_applies(t, config, transform):
        return None
    from .nvfp4_dual import dual_amax as _amax

    return _amax(t.contiguous(), _signs(transform, t.device))


@on_operand_device
def quantize_dual(t, config, row: DualOperand, col: DualOperand, *, transform=None, amax=None, dequantized=False):
    """Rowwise and columnwise NVFP4 (1x16) of ``t`` (tokens, features) from one read, or None where no kernel
    covers it: (``quantize(t)`` with ``row``'s rounding, ``quantize_wgrad(t)`` with ``col``'s and
    ``transform``), bit-exact with those two calls. ``amax``: a float32 (2,) tensor (rowwise amax, amax of
    the transformed columnwise tensor; e.g. all-reduced ``dual_amax``) skips the amax pass.
    ``dequantized``: two ``Dequantized`` operands (tokens, features) and (features, tokens') instead of
    ``QuantizedTensor``s."""
    if not dual_applies(t, config, transform):
        return None
    from ..qtensor import QuantizedTensor
    from .nvfp4_dual import quantize_nvfp4_dual

    row = DualOperand(Rounding.parse(row.rounding), row.seed, row.sr_index)
    col = DualOperand(Rounding.parse(col.rounding), col.seed, col.sr_index)
    for op in (row, col):
        if op.rounding is Rounding.STOCHASTIC and op.seed is None:
            raise ValueError("quantize_dual: stochastic rounding needs a seed")
    r, c = quantize_nvfp4_dual(t, tuple(row), tuple(col), _signs(transform, t.device), amax, dequantized=dequantized)
    M, F = t.shape
    if dequantized:
        return Dequantized(r[0], r[1], M), Dequantized(c[0], c[1], F)
    col_shape = torch.Size((F, M + (-M) % 16))
    return (QuantizedTensor(*r, config, t.shape, t.dtype),
            QuantizedTensor(*c, config, col_shape, torch.float32 if transform is not None else t.dtype))  # fmt: skip


@on_operand_device
def qmm(a, b, *, out_dtype: torch.dtype = torch.float32):
    """``A @ B^T`` for NVFP4 or FP8 ``QuantizedTensor``s quantized along K, or None where no kernel applies.

    FP8 runs on the FP8 tensor cores through ``scaled_mm`` (``fp8_mm``): per-tensor operands return
    ``out_dtype``; DeepSeek blockwise ones return BF16 (what cuBLAS's blockwise path writes), cast.
    """
    from ..schemes import FP8Config
    from .fp8_gemm import nvfp4_mm_native
    from .nvfp4_gemm import qmm as _qmm

    if isinstance(getattr(a, "config", None), FP8Config) and isinstance(getattr(b, "config", None), FP8Config):
        from .fp8_gemm import fp8_mm as _fp8_mm

        blockwise = a.config.block is not None
        out = _fp8_mm(a, b, out_dtype=torch.bfloat16 if blockwise else out_dtype)
        return None if out is None else out.to(out_dtype)

    from ..schemes import MXConfig

    if isinstance(getattr(a, "config", None), MXConfig) and isinstance(getattr(b, "config", None), MXConfig):
        from .dequant_gemm import qmm_mx

        return qmm_mx(a, b, out_dtype=out_dtype)  # MXFP4 1x32: dequantized to BF16, then the BF16 GEMM

    native = nvfp4_mm_native(a, b, out_dtype=out_dtype)  # Blackwell (sm100+) only; None elsewhere
    if native is not None:
        return native
    return _qmm(a, b, out_dtype=out_dtype)


@on_operand_device
def linear_w4a16(x: torch.Tensor, w, bias: torch.Tensor | None = None):
    """``x @ W^T (+ bias)`` for BF16/FP16 ``x`` (..., K) and NVFP4-quantized weights ``w`` (N, K)."""
    from .nvfp4_gemm import linear_w4a16 as _linear

    return _linear(x, w, bias)


@on_operand_device
def fp8_mm(a, b, *, out_dtype: torch.dtype = torch.bfloat16):
    """``A @ B^T`` for FP8 ``QuantizedTensor``s through ``scaled_mm``, or None (with the reason logged)."""
    from .fp8_gemm import fp8_mm as _fp8_mm

    return _fp8_mm(a, b, out_dtype=out_dtype)
