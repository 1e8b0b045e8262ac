"""fourbit: 4-bit and 8-bit floating point for AI (NVFP4, MXFP4/MXFP8, FP8), exact on CPU, fast on GPU.

    q = fourbit.quantize(x, "nvfp4")                        # formats and block-scaled quantization
    fourbit.convert(model, fourbit.recipes.nvfp4())         # train with quantized GEMMs
    fourbit.ptq(model, "nvfp4"); fourbit.export(model, "out/", layout="modelopt")   # deploy
"""

from . import export, ptq, quantize, recipes  # callable modules: fourbit.quantize(x) and fourbit.quantize.QuantizedTensor
from .accumulation import Accumulation
from .export import CheckpointError, load_quantized
from .formats import E2M1, E2M3, E3M2, E4M3, E5M2, E8M0, FloatFormat, Specials, get_format
from .hadamard import RHT, rht
from .nn import ConversionReport, QuantLinear, convert, load_rng_state, qat, rng_state, set_progress, set_recipe
from .packing import as_float4_x2, pack_fp4, unpack_fp4
from .ptq import QuantizedLinear
from .qtensor import QuantizedTensor
from .recipes import Recipe, get_recipe
from .rounding import Rounding
from .schemes import ErrorMetric, FP8Config, MXConfig, NVFP4Config, ScaleMode, resolve_scheme

__version__ = "0.1.0"

__all__ = [
    # formats
    "FloatFormat", "Specials", "get_format", "E2M1", "E2M3", "E3M2", "E4M3", "E5M2", "E8M0",
    # quantization
    "quantize", "QuantizedTensor", "NVFP4Config", "MXConfig", "FP8Config", "ScaleMode", "ErrorMetric",
    "Rounding", "resolve_scheme", "RHT", "rht", "pack_fp4", "unpack_fp4", "as_float4_x2",
    # training
    "recipes", "Recipe", "get_recipe", "QuantLinear", "convert", "set_recipe", "set_progress", "qat",
    "rng_state", "load_rng_state", "ConversionReport", "Accumulation",
    # deployment
    "ptq", "QuantizedLinear", "export", "load_quantized", "CheckpointError",
]  # fmt: skip
