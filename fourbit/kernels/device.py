"""Which CUDA device a Triton launch goes to.

Triton launches on the *current* CUDA device, not on its arguments' device: a process that drives cuda:1
without ``torch.cuda.set_device`` would launch its kernels on cuda:0 and fail ("cannot be accessed from Triton",
"invalid resource handle"). Every public kernel entry point runs under ``on_operand_device``.
"""

from __future__ import annotations

import functools

import torch


def operand_device(args) -> torch.device | None:
    """The device of the first CUDA tensor among ``args`` (a ``QuantizedTensor`` counts by its codes)."""
    for a in args:
        t = getattr(a, "data", a)
        if isinstance(t, torch.Tensor) and t.is_cuda:
            return t.device
    return None


def on_operand_device(fn):
    """Run ``fn`` with its first CUDA operand's device current (no switch where it already is)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = operand_device(args)
        if dev is None or dev.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(dev):
            return fn(*args, **kwargs)

    return wrapper
