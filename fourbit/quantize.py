"""``fourbit.quantize``: one entry point, one result type.

    q = fourbit.quantize(x, "nvfp4")                    # 1x16 blocks along the last dim
    q = fourbit.quantize(w, "nvfp4", block=(16, 16))    # 2D blocks (weights)
    q = fourbit.quantize(g, "nvfp4", rounding="stochastic", seed=1234)
    x_hat = q.dequantize()

The input is viewed as a matrix ``(R, C)`` with ``R`` the product of the leading dims; blocks ``(br, bc)``
tile it, ``bc`` along the last dim. Scales have shape ``(*leading, C/bc)`` for 1D blocks and
``(R/br, C/bc)`` for 2D blocks. Stochastic rounding draws ``random_bits(seed, r * C + c)`` for the element
at row ``r``, column ``c``, so results do not depend on device or chunking.

Dispatch: ``backend="auto"`` uses a fused kernel from ``fourbit.kernels`` for CUDA inputs where one exists
and the plain-PyTorch reference (the ground truth, bit-exact with the kernels) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fp8 import dequantize_fp8, quantize_fp8
from .mx import dequantize_mx, quantize_mx
from .nvfp4 import dequantize_nvfp4, quantize_nvfp4
from .packing import pack_fp4, unpack_fp4
from .rounding import ElementIndex, Rounding, random_bits
from .schemes import FP8Config, MXConfig, NVFP4Config, SchemeConfig, resolve_scheme

__all__ = ["QuantizedTensor", "quantize", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class QuantizedTensor:
    """Codes, scales and what is needed to dequantize them.

    data          uint8; FP4 packs two codes per byte (element 2i in the low nibble), others one per byte.
                  Shape ``(*leading, C/2)`` for FP4 or ``(*leading, C)``, C padded to the block if ``pad``.
    scales        NVFP4: float8_e4m3fn; MX: float8_e8m0fnu; FP8: float32 decode scales.
    tensor_scale  NVFP4: float32 per-tensor decode scale ``s_dec``; None otherwise.
    """

    data: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None
    config: SchemeConfig
    shape: torch.Size
    dtype: torch.dtype

    @property
    def scheme(self) -> str:
        return self.config.name

    @property
    def block(self) -> tuple[int, int] | None:
        return self.config.block

    @property
    def packed(self) -> bool:
        return self.config.elem.bits == 4

    def codes(self) -> torch.Tensor:
        """Element codes, one per byte, as a padded matrix (R, C)."""
        codes = unpack_fp4(self.data) if self.packed else self.data
        return codes.reshape(-1, codes.shape[-1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes()
        if isinstance(self.config, NVFP4Config):
            x = dequantize_nvfp4(codes, self._scales2d(codes), self.tensor_scale, self.config.block)
        elif isinstance(self.config, MXConfig):
            x = dequantize_mx(codes, self._scales2d(codes), self.config)
        else:
            scales = self.scales if self.config.block is None else self._scales2d(codes)
            x = dequantize_fp8(codes, scales, self.config)
        rows = self.shape.numel() // self.shape[-1] if len(self.shape) else 1
        x = x[:rows, : self.shape[-1]] if len(self.shape) else x
        return x.reshape(self.shape).to(dtype)

    def _scales2d(self, codes: torch.Tensor) -> torch.Tensor:
        br, bc = self.config.block
        return self.scales.reshape(codes.shape[0] // br, codes.shape[1] // bc)

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()
        return n + (4 if self.tensor_scale is not None else 0)

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(scheme={self.scheme!r}, block={self.block}, shape={tuple(self.shape)}, "
            f"dtype={self.dtype}, data={tuple(self.data.shape)} uint8, scales={tuple(self.scales.shape)} "
            f"{self.scales.dtype})"
        )


def _check_input(x: torch.Tensor, check_finite: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize expects a float32/bfloat16/float16 tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("quantize expects at least one dim, got a scalar")
    # one reduction decides (amax is NaN or Inf exactly when some element is); count only on failure
    if check_finite and x.numel() and not bool(torch.isfinite(x.abs().amax())):
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(
                f"input holds {bad} non-finite value(s) (NaN/Inf); pass check_finite=False to quantize anyway "
                "(non-finite blocks then dequantize to NaN)"
            )


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


def _as_matrix(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """(*leading, C) -> float32 (R, C), zero-padded by ``padding`` = (rows, cols)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    pr, pc = padding
    return F.pad(x2, (0, pc, 0, pr)) if pr or pc else x2


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
    _check_input(x, check_finite)
    padding = _padding(x.shape, config.block, pad, config.name)
    if rounding is Rounding.STOCHASTIC and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))

    if backend != "reference":
        from . import kernels

        q = kernels.quantize(
            x, config, rounding=rounding, seed=seed, amax=amax, pad=pad, backend=backend, sr_index=sr_index
        )
        if q is not None:
            return q

    x2 = _as_matrix(x, padding)
    bits = None
    if rounding is Rounding.STOCHASTIC:
        R, C = x2.shape
        index = (sr_index or ElementIndex()).flat(R, C, x.shape[-1], device=x2.device)
        bits = random_bits(seed, index)

    tensor_scale = None
    amax_t = None if amax is None else torch.as_tensor(amax, dtype=torch.float32, device=x2.device)
    if isinstance(config, NVFP4Config):
        codes, scales, tensor_scale = quantize_nvfp4(x2, config, rounding, bits, amax_t)
    elif isinstance(config, MXConfig):
        codes, scales = quantize_mx(x2, config, rounding, bits)
    else:
        codes, scales = quantize_fp8(x2, config, rounding, bits, amax_t)

    lead = x.shape[:-1]
    data = pack_fp4(codes) if config.elem.bits == 4 else codes
    if config.block is None or config.block[0] == 1:
        data = data.reshape(*lead, data.shape[-1])
    if config.block is not None and config.block[0] == 1:
        scales = scales.reshape(*lead, scales.shape[-1])
    return QuantizedTensor(data, scales, tensor_scale, config, x.shape, x.dtype)
