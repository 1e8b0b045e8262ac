"""fourbit: 4-bit and 8-bit floating point for AI (NVFP4, MXFP4/MXFP8, FP8), exact on CPU, fast on GPU."""

from .formats import E2M1, E2M3, E3M2, E4M3, E5M2, E8M0, FloatFormat, Specials, get_format
from .hadamard import RHT, rht
from .packing import as_float4_x2, pack_fp4, unpack_fp4
from .quantize import QuantizedTensor, quantize
from .rounding import Rounding
from .schemes import ErrorMetric, FP8Config, MXConfig, NVFP4Config, ScaleMode, resolve_scheme

__version__ = "0.1.0"

__all__ = [
    "E2M1", "E2M3", "E3M2", "E4M3", "E5M2", "E8M0", "FloatFormat", "Specials", "get_format",
    "RHT", "rht", "pack_fp4", "unpack_fp4", "as_float4_x2", "QuantizedTensor", "quantize", "Rounding",
    "ErrorMetric", "FP8Config", "MXConfig", "NVFP4Config", "ScaleMode", "resolve_scheme",
]
