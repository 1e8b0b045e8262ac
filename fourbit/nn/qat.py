"""Quantization-aware training: fake quantization with a straight-through gradient.

``qat(model, scheme)`` swaps each ``nn.Linear`` (except those ``convert`` never quantizes: tied or LM-head
projections, ``nn.MultiheadAttention``'s ``out_proj``; and the user's ``skip``) for a ``QATLinear`` that
sees its weight, and optionally its input, as it would be after 4-bit deployment:

    fq(t) = t + stopgrad(Q(t).dequantize() - t)        forward: Q(t)      backward: identity (STE)
    y     = fq(x) fq(W)^T + b                          x and W quantized along K (the deployment layout)

so fine-tuning moves the high-precision master weights toward values that survive quantization, while
the optimizer still sees full-precision gradients. Parameters and ``state_dict`` keys are unchanged.

    model = fourbit.nn.qat(model, "nvfp4")     # returns the model, as convert does
    print(fourbit.nn.report(model))            # the QATLinear / kept table

The swap is ``convert``'s (``plan_linears`` + ``swap_linears``): the same layers are never quantized, a
bare Linear comes back as a new ``QATLinear``, and a qat that fake-quantizes nothing warns.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..quantize import quantize
from ..schemes import SchemeConfig, resolve_scheme
from .convert import ROOT, announce, check_swap_args, plan_linears, swap_linears

__all__ = ["QATLinear", "fake_quantize", "qat"]


def fake_quantize(t: torch.Tensor, scheme: SchemeConfig) -> torch.Tensor:
    """Quantize-dequantize along the last dim with a straight-through gradient (same dtype as ``t``)."""
    t_hat = quantize(t.detach(), scheme, pad=True, check_finite=False).dequantize(t.dtype)
    return t + (t_hat - t).detach()


class QATLinear(nn.Linear):
    """``nn.Linear`` whose weight (and, with ``activations``, input) is fake-quantized in the forward."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 scheme: str | SchemeConfig = "nvfp4", activations: bool = False) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.scheme = resolve_scheme(scheme)
        self.activations = bool(activations)
        _check_qat_features(self.scheme, in_features, out_features, type(self).__name__)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme, *, activations: bool = False) -> "QATLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                scheme=scheme, activations=activations)
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quantize(self.weight, self.scheme)  # (N, K), blocks along K
        if self.activations:
            x = fake_quantize(x, self.scheme)  # (*, K)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme.name}, activations={self.activations}"


def _check_qat_features(scheme: SchemeConfig, in_features: int, out_features: int, name: str) -> None:
    block = scheme.block or (1, 1)
    if in_features % block[1] or out_features % block[0]:
        raise ValueError(
            f"{name}: in_features={in_features}, out_features={out_features} do not fit {scheme.name} "
            f"blocks {block} (in_features must be a multiple of {block[1]}, out_features of {block[0]})"
        )


def qat(
    model: nn.Module,
    scheme: str | SchemeConfig,
    *,
    activations: bool = False,
    skip: Callable[[str, nn.Module], bool] | None = None,
    on_mismatch: str = "raise",
) -> nn.Module:
    """Insert fake quantization into the model's Linears in place and return the model (the new
    ``QATLinear`` for a bare Linear); ``fourbit.nn.report(model)`` gives what became of each."""
    check_swap_args("qat", model, skip, on_mismatch)
    config = resolve_scheme(scheme)

    def check(name: str, m: nn.Linear) -> None:
        _check_qat_features(config, m.in_features, m.out_features, f"module {name or ROOT!r}")

    plan = plan_linears(model, skip=skip, check=check, on_mismatch=on_mismatch, fn="qat")
    make = lambda p: QATLinear.from_linear(p.module, config, activations=activations)  # noqa: E731
    model, rep = swap_linears(model, plan, make, f"qat {config.name}")
    announce(rep, "qat")
    return model
