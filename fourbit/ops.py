"""The op seam: fourbit's kernel-backed operations as ``torch.library`` custom ops.

Each op here has

* a reference implementation in plain PyTorch (the CPU one, and the CUDA fallback where no kernel covers a
  case): the ground truth, written once in ``nvfp4.py`` / ``mx.py`` / ``fp8.py``;
* a CUDA implementation that launches the Triton kernel (``fourbit.kernels``), bit-exact with the reference;
* a fake (meta) implementation giving the exact output shapes and dtypes, so ``torch.compile`` traces
  through a quantized model without a graph break;

and ``torch.library.opcheck`` tests each (``tests/test_ops.py``). Callers (``quantize.py``, ``gemm.py``,
``nn/functional.py``) call these ops; nothing above this module chooses between reference and kernel.

    torch.ops.fourbit.quantize   x -> (codes, block scales, tensor scale)        every scheme
    torch.ops.fourbit.qmm        two quantized operands (rows, K) -> A @ B^T      NVFP4, MX, FP8 (scaled_mm)
    torch.ops.fourbit.linear_*   the three GEMMs of a quantized linear layer      (nn/functional.py)

A custom op takes tensors, numbers, strings and dtypes, not Python objects. A scheme config travels as a
content key (``scheme_key``: the same config gives the same string, so a compiled graph holds a constant
and guards on nothing that changes between steps); ``config_of`` maps it back.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .fp8 import quantize_fp8
from .mx import quantize_mx
from .nvfp4 import quantize_nvfp4
from .packing import pack_fp4
from .qtensor import QuantizedTensor
from .rounding import ElementIndex, Rounding, random_bits_from_key, seed_key
from .schemes import MXConfig, NVFP4Config, SchemeConfig

__all__ = ["scheme_key", "config_of", "quantize", "qmm", "quantized_shapes", "NO_ROW_STRIDE"]

NO_ROW_STRIDE = -1  # ElementIndex.row_stride None (the tensor's own last dim) as an op argument

# --- keys for what an op cannot take ----------------------------------------------------------------

_CONFIGS: dict[str, SchemeConfig] = {}
_KEYS: dict[SchemeConfig, str] = {}


def scheme_key(config: SchemeConfig) -> str:
    """A short string naming ``config`` by content (registered so ``config_of`` inverts it)."""
    key = _KEYS.get(config)
    if key is None:
        key = f"{config.name}:{hashlib.sha1(repr(config).encode()).hexdigest()[:12]}"
        _CONFIGS.setdefault(key, config)
        _KEYS[config] = key
    return key


def _direct(x: Tensor) -> bool:
    """Whether to call an op's implementation directly instead of through the dispatcher: a plain eager
    tensor outside tracing (e.g. inside ``fourbit::linear_forward``, already opaque to the compiler). The
    dispatcher's Python layers cost tens of microseconds a call; the implementation is the same code."""
    return type(x) is Tensor and not torch.compiler.is_compiling()


def config_of(key: str) -> SchemeConfig:
    try:
        return _CONFIGS[key]
    except KeyError:
        raise ValueError(f"unknown scheme key {key!r} (made by fourbit.ops.scheme_key in this process?)") from None


def _index(row_offset: int, col_offset: int, row_stride: int) -> ElementIndex:
    return ElementIndex(row_offset, col_offset, None if row_stride == NO_ROW_STRIDE else row_stride)


def _host_key(seed: int, key: Optional[Tensor]) -> int:
    """The 32-bit stochastic-rounding key: from a device key tensor (read: a sync), else from the seed."""
    if key is not None:
        return int(key.reshape(()).item()) & 0xFFFFFFFF
    return seed_key(seed & ((1 << 64) - 1))


# --- quantize -----------------------------------------------------------------------------------------


