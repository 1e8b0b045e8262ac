"""Quantization schemes as small frozen dataclasses, and the names that resolve to them.

``"nvfp4"``  -> ``NVFP4Config()``             E2M1 elements, 1x16 blocks, E4M3 block scale, FP32 tensor scale
``"mxfp4"``  -> ``MXConfig(E2M1)``            OCP MX: 1x32 blocks, E8M0 (power-of-two) block scale
``"mxfp6"``  -> ``MXConfig(E2M3)``            (``fmt="e3m2"`` for the other FP6)
``"mxfp8"``  -> ``MXConfig(E4M3)``            (``fmt="e5m2"``)
``"fp8"``    -> ``FP8Config()``               E4M3, one FP32 scale per tensor (``fmt="e5m2"``),
                                              or per tile with ``block=(1, 128)`` / ``(128, 128)`` (DeepSeek-V3)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Union

from .formats import E2M1, E2M3, E4M3, E5M2, FloatFormat, get_format

__all__ = [
    "ScaleMode",
    "ErrorMetric",
    "NVFP4Config",
    "MXConfig",
    "FP8Config",
    "SchemeConfig",
    "SCHEMES",
    "resolve_scheme",
]

Block = tuple[int, int]
MX_BLOCKS = ((1, 32), (32, 32))  # OCP MX v1.0: k = 32; (32, 32) is the 2-D weight variant (reference path only)


class ScaleMode(enum.Enum):
    """How an MX block's power-of-two scale is chosen from the block amax."""

    FLOOR = "floor"  # OCP MX v1.0: 2^(floor(log2 amax) - emax_elem)
    RCEIL = "rceil"  # cuBLAS / Blackwell: 2^ceil(log2(amax / elem_max)), data times the reciprocal


class ErrorMetric(enum.Enum):
    MSE = "mse"
    MAE = "mae"


def _check_block(block: Block | None, name: str) -> None:
    if block is None:
        return
    if not (isinstance(block, tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"{name}: block must be a pair of positive ints (rows, cols), got {block!r}")


@dataclass(frozen=True)
class NVFP4Config:
    """NVFP4: E2M1 codes, an E4M3 scale per block of 16 (or 16x16), an FP32 per-tensor scale."""

    block: Block = (1, 16)
    four_over_six: bool = False  # arXiv 2512.02010: per block, map the amax to 4 or 6
    four_over_six_error: ErrorMetric = ErrorMetric.MSE
    elem: FloatFormat = E2M1
    scale_format: FloatFormat = E4M3

    def __post_init__(self) -> None:
        _check_block(self.block, "nvfp4")
        if self.block not in ((1, 16), (16, 16)):
            raise ValueError(f"nvfp4: block must be (1, 16) or (16, 16), got {self.block}")
        if self.elem != E2M1:  # the NVFP4 quantizers encode E2M1 whatever this says: refuse, do not ignore
            raise ValueError(f"nvfp4: elements are always E2M1, got fmt {self.elem.name!r} "
                             f"(other element formats: 'mxfp6', 'mxfp8', 'fp8')")  # fmt: skip
        if self.scale_format != E4M3:
            raise ValueError(f"nvfp4: block scales are always E4M3, got {self.scale_format.name!r} "
                             f"(power-of-two E8M0 scales: 'mxfp4')")  # fmt: skip

    @property
    def name(self) -> str:
        return "nvfp4"


@dataclass(frozen=True)
class MXConfig:
    """OCP Microscaling: blocks of 32 share an E8M0 scale."""

    elem: FloatFormat = E2M1
    block: Block = (1, 32)
    scale_mode: ScaleMode = ScaleMode.FLOOR

    def __post_init__(self) -> None:
        _check_block(self.block, "mx")
        if self.block not in MX_BLOCKS:
            raise ValueError(f"{self.name}: OCP MX blocks hold 32 elements along a row: block must be one of "
                             f"{', '.join(map(str, MX_BLOCKS))}, got {self.block}")  # fmt: skip
        if self.elem.specials.value == "e8m0" or not self.elem.signed:
            raise ValueError(f"mx: element format must be signed, got {self.elem}")

    @property
    def name(self) -> str:
        return {4: "mxfp4", 6: "mxfp6", 8: "mxfp8"}[self.elem.bits]


@dataclass(frozen=True)
class FP8Config:
    """FP8 with FP32 scales: per tensor (``block=None``) or per tile/block (DeepSeek-V3)."""

    elem: FloatFormat = E4M3
    block: Block | None = None
    pow2_scale: bool = False  # round the decode scale up to a power of two

    def __post_init__(self) -> None:
        _check_block(self.block, "fp8")
        if self.elem.bits != 8:
            raise ValueError(f"fp8: element format must be 8-bit, got {self.elem}")

    @property
    def name(self) -> str:
        return "fp8" if self.block is None else "fp8-blockwise"


SchemeConfig = Union[NVFP4Config, MXConfig, FP8Config]

SCHEMES: dict[str, SchemeConfig] = {
    "nvfp4": NVFP4Config(),
    "nvfp4-2d": NVFP4Config(block=(16, 16)),
    "mxfp4": MXConfig(E2M1),
    "mxfp6": MXConfig(E2M3),
    "mxfp8": MXConfig(E4M3),
    "fp8": FP8Config(E4M3),
    "fp8-e5m2": FP8Config(E5M2),
    "fp8-blockwise": FP8Config(E4M3, block=(1, 128)),
}


def _element_format(config: SchemeConfig, fmt) -> FloatFormat:
    """``fmt`` for ``config``'s elements; an MX scheme keeps its width (``mxfp4`` with ``fmt="e4m3"`` would
    silently be MXFP8; ask for ``mxfp8``)."""
    elem = get_format(fmt)
    if isinstance(config, MXConfig) and elem.bits != config.elem.bits:
        raise ValueError(f"{config.name}: fmt {fmt!r} has {elem.bits} bits, not {config.elem.bits}; "
                         f"use 'mxfp{elem.bits}' for {elem.bits}-bit MX elements")  # fmt: skip
    return elem


def resolve_scheme(scheme: str | SchemeConfig, **overrides) -> SchemeConfig:
    """A scheme name or config plus keyword overrides (``block``, ``fmt``, ``scale_mode``, ...) -> config.

    ``None`` overrides are ignored; an override that the scheme does not have raises ``ValueError``.
    """
    if isinstance(scheme, str):
        key = scheme.lower().replace("_", "-")
        if key not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
        config = SCHEMES[key]
    elif isinstance(scheme, (NVFP4Config, MXConfig, FP8Config)):
        config = scheme
    else:
        raise TypeError(f"scheme must be a name or a config, got {type(scheme).__name__}")

    fields: dict = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "fmt":
            key, value = "elem", _element_format(config, value)
        elif key == "scale_mode":
            value = ScaleMode(value) if isinstance(value, str) else value
        elif key == "four_over_six_error":
            value = ErrorMetric(value) if isinstance(value, str) else value
        elif key == "block":
            value = (1, value) if isinstance(value, int) else tuple(value)
        if not hasattr(config, key):
            raise ValueError(f"scheme {config.name!r} has no option {key!r}")
        fields[key] = value
    return replace(config, **fields) if fields else config
