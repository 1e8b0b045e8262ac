"""Quantized training layers: ``QuantLinear``, model conversion, QAT, and the run-time state helpers.

    model = fourbit.nn.convert(model, "nvfp4")       # swap nn.Linear -> QuantLinear in place, returns the model
    print(fourbit.nn.report(model))                  # what became of each Linear, and why
    for step in range(total):
        fourbit.nn.set_progress(model, step / total)  # only recipes with switch_to_bf16_at need it
        ...
    ckpt["rng"] = fourbit.nn.rng_state(model)         # stochastic-rounding counters, with the checkpoint
    fourbit.nn.use_device_seeds(model)                # counters on the GPU, for CUDA-graph capture
"""

from .convert import (
    ConversionReport,
    LayerReport,
    PlannedLayer,
    convert,
    find_blocks,
    never_quantized,
    plan_linears,
    report,
    swap_linears,
    load_rng_state,
    quant_linears,
    rng_state,
    set_progress,
    set_data_parallel,
    set_recipe,
    use_device_seeds,
)
from .linear import DataParallel, QuantLinear
from .qat import QATLinear, fake_quantize, qat

__all__ = [
    "QuantLinear",
    "QATLinear",
    "ConversionReport",
    "LayerReport",
    "convert",
    "report",
    "find_blocks",
    "never_quantized",
    "plan_linears",
    "swap_linears",
    "PlannedLayer",
    "set_recipe",
    "set_progress",
    "set_data_parallel",
    "DataParallel",
    "rng_state",
    "load_rng_state",
    "quant_linears",
    "use_device_seeds",
    "qat",
    "fake_quantize",
]