def quantized_shapes(shape: torch.Size | tuple[int, ...], config: SchemeConfig) -> tuple[tuple, tuple]:
    """(data shape, scales shape) of ``quantize(x, config, pad=True)`` for ``x`` of ``shape``."""
    shape = tuple(shape)
    if config.block is None:  # per-tensor FP8: one code per element, one scale
        return shape, ()
    br, bc = config.block
    lead, C = shape[:-1], shape[-1]
    R = 1
    for d in lead:
        R *= d
    Cp, Rp = C + (-C) % bc, R + (-R) % br
    width = Cp // 2 if config.elem.bits == 4 else Cp  # FP4: two codes per byte
    if br == 1:
        return (*lead, width), (*lead, Cp // bc)
    return (Rp, width), (Rp // br, Cp // bc)


def _scale_dtype(config: SchemeConfig) -> torch.dtype:
    if isinstance(config, NVFP4Config):
        return torch.float8_e4m3fn
    if isinstance(config, MXConfig):
        return torch.float8_e8m0fnu
    return torch.float32


def _reference_quantize(x, config, stochastic, key, amax, pad, index):
    """The plain-PyTorch path: (R, C) float32 matrix view, zero-padded to whole blocks, per-format reference."""
    x2 = x.reshape(-1, x.shape[-1]).float()  # (R, C)
    if config.block is not None:
        br, bc = config.block
        pr, pc = (-x2.shape[0]) % br, (-x2.shape[1]) % bc
        x2 = F.pad(x2, (0, pc, 0, pr)) if pr or pc else x2
    rounding = Rounding.STOCHASTIC if stochastic else Rounding.NEAREST
    bits = None
    if stochastic:
        R, C = x2.shape
        bits = random_bits_from_key(key, index.flat(R, C, x.shape[-1], device=x2.device))
    amax_t = None if amax is None else amax.to(device=x2.device, dtype=torch.float32).reshape(())
    tensor_scale = torch.empty(0, dtype=torch.float32, device=x.device)
    if isinstance(config, NVFP4Config):
        codes, scales, tensor_scale = quantize_nvfp4(x2, config, rounding, bits, amax_t)
    elif isinstance(config, MXConfig):
        codes, scales = quantize_mx(x2, config, rounding, bits)
    else:
        codes, scales = quantize_fp8(x2, config, rounding, bits, amax_t)
    data = pack_fp4(codes) if config.elem.bits == 4 else codes
    data_shape, scales_shape = quantized_shapes(x.shape, config)
    return data.reshape(data_shape), scales.reshape(scales_shape), tensor_scale


@torch.library.custom_op("fourbit::quantize", mutates_args=())
def _quantize_op(
    x: Tensor, scheme: str, stochastic: bool, seed: int, key: Optional[Tensor], amax: Optional[Tensor],
    row_offset: int, col_offset: int, row_stride: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference implementation (CPU; and CUDA where no kernel covers the case)."""
    config = config_of(scheme)
    host_key = _host_key(seed, key) if stochastic else 0
    return _reference_quantize(x, config, stochastic, host_key, amax, True, _index(row_offset, col_offset, row_stride))


_reference_op_impl = getattr(_quantize_op, "_init_fn", None) or (lambda *a: _quantize_op(*a))  # the undecorated reference


@_quantize_op.register_kernel("cuda")
def _quantize_cuda(x, scheme, stochastic, seed, key, amax, row_offset, col_offset, row_stride):
    from . import kernels

    config = config_of(scheme)
    rounding = Rounding.STOCHASTIC if stochastic else Rounding.NEAREST
    index = _index(row_offset, col_offset, row_stride)
    q = kernels.quantize(x, config, rounding=rounding, seed=key if key is not None else seed, amax=amax, pad=True,
                         backend="auto", sr_index=index if stochastic else None)  # fmt: skip
    if q is None:
        host_key = _host_key(seed, key) if stochastic else 0
        return _reference_quantize(x, config, stochastic, host_key, amax, True, index)
    data_shape, scales_shape = quantized_shapes(x.shape, config)
    tensor_scale = q.tensor_scale if q.tensor_scale is not None else x.new_empty(0, dtype=torch.float32)
    return q.data.reshape(data_shape), q.scales.reshape(scales_shape), tensor_scale


@_quantize_op.register_fake
def _quantize_fake(x, scheme, stochastic, seed, key, amax, row_offset, col_offset, row_stride):
    config = config_of(scheme)
    data_shape, scales_shape = quantized_shapes(x.shape, config)
    tensor_scale = x.new_empty(() if isinstance(config, NVFP4Config) else (0,), dtype=torch.float32)
    return (x.new_empty(data_shape, dtype=torch.uint8), x.new_empty(scales_shape, dtype=_scale_dtype(config)),
            tensor_scale)  # fmt: skip


def quantize(
    x: Tensor, config: SchemeConfig, *, stochastic: bool = False, seed: int = 0, key: Tensor | None = None,
    amax: Tensor | None = None, sr_index: ElementIndex | None = None, backend: str = "auto",
) -> QuantizedTensor:
    """``x`` quantized under ``config``, zero-padded to whole blocks (inputs already checked by the caller).

    Stochastic rounding keys on ``seed`` (an int in [0, 2^64)) or on ``key``, a one-element int32 tensor
    holding the key on ``x``'s device (``fourbit.kernels.seed_keys``), read when the kernel runs.
    ``backend="reference"`` skips the kernels; ``"triton"`` insists on one (CUDA, a covered case)."""
    index = sr_index or ElementIndex()
    row_stride = NO_ROW_STRIDE if index.row_stride is None else index.row_stride
    signed_seed = seed - (1 << 64) if seed >= 1 << 63 else seed  # an op's int is int64: the same 64 bits
    args = (scheme_key(config), stochastic, signed_seed, key, amax, index.row_offset, index.col_offset, row_stride)
    if backend == "reference":
        data, scales, ts = _reference_call(x, args)
    elif backend == "triton":
        data, scales, ts = _triton_call(x, config, args)
    elif _direct(x):
        data, scales, ts = (_quantize_cuda if x.is_cuda else _reference_op_impl)(x, *args)
    else:
        data, scales, ts = _quantize_op(x, *args)
    return QuantizedTensor(data, scales, ts if isinstance(config, NVFP4Config) else None, config, x.shape, x.dtype)


def _reference_call(x: Tensor, args: tuple) -> tuple[Tensor, Tensor, Tensor]:
    scheme, stochastic, seed, key, amax, ro, co, rs = args
    host_key = _host_key(seed, key) if stochastic else 0
    return _reference_quantize(x, config_of(scheme), stochastic, host_key, amax, True, _index(ro, co, rs))


def _triton_call(x: Tensor, config: SchemeConfig, args: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel or an error saying why none runs (``backend="triton"``)."""
    from . import kernels

    if not x.is_cuda:
        raise ValueError(f"backend='triton' needs a CUDA tensor, got one on {x.device}; use backend='reference'")
    if not kernels.triton_available():
        raise RuntimeError("backend='triton' needs CUDA and the triton package")
    scheme, stochastic, seed, key, amax, ro, co, rs = args
    rounding = Rounding.STOCHASTIC if stochastic else Rounding.NEAREST
    q = kernels.quantize(x, config, rounding=rounding, seed=key if key is not None else seed, amax=amax, pad=True,
                         backend="triton", sr_index=_index(ro, co, rs) if stochastic else None)  # fmt: skip
    data_shape, scales_shape = quantized_shapes(x.shape, config)
    ts = q.tensor_scale if q.tensor_scale is not None else x.new_empty(0, dtype=torch.float32)
    return q.data.reshape(data_shape), q.scales.reshape(scales_shape), ts


# --- qmm ----------------------------------------------------------------------------------------------


def _operand(data: Tensor, scales: Tensor, tensor_scale: Tensor, scheme: str, shape: list[int]) -> QuantizedTensor:
    """A QuantizedTensor from an op's arguments (FP8 block scales cross the boundary as their uint8 bits:
    opcheck and some backends do arithmetic on float8 inputs that PyTorch does not implement)."""
    config = config_of(scheme)
    if scales.dtype == torch.uint8:
        scales = scales.view(_scale_dtype(config))
    ts = tensor_scale if isinstance(config, NVFP4Config) else None
    return QuantizedTensor(data, scales, ts, config, torch.Size(shape), torch.float32)


def _reference_qmm(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype) -> Tensor:
    with torch.autocast(a.data.device.type, enabled=False):  # float32 accumulation, whatever the caller's autocast
        return (a.dequantize(torch.float32) @ b.dequantize(torch.float32).T).to(out_dtype)


@torch.library.custom_op("fourbit::qmm", mutates_args=())
def _qmm_op(
    a_data: Tensor, a_scales: Tensor, a_tensor_scale: Tensor, a_scheme: str, a_shape: list[int],
    b_data: Tensor, b_scales: Tensor, b_tensor_scale: Tensor, b_scheme: str, b_shape: list[int],
    out_dtype: torch.dtype,
) -> Tensor:
    """Reference: both operands dequantized to float32, one float32 GEMM, rounded once to ``out_dtype``."""
    a = _operand(a_data, a_scales, a_tensor_scale, a_scheme, a_shape)
    b = _operand(b_data, b_scales, b_tensor_scale, b_scheme, b_shape)
    return _reference_qmm(a, b, out_dtype)


@_qmm_op.register_kernel("cuda")
def _qmm_cuda(a_data, a_scales, a_ts, a_scheme, a_shape, b_data, b_scales, b_ts, b_scheme, b_shape, out_dtype):
    from . import kernels

    a = _operand(a_data, a_scales, a_ts, a_scheme, a_shape)
    b = _operand(b_data, b_scales, b_ts, b_scheme, b_shape)
    out = kernels.qmm(a, b, out_dtype=out_dtype) if kernels.triton_available() else None
    return _reference_qmm(a, b, out_dtype) if out is None else out


@_qmm_op.register_fake
def _qmm_fake(a_data, a_scales, a_ts, a_scheme, a_shape, b_data, b_scales, b_ts, b_scheme, b_shape, out_dtype):
    return a_data.new_empty((a_shape[0], b_shape[0]), dtype=out_dtype)


def _flat(q: QuantizedTensor) -> tuple:
    ts = q.tensor_scale if q.tensor_scale is not None else q.data.new_empty(0, dtype=torch.float32)
    scales = q.scales.view(torch.uint8) if q.scales.element_size() == 1 else q.scales
    return q.data, scales, ts, scheme_key(q.config), list(q.shape)


def qmm(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``A @ B^T`` of two operands quantized along K (float32 accumulation, rounded once to ``out_dtype``)."""
    args = (*_flat(a), *_flat(b), out_dtype)
    if _direct(a.data) and a.data.is_cuda:
        return _qmm_cuda(*args)
    return _qmm_op(*args)


# --- NVFP4 operands for the emulated GEMM (Hopper): quantized straight to BF16 values --------------------


class Dequantized(NamedTuple):
    """An NVFP4 operand as the emulated GEMM multiplies it: ``values[:rows] * tensor_scale`` is the dequantized
    (rows, K) matrix. ``values`` (bf16, K zero-padded to whole blocks, rows to whole 2D blocks) holds each
    element's e2m1(code) * e4m3(block scale), exactly (at most 6 significant bits, within BF16's range);
    ``tensor_scale`` (float32, 0-dim) is the decode scale."""

    values: Tensor
    tensor_scale: Tensor
    rows: int

    def t(self) -> "Dequantized":
        """The transposed operand, a view (exact for square 2D blocks, whose transpose is their quantization
        of the transposed matrix, as ``fourbit.gemm.transpose`` says)."""
        return Dequantized(self.values.T, self.tensor_scale, self.values.shape[1])


DEQUANTIZED_K_ALIGN = 64  # dequantized_mm's K step (kernels.dequant_gemm.K_ALIGN; tests hold them equal)


def _triton() -> bool:
    from .kernels import triton_available

    return triton_available()


def device_seeds_available() -> bool:
    """Whether ``seed_keys`` runs on the GPU (CUDA and triton)."""
    return _triton()


def dequantized_applies(x: Tensor, config: SchemeConfig | None) -> bool:
    """Whether ``quantize_dequantized`` runs its kernel for ``x``: CUDA, triton, NVFP4 without four-over-six."""
    from . import kernels

    return kernels.dequantized_applies(x, config)


def _values_of(q: QuantizedTensor) -> tuple[Tensor, Tensor]:
    """Reference ``Dequantized`` values of an NVFP4 QuantizedTensor: e2m1(code) * block scale in BF16 (exact)."""
    from .nvfp4 import dequantize_nvfp4

    codes = q.codes()  # (Rp, Cp)
    br, bc = q.config.block
    scales = q.scales.reshape(codes.shape[0] // br, codes.shape[1] // bc)
    one = torch.ones((), dtype=torch.float32, device=codes.device)
    return dequantize_nvfp4(codes, scales, one, q.config.block).to(torch.bfloat16), q.tensor_scale


@torch.library.custom_op("fourbit::quantize_dequantized", mutates_args=())
def _quantize_dequantized_op(
    x: Tensor, scheme: str, stochastic: bool, seed: int, key: Optional[Tensor], amax: Optional[Tensor],
    row_offset: int, col_offset: int, row_stride: int,
) -> tuple[Tensor, Tensor]:
    """Reference: ``quantize`` then the exact BF16 values of codes times block scales."""
    data, scales, ts = _quantize_op(x, scheme, stochastic, seed, key, amax, row_offset, col_offset, row_stride)
    return _values_of(_operand(data, scales, ts, scheme, list(x.shape)))


@_quantize_dequantized_op.register_kernel("cuda")
def _quantize_dequantized_cuda(x, scheme, stochastic, seed, key, amax, row_offset, col_offset, row_stride):
    config = config_of(scheme)
    if not dequantized_applies(x, config):  # (not NVFP4 1x16/16x16 on a kernel dtype): the reference
        ref = _reference_call(x, (scheme, stochastic, seed, key, amax, row_offset, col_offset, row_stride))
        return _values_of(_operand(*ref, scheme, list(x.shape)))
    from .kernels.nvfp4_quantize import quantize_nvfp4_dequantized

    rounding = Rounding.STOCHASTIC if stochastic else Rounding.NEAREST
    index = _index(row_offset, col_offset, row_stride) if stochastic else None
    return quantize_nvfp4_dequantized(x, config, rounding, key if key is not None else seed, amax, index)


def _dequantized_shape(shape, config) -> tuple[int, int]:
    br, bc = config.block
    R = 1
    for d in shape[:-1]:
        R *= d
    C = shape[-1]
    return R + (-R) % br, C + (-C) % bc


@_quantize_dequantized_op.register_fake
def _quantize_dequantized_fake(x, scheme, stochastic, seed, key, amax, row_offset, col_offset, row_stride):
    return x.new_empty(_dequantized_shape(x.shape, config_of(scheme)), dtype=torch.bfloat16), x.new_empty(
        (), dtype=torch.float32)


def _seed_args(stochastic: bool, seed: "int | Tensor | None") -> tuple[int, Tensor | None]:
    """An int seed or a device key tensor as the ops' (seed, key) pair."""
    if not stochastic:
        return 0, None
    if isinstance(seed, Tensor):
        return 0, seed
    if seed is None:
        raise ValueError("stochastic rounding needs a seed")
    return (seed - (1 << 64) if seed >= 1 << 63 else seed), None


def quantize_dequantized(x: Tensor, config: SchemeConfig, *, stochastic: bool = False, seed=None,
                         amax: Tensor | None = None, sr_index: ElementIndex | None = None) -> Dequantized:  # fmt: skip
    """NVFP4 of ``x`` (..., C) as a ``Dequantized`` (rows = x's rows): ``values[:rows, :C] * tensor_scale``
    equals ``quantize(x, config, ...).dequantize()``."""
    s, key = _seed_args(stochastic, seed)
    index = sr_index or ElementIndex()
    rs = NO_ROW_STRIDE if index.row_stride is None else index.row_stride
    args = (x, scheme_key(config), stochastic, s, key, amax, index.row_offset, index.col_offset, rs)
    if _direct(x) and x.is_cuda:
        values, ts = _quantize_dequantized_cuda(*args)
    else:
        values, ts = _quantize_dequantized_op(*args)
    return Dequantized(values, ts, x.numel() // x.shape[-1])


# --- the GEMM of two Dequantized operands --------------------------------------------------------------------


@torch.library.custom_op("fourbit::dequantized_mm", mutates_args=())
def _dequantized_mm_op(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Reference: ``(a @ b^T) * a_scale * b_scale`` in float32 (bf16 products are exact), rounded once."""
    with torch.autocast(a.device.type, enabled=False):
        return ((a.float() @ b.float().T) * a_scale * b_scale).to(out_dtype)


@_dequantized_mm_op.register_kernel("cuda")
def _dequantized_mm_cuda(a, b, a_scale, b_scale, out_dtype):
    from .kernels.dequant_gemm import scaled_gemm

    return scaled_gemm(a, b, a_scale, b_scale, out_dtype)


@_dequantized_mm_op.register_fake
def _dequantized_mm_fake(a, b, a_scale, b_scale, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def dequantized_mm(a: Dequantized, b: Dequantized, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``A @ B^T`` (a.rows, b.rows) of two ``Dequantized`` operands padded to the same K (a multiple of
    ``DEQUANTIZED_K_ALIGN``): one BF16 tensor-core GEMM, FP32 accumulation, both tensor scales in its epilogue."""
    if not isinstance(a, Dequantized) or not isinstance(b, Dequantized):
        raise TypeError(f"dequantized_mm takes two Dequantized operands, got {type(a).__name__} and {type(b).__name__}")
    K = a.values.shape[1]
    if b.values.shape[1] != K or K % DEQUANTIZED_K_ALIGN:
        raise ValueError(f"dequantized_mm: K must match and be a multiple of {DEQUANTIZED_K_ALIGN}, got "
                         f"{tuple(a.values.shape)} and {tuple(b.values.shape)}")  # fmt: skip
    args = (a.values[: a.rows], b.values[: b.rows], a.tensor_scale, b.tensor_scale, out_dtype)
    if _direct(a.values) and a.values.is_cuda:
        return _dequantized_mm_cuda(*args)
    return _dequantized_mm_op(*args)


# --- wgrad operands: quantize(rht(pad(t^T))) from the untransposed tensor -------------------------------------


def wgrad_applies(t: Tensor, config: SchemeConfig, transform) -> bool:
    """Whether ``quantize_wgrad`` runs its fused kernel: CUDA, triton, 2D, NVFP4 1x16, RHT of size 16 or none."""
    from . import kernels

    return kernels._wgrad_kernel_applies(t, config, transform)


def _wgrad_reference_input(t: Tensor, signs: Optional[Tensor]) -> Tensor:
    """rht(pad(t^T)): tokens zero-padded to a multiple of 16, then the 16-point RHT along them (if signs)."""
    from .hadamard import RHT_SIZE, fwht

    a = t.T.float()  # (F, M)
    pad = (-a.shape[1]) % RHT_SIZE
    a = F.pad(a, (0, pad)) if pad else a
    if signs is None:
        return a
    blocks = a.reshape(a.shape[0], -1, RHT_SIZE) * signs.float()  # (F, M'/16, 16)
    return (fwht(blocks) * RHT_SIZE**-0.5).reshape(a.shape)  # H diag(s) / sqrt(16): exact power-of-two scale


@torch.library.custom_op("fourbit::wgrad_amax", mutates_args=())
def _wgrad_amax_op(t: Tensor, signs: Optional[Tensor]) -> Tensor:
    """max |rht(pad(t^T))| as float32 (1,)."""
    return _wgrad_reference_input(t, signs).abs().amax().reshape(1)


@_wgrad_amax_op.register_kernel("cuda")
def _wgrad_amax_cuda(t, signs):
    from .kernels.nvfp4_quantize import wgrad_amax

    return wgrad_amax(t, signs).reshape(1)


@_wgrad_amax_op.register_fake
def _wgrad_amax_fake(t, signs):
    return t.new_empty((1,), dtype=torch.float32)


def _signs(transform, device) -> Tensor | None:
    from .hadamard import _signs_on

    return None if transform is None else _signs_on(transform, torch.float32, device)


def wgrad_amax(t: Tensor, transform=None) -> Tensor:
    """The amax pass of ``quantize_wgrad`` alone (float32, one element), e.g. for a data-parallel all-reduce."""
    signs = _signs(transform, t.device)
    return _wgrad_amax_cuda(t, signs) if _direct(t) and t.is_cuda else _wgrad_amax_op(t, signs)


@torch.library.custom_op("fourbit::quantize_wgrad", mutates_args=())
def _quantize_wgrad_op(
    t: Tensor, scheme: str, stochastic: bool, seed: int, key: Optional[Tensor], signs: Optional[Tensor],
    amax: Optional[Tensor], row_offset: int, col_offset: int, row_stride: int, dequantized: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference: (codes, scales, tensor scale) of quantize(rht(pad(t^T))); with ``dequantized`` (values, tensor
    scale, an empty tensor)."""
    a = _wgrad_reference_input(t, signs)
    data, scales, ts = _reference_call(a, (scheme, stochastic, seed, key, amax, row_offset, col_offset, row_stride))
    if dequantized:
        values, ts = _values_of(_operand(data, scales, ts, scheme, list(a.shape)))
        return values, ts, t.new_empty(0, dtype=torch.float32)
    return data, scales, ts


@_quantize_wgrad_op.register_kernel("cuda")
def _quantize_wgrad_cuda(t, scheme, stochastic, seed, key, signs, amax, row_offset, col_offset, row_stride,
                         dequantized):  # fmt: skip
    from .kernels.nvfp4_quantize import quantize_nvfp4_wgrad

    config = config_of(scheme)
    rounding = Rounding.STOCHASTIC if stochastic else Rounding.NEAREST
    index = _index(row_offset, col_offset, row_stride) if stochastic else None
    s = key if key is not None else seed
    if dequantized:
        values, ts = quantize_nvfp4_wgrad(t, config, rounding, s, signs, amax, index, dequantized=True)
        return values, ts, t.new_empty(0, dtype=torch.float32)
    return quantize_nvfp4_wgrad(t, config, rounding, s, signs, amax, index)


@_quantize_wgrad_op.register_fake
def _quantize_wgrad_fake(t, scheme, stochastic, seed, key, signs, amax, row_offset, col_offset, row_stride,
                         dequantized):  # fmt: skip
    M, Fe = t.shape
    Mp = M + (-M) % 16
    ts = t.new_empty((), dtype=torch.float32)
    if dequantized:
        return t.new_empty((Fe, Mp), dtype=torch.bfloat16), ts, t.new_empty(0, dtype=torch.float32)
    return t.new_empty((Fe, Mp // 2), dtype=torch.uint8), t.new_empty((Fe, Mp // 16), dtype=torch.float8_e4m3fn), ts


def quantize_wgrad(t: Tensor, config: SchemeConfig, *, stochastic: bool = False, seed=None, transform=None,
                   amax: Tensor | None = None, sr_index: ElementIndex | None = None,
                   dequantized: bool = False) -> "QuantizedTensor | Dequantized":  # fmt: skip
    """A wgrad operand straight from ``t`` (tokens, features): ``quantize(rht(pad(t^T)))``, tokens zero-padded to
    a multiple of 16; one fused kernel on CUDA (``wgrad_applies``). ``dequantized``: a ``Dequantized``
    (features, tokens') instead of a ``QuantizedTensor``."""
    s, key = _seed_args(stochastic, seed)
    index = sr_index or ElementIndex()
    rs = NO_ROW_STRIDE if index.row_stride is None else index.row_stride
    amax = None if amax is None else amax.reshape(1)
    args = (t, scheme_key(config), stochastic, s, key, _signs(transform, t.device), amax, index.row_offset,
            index.col_offset, rs, dequantized)
    out = _quantize_wgrad_cuda(*args) if _direct(t) and t.is_cuda else _quantize_wgrad_op(*args)
    M, Fe = t.shape
    if dequantized:
        return Dequantized(out[0], out[1], Fe)
    shape = torch.Size((Fe, M + (-M) % 16))
    return QuantizedTensor(out[0], out[1], out[2], config, shape, torch.float32 if transform is not None else t.dtype)


# --- stochastic-rounding keys from a step counter in device memory ---------------------------------------------

N_ROLES = 6  # fourbit.nn.functional.Role


@torch.library.custom_op("fourbit::seed_keys", mutates_args=())
def _seed_keys_op(step: Tensor, base: int) -> Tensor:
    """Reference: int32 (6,) ``seed_key(derive_seed)`` of each role for the step held in ``step`` (int64)."""
    from .rounding import _M64, _splitmix64

    b = base & _M64
    h = _splitmix64(b ^ (int(step.reshape(()).item()) & _M64))
    keys = [seed_key(_splitmix64(h ^ role) >> 1) for role in range(N_ROLES)]
    return torch.tensor([k - (1 << 32) if k >= 1 << 31 else k for k in keys], dtype=torch.int32, device=step.device)


@_seed_keys_op.register_kernel("cuda")
def _seed_keys_cuda(step, base):
    from .kernels.seeds import seed_keys as _kernel

    return _kernel(step, base & ((1 << 64) - 1), False)


@_seed_keys_op.register_fake
def _seed_keys_fake(step, base):
    return step.new_empty((N_ROLES,), dtype=torch.int32)


def seed_keys(step: Tensor, base: int) -> Tensor:
    """int32 (6,): the stochastic-rounding key of each ``Role`` at the step in ``step`` (int64, one element) for
    ``base = seed_base(seed, layer)``; on CUDA one launch and no host read."""
    args = (step.reshape(1), base - (1 << 64) if base >= 1 << 63 else base)
    return _seed_keys_cuda(*args) if _direct(step) and step.is_cuda else _seed_keys_op(*args)


@torch.library.custom_op("fourbit::advance_step", mutates_args=("counter",))
def _advance_step_op(counter: Tensor, advance: bool) -> Tensor:
    """The step a forward uses (a new tensor holding ``counter``'s value), then ``counter += 1`` if ``advance``.

    One op, so a compiler cannot let the backward's saved step alias the counter after its increment."""
    step = counter.clone()
    if advance:
        counter.add_(1)
    return step


@_advance_step_op.register_fake
def _advance_step_fake(counter, advance):
    return torch.empty_like(counter)


def advance_step(counter: Tensor, advance: bool) -> Tensor:
    """This forward's stochastic-rounding step (int64, one element); advances ``counter`` if ``advance``."""
    if _direct(counter):
        return _advance_step_op._init_fn(counter, advance) if hasattr(_advance_step_op, "_init_fn") else _advance_step_op(counter, advance)
    return _advance_step_op(counter, advance)
