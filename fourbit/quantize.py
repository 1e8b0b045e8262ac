"""``fourbit.quantize``: one entry point, one result type.

    q = fourbit.quantize(x, "nvfp4")                    # 1x16 blocks along the last dim
    q = fourbit.quantize(w, "nvfp4", block=(16, 16))    # 2D blocks (weights)
    q = fourbit.quantize(g, "nvfp4", rounding="stochastic", seed=1234)
    x_hat = q.dequantize()

The input is viewed as a matrix ``(R, C)`` with ``R`` the product of the leading dims; blocks ``(br, bc)``
tile it, ``bc`` along the last dim. Scales have shape ``(*leading, C/bc)`` for 1D blocks and
``(R/br, C/bc)`` for 2D blocks. Stochastic rounding draws ``random_bits(seed, r * C + c)`` for the element
at row ``r``, column ``c``, so results do not depend on device or chunking.

Dispatch happens in one place, the ``fourbit::quantize`` custom op (``fourbit.ops``): a fused kernel for CUDA
inputs where one exists, the plain-PyTorch reference (the ground truth, bit-exact with the kernels)
otherwise, and a fake implementation so ``torch.compile`` traces through (pass ``check_finite=False``
inside a compiled function: the check reads one number back to the host).

``check_finite`` costs one read of ``x``: the same reduction gives the per-tensor amax that NVFP4 and FP8
need, which is then handed to the quantize pass instead of measured again.
"""

from __future__ import annotations

from ._callable_module import make_callable

import math

import torch

from . import ops
from ._fp32 import F32_MAX
from .qtensor import QuantizedTensor
from .rounding import ElementIndex, Rounding
from .schemes import FP8Config, NVFP4Config, SchemeConfig, resolve_scheme

__all__ = ["QuantizedTensor", "quantize", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize expects a float32/bfloat16/float16/float64 tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("quantize expects at least one dim, got a scalar")
    if x.numel() == 0:
        raise ValueError(f"quantize expects a non-empty tensor, got shape {tuple(x.shape)}")


def _measured_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as float32 in one read (no |x| copy), raising on NaN/Inf or, for float64, beyond float32's range.

    NaN or Inf anywhere makes the max NaN or Inf, so one reduction decides; elements are counted only then.
    """
    amax = torch.linalg.vector_norm(x.detach(), ord=math.inf)  # (), x's dtype: the exact max |x| (no |x| copy)
    value = float(amax)  # the one host read of the check
    if not math.isfinite(value):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"input holds {bad} non-finite value(s) (NaN/Inf); pass check_finite=False to quantize anyway "
            "(non-finite blocks then dequantize to NaN)"
        )
    if value > F32_MAX:
        raise ValueError(f"input's max |x| = {value:.4g} exceeds float32's range ({F32_MAX:.4g}); every scale is "
                         "computed in float32, so such a tensor has no faithful encoding")  # fmt: skip
    return amax.float()


def _check_amax(amax: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A user-given per-tensor amax: one finite, non-negative number (a tensor is checked unless compiling)."""
    if isinstance(amax, torch.Tensor):
        if amax.numel() != 1 or not amax.is_floating_point():
            raise ValueError(f"amax must be one floating-point number, got {amax.dtype} {tuple(amax.shape)}")
        t = amax.to(device=device, dtype=torch.float32).reshape(())
        if not torch.compiler.is_compiling():
            value = float(t)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"amax must be finite and >= 0, got {value}")
        return t
    if isinstance(amax, bool) or not isinstance(amax, (int, float)) or not math.isfinite(amax) or amax < 0:
        raise ValueError(f"amax must be a finite number >= 0 (or a tensor holding one), got {amax!r}")
    return torch.tensor(float(amax), dtype=torch.float32, device=device)


def _padding(shape: torch.Size, block: tuple[int, int] | None, pad: bool, scheme: str) -> tuple[int, int]:
    """Rows and columns to add so the (R, C) matrix view of ``shape`` tiles into blocks; raises unless ``pad``."""
    if block is None:
        return 0, 0
    br, bc = block
    C = shape[-1]
    R = shape.numel() // C if C else 0
    pr, pc = (-R) % br, (-C) % bc
    if (pr or pc) and not pad:
        what = f"last dim {C} by {bc}" if pc else f"leading rows {R} by {br}"
        raise ValueError(
            f"{scheme}: shape {tuple(shape)} is not divisible by block {block} ({what}); pass pad=True to zero-pad"
        )
    return pr, pc


def quantize(
    x: torch.Tensor,
    scheme: str | SchemeConfig = "nvfp4",
    *,
    block: tuple[int, int] | int | None = None,
    fmt: str | None = None,
    rounding: Rounding | str = Rounding.NEAREST,
    seed: int | None = None,
    scale_mode: str | None = None,
    four_over_six: bool | None = None,
    pow2_scale: bool | None = None,
    amax: torch.Tensor | float | None = None,
    sr_index: ElementIndex | None = None,
    pad: bool = False,
    check_finite: bool = True,
    backend: str = "auto",
) -> QuantizedTensor:
    """Quantize ``x`` under a scheme (``"nvfp4"``, ``"mxfp4"``, ``"mxfp6"``, ``"mxfp8"``, ``"fp8"``, or a config).

    ``rounding="stochastic"`` rounds elements stochastically with the counter-based generator keyed by
    ``seed`` (drawn from torch's default generator if None) and the element's index, ``r * C + c`` unless
    ``sr_index`` places the tensor inside a larger one. ``amax`` replaces the measured tensor amax of the
    schemes with a per-tensor scale (NVFP4, per-tensor FP8), e.g. with a calibrated or all-reduced one.
    ``backend`` is ``"auto"``, ``"reference"`` or ``"triton"``.
    """
    config = resolve_scheme(
        scheme, block=block, fmt=fmt, scale_mode=scale_mode, four_over_six=four_over_six, pow2_scale=pow2_scale
    )
    rounding = Rounding.parse(rounding)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    per_tensor = isinstance(config, NVFP4Config) or (isinstance(config, FP8Config) and config.block is None)
    if amax is not None and not per_tensor:
        raise ValueError(f"amax= applies to schemes with a per-tensor scale (nvfp4, fp8), not {config.name}")
    _check_input(x)
    _padding(x.shape, config.block, pad, config.name)
    stochastic = rounding is Rounding.STOCHASTIC
    if stochastic and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    key = None
    if isinstance(seed, torch.Tensor):  # a key in device memory (fourbit.ops.seed_keys), read as the kernel runs
        if seed.dtype != torch.int32 or seed.numel() != 1:
            raise ValueError(f"a seed tensor must hold one int32 key, got {seed.dtype} {tuple(seed.shape)}")
        key, seed = seed.to(x.device), None
    elif seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64):
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    amax_t = None if amax is None else _check_amax(amax, x.device)
    if check_finite:
        measured = _measured_amax(x)
        if per_tensor and amax_t is None:
            amax_t = measured  # the same max the quantize pass would measure: hand it over, read x once less
    return ops.quantize(x, config, stochastic=stochastic, seed=seed or 0, key=key, amax=amax_t, sr_index=sr_index,
                        backend=backend)  # fmt: skip


make_callable(__name__)  # fourbit.quantize(...) calls quantize(...); fourbit.quantize.<name> still reads the module
