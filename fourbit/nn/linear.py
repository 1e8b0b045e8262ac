"""``QuantLinear``: ``nn.Linear`` whose three GEMMs run on quantized operands, per a ``Recipe``.

The math (which operand is quantized how, for fprop, dgrad and wgrad) lives in ``fourbit.nn.functional``,
as the custom op pair ``fourbit::linear_forward`` / ``fourbit::linear_backward``; this module holds the
layer's state around it:

    recipe    the recipe, and the one in effect now (``progress`` applies its late switch to BF16)
    step      the stochastic-rounding step: a one-element int64 buffer on the weight's device, advanced by
              every training forward (``module.training`` and grad enabled), saved by ``fourbit.nn.rng_state``
    parallel  ``DataParallel`` for amax reductions and global SR indices (``fourbit.nn.set_data_parallel``)

A layer whose recipe quantizes nothing (``bf16``, or after a full late switch) is exactly ``F.linear``.
Master weights, their gradients and the optimizer state stay in the parameters' dtype. Under autocast the
input is cast to the autocast dtype before quantization (as ``nn.Linear`` would cast it) and the output
has that dtype; with a bias, the bias is added to the float32 GEMM result before the one rounding.

``torch.compile(model, fullgraph=True)`` traces the layer whole: the op is opaque with an exact fake
implementation, the recipe reaches it as a constant key and the step as a tensor, so a compiled step
does not recompile as training advances (only once at a late switch, whose GEMMs differ) and stays valid
under CUDA graphs (``mode="reduce-overhead"``). Every forward with grad enabled in training mode advances
the step: micro-batches of gradient accumulation get distinct seeds, and activation checkpointing's
recomputed forward advances it once more (still deterministic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..recipes import Recipe, get_recipe
from .functional import (  # noqa: F401  (re-exported: the seeding and operand helpers predate functional.py)
    DataParallel,
    Role,
    derive_seed,
    parallel_key,
    quantize_operand,
    quantize_weight,
    recipe_key,
    seed_base,
    linear_forward,
    wgrad_inputs,
)

__all__ = [
    "QuantLinear",
    "Role",
    "DataParallel",
    "derive_seed",
    "seed_base",
    "quantize_operand",
    "quantize_weight",
    "wgrad_inputs",
    "check_features",
]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class QuantLinear(nn.Linear):
    """``nn.Linear`` with quantized Fprop, Dgrad and Wgrad GEMMs per ``recipe`` (same parameters and keys).

    recipe    a ``Recipe`` or a name from ``fourbit.recipes.RECIPES``
    layer_id  part of the stochastic-rounding seed (``fourbit.nn.convert`` numbers the linears of a model)
    step      training forwards so far (advanced automatically; saved by ``fourbit.nn.rng_state``), held in
              device memory with the weight (reading it from a CUDA counter syncs)
    progress  training progress in [0, 1] for the recipe's late switch (``fourbit.nn.set_progress``)
    parallel  ``DataParallel`` for amax reductions and global SR indices (``fourbit.nn.set_data_parallel``)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        recipe: Recipe | str = "nvfp4",
        layer_id: int = 0,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        # the SR step: a buffer (moves with .to(), a static input to CUDA graphs), not in the state dict
        self.register_buffer("_counter", torch.zeros(1, dtype=torch.int64, device=self.weight.device), persistent=False)
        self.layer_id = layer_id
        self._progress: float | None = None
        self._parallel: DataParallel | None = None
        self._parallel_key = 0
        self.recipe = recipe

    @property
    def step(self) -> int:
        """Training forwards so far (reading it from a CUDA counter syncs)."""
        return int(self._counter.reshape(()).item())

    @step.setter
    def step(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"QuantLinear.step must be a non-negative int, got {value!r}")
        self._counter.fill_(value)

    @property
    def recipe(self) -> Recipe:
        return self._recipe

    @recipe.setter
    def recipe(self, recipe: Recipe | str) -> None:
        recipe = get_recipe(recipe)
        check_features(recipe, self.in_features, self.out_features, type(self).__name__)
        self._recipe = recipe
        self._activate()

    @property
    def progress(self) -> float | None:
        """Training progress in [0, 1] for the recipe's late switch (``fourbit.nn.set_progress``)."""
        return self._progress

    @progress.setter
    def progress(self, value: float | None) -> None:
        self._progress = value
        self._activate()

    @property
    def parallel(self) -> DataParallel | None:
        return self._parallel

    @parallel.setter
    def parallel(self, value: DataParallel | None) -> None:
        self._parallel = value
        self._parallel_key = parallel_key(value)

    def _activate(self) -> None:
        """Cache what forward reads: the recipe in effect, its op key, whether it quantizes anything. A
        compiled forward guards on these (they change only at the late switch), not on ``progress``."""
        active = self._recipe.at(self._progress)
        if getattr(self, "_active", None) != active:  # (after the switch, at() builds an equal recipe each call)
            self._active = active
            self._active_key = recipe_key(active)
            self._active_quantized = active.quantized

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe | str, *, layer_id: int = 0) -> "QuantLinear":
        """A QuantLinear sharing ``linear``'s Parameter objects (optimizer state stays valid)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                recipe=recipe, layer_id=layer_id)
        q.weight = linear.weight
        q.bias = linear.bias
        q._counter = torch.zeros(1, dtype=torch.int64, device=linear.weight.device)
        q.train(linear.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # this forward's step (saved for its backward); every training forward advances the counter, whatever
        # the recipe, so the SR stream never depends on the late switch
        step = ops.advance_step(self._counter, self.training and torch.is_grad_enabled())
        if not self._active_quantized or x.numel() == 0:  # no tokens: nothing to quantize, every grad is exactly 0
            return F.linear(x, self.weight, self.bias)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input's last dim is {x.shape[-1]}, expected in_features={self.in_features}")
        device_type = x.device.type
        out_dtype = _autocast_dtype(device_type) or x.dtype
        x2 = x.to(out_dtype).reshape(-1, self.in_features)  # (M, K)
        # the GEMM rounds its float32 result to out_dtype once; with a bias, the bias is added in float32 first
        gemm_dtype = out_dtype if self.bias is None else torch.float32
        with torch.autocast(device_type, enabled=False):
            y = linear_forward(x2, self.weight, step, self._active_key, self.layer_id, self._parallel_key, gemm_dtype)
            if self.bias is not None:
                y = y + self.bias.float()
        return y.to(out_dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}, layer_id={self.layer_id}"


def check_features(recipe: Recipe, in_features: int, out_features: int, name: str) -> None:
    """ValueError naming the layer if its features are not multiples of the recipe's block dims."""
    mult = recipe.feature_multiple()
    if in_features % mult or out_features % mult:
        raise ValueError(
            f"{name}: in_features={in_features}, out_features={out_features} are not multiples of {mult}, "
            f"the block size of recipe {recipe.name!r}"
        )
