"""Fast kernels behind one dispatch point, bit-exact with the PyTorch reference.

``quantize(x, config, ...)`` returns a ``QuantizedTensor`` from a fused kernel, or ``None`` when no kernel
covers the case (then ``fourbit.quantize`` runs the reference). ``backend="triton"`` insists on a kernel and
raises where none can run (e.g. a CPU tensor).
"""

from __future__ import annotations

import torch


def triton_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def quantize(x, config, *, rounding, seed, amax, pad, backend):
    if backend == "triton" and not x.is_cuda:
        raise ValueError(f"backend='triton' needs a CUDA tensor, got one on {x.device}; use backend='reference'")
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs CUDA and the triton package")
    if backend == "triton":
        raise NotImplementedError(f"no triton kernel for {config.name} yet")
    return None
