"""``QuantizedTensor``: the codes, scales and config that ``fourbit.quantize`` returns, and its dequantization.

Plain data (a dataclass of tensors), so it crosses the op seam (``fourbit.ops``) as its tensors plus a
scheme key, and a compiled graph can build and unpack it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fp8 import dequantize_fp8
from .mx import dequantize_mx
from .nvfp4 import dequantize_nvfp4
from .packing import unpack_fp4
from .schemes import MXConfig, NVFP4Config, SchemeConfig

__all__ = ["QuantizedTensor"]


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
