"""The three quantized GEMMs of a linear layer as one custom op pair: ``fourbit::linear_forward`` and
``fourbit::linear_backward``, joined by ``torch.library.register_autograd``.

With x flattened to (M, K) (M tokens, all leading dims), W (N, K) and dy (M, N):

    Fprop   y  = Q(x) Q(W)^T            A = x     (M, K)   B = W     (N, K)    reduce over K -> (M, N)
    Dgrad   dx = Q(dy) Q(W^T)^T         A = dy    (M, N)   B = W^T   (K, N)    reduce over N -> (M, K)
    Wgrad   dW = Q(H dy)^T Q(H x)       A = dy^T  (N, M)   B = x^T   (K, M)    reduce over M -> (N, K)

            x ──Q──┐                    dy ──Q──┐                  dy^T ─H─Q──┐
                   ├─ fprop ─> y                ├─ dgrad ─> dx                ├─ wgrad ─> dW
            W ──Q──┘           W^T ──Q(=Q(W)^T for 16x16)─┘       x^T ─H─Q──┘

each operand quantized along that GEMM's reduction dim (``fourbit.gemm.qmm`` takes both as (rows, K)), with
the recipe's scheme, rounding and Hadamard transform ``H`` (wgrad only, along the token dim M, which is
zero-padded to a multiple of 16 and of the block size: zero rows add nothing to a reduction and do not
change any amax, so padding is exact). With square 2D weight blocks (NVFP4's 16x16, FP8's 128x128) or a
per-tensor weight scale, fprop and dgrad see the same quantized weight (dgrad takes the transpose of
fprop's quantization); with 1x16 blocks along each reduction dim they see different ones.

Emulation: the quantized operands are dequantized and multiplied with float32 accumulation (or the
recipe's ``Accumulation`` model), and the result is rounded once to the output dtype. On CUDA with
all-NVFP4 recipes each operand is quantized by one kernel straight to the BF16 values the emulated GEMM
multiplies (``ops.Dequantized``, ``_emulates``): the same numbers, two passes fewer per operand.

Why custom ops: ``torch.compile`` sees each layer as two ops with exact fake (meta) implementations and
fuses everything around them (norms, activations, residuals, the optimizer); it does not trace into
quantization, whose kernels are already fused. A custom op takes no Python objects, so the recipe and the
data-parallel group travel as keys (``recipe_key``, ``parallel_key``), and the stochastic-rounding step as
a one-element int64 tensor: a compiled graph then holds constants that never change between steps (no
recompilation) and reads the step from memory (valid inside CUDA graphs).

Stochastic rounding is seeded per (recipe seed, layer id, step, role) by ``derive_seed``. On CPU the op
reads the step back to the host; on CUDA one small kernel (``ops.seed_keys``) computes the six roles' keys
from the step in device memory and the quantize kernels read them there (the same keys, so the same bits).

Data parallel (``fourbit.nn.set_data_parallel``): with the global batch split evenly over ranks, each
per-tensor amax of an activation or gradient operand (NVFP4's tensor scale, per-tensor FP8) is all-reduced
(max) over the ranks, and stochastic rounding indexes each element by its position in the global batch
(``ElementIndex``), so every rank quantizes its shard exactly as a single process quantizes the whole
batch. The gradient a rank sees is ``world_size`` times the single-process one (its loss averages fewer
tokens); for a power-of-two world size that scales every NVFP4/FP8/MX scale by an exact power of two and
leaves the codes unchanged, and DDP/FSDP's gradient averaging divides it back out. Equality with a single
process then holds up to float32 summation order, provided the local token count is a multiple of the
wgrad token padding (16 for NVFP4).
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..gemm import qmm, transpose
from ..hadamard import RHT, RHT_SIZE, rht
from ..qtensor import QuantizedTensor
from ..recipes import OperandQuant, Recipe
from ..rounding import ElementIndex, Rounding, derive_seed, seed_base
from ..schemes import FP8Config, NVFP4Config

__all__ = [
    "Role",
    "DataParallel",
    "derive_seed",
    "seed_base",
    "quantize_operand",
    "quantize_weight",
    "shares_weight",
    "wgrad_inputs",
    "recipe_key",
    "parallel_key",
    "quantized_linear",
]

class Role(enum.IntEnum):
    """Which operand of which GEMM a stochastic-rounding seed is for (part of the seed mix)."""

    FPROP_X = 0
    FPROP_W = 1
    DGRAD_DY = 2
    DGRAD_W = 3
    WGRAD_DY = 4
    WGRAD_X = 5


def operand_seed(seed: int, layer_id: int, step: "int | torch.Tensor", role: Role | int) -> "int | torch.Tensor":
    """``derive_seed``; or, on CUDA (``step`` is the layer's int32 keys from ``ops.seed_keys``), the role's
    key in device memory, which the kernels read as they run (``kernels.tl_formats.sr_args``)."""
    if isinstance(step, torch.Tensor):
        return step[int(role)]
    return derive_seed(seed, layer_id, step, role)


@dataclass(frozen=True, eq=False)
class DataParallel:
    """This process's place among ``world_size`` data-parallel ranks, each holding an equal shard of the batch.

    ``group`` is the process group the per-tensor amaxes are all-reduced over (a dedicated one, so these
    small reductions never interleave with DDP's or FSDP's gradient collectives on the same group).
    """

    group: Any
    rank: int
    world_size: int


def _has_tensor_scale(op: OperandQuant) -> bool:
    """Operands whose scale depends on the whole tensor's amax (which data parallelism must all-reduce)."""
    return isinstance(op.scheme, NVFP4Config) or (isinstance(op.scheme, FP8Config) and op.scheme.block is None)


def _global_amax(t: torch.Tensor, parallel: DataParallel) -> torch.Tensor:
    amax = t.detach().abs().amax().float() if t.numel() else torch.zeros((), device=t.device)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=parallel.group)
    return amax


def quantize_operand(
    t: torch.Tensor,
    op: OperandQuant,
    *,
    seed: int | None = None,
    parallel: DataParallel | None = None,
    sr_index: ElementIndex | None = None,
    dequantized: bool = False,
) -> QuantizedTensor | torch.Tensor:
    """Quantize a GEMM operand (rows, reduction) along its last dim per ``op``; unquantized if no scheme.

    ``op.rht`` is not applied here: ``wgrad_inputs`` transforms both wgrad operands together. The caller
    pads the reduction dim where it may not divide (the wgrad token dim); ``quantize`` zero-pads rows for
    2D blocks. Non-finite inputs propagate as NaN instead of raising, as they would through ``nn.Linear``.
    With ``parallel`` a per-tensor amax is all-reduced over the ranks; ``sr_index`` places the operand in
    the global batch for stochastic rounding. ``dequantized`` (where ``_emulates`` allows it): the same
    quantization as a ``fourbit.kernels.Dequantized`` operand, for ``kernels.dequantized_mm``.
    """
    if op.scheme is None:
        return t
    stochastic = op.rounding is Rounding.STOCHASTIC
    if stochastic and seed is None:
        raise ValueError("quantize_operand: stochastic rounding needs a seed")
    amax = _global_amax(t, parallel) if parallel is not None and _has_tensor_scale(op) else None
    if dequantized:
        return ops.quantize_dequantized(t, op.scheme, stochastic=stochastic, seed=seed, amax=amax,
                                        sr_index=sr_index if stochastic else None)  # fmt: skip
    key = seed if isinstance(seed, torch.Tensor) else None
    return ops.quantize(t, op.scheme, stochastic=stochastic, seed=0 if key is not None or seed is None else seed,
                        key=key, amax=amax, sr_index=sr_index if stochastic else None)  # fmt: skip


def shares_weight(recipe: Recipe) -> bool:
    """Fprop and dgrad can use one quantized W: same RNE config, square 2D blocks or one scale per tensor."""
    f, d = recipe.fprop.b, recipe.dgrad.b
    if f != d or f.scheme is None or f.rounding is not Rounding.NEAREST or f.rht:
        return False
    block = f.scheme.block
    return block is None or block[0] == block[1]


def quantize_weight(
    w: torch.Tensor, recipe: Recipe, *, layer_id: int = 0, step: int | torch.Tensor = 0, dgrad: bool = True,
    dequantized: bool = False
) -> tuple[QuantizedTensor | torch.Tensor, QuantizedTensor | torch.Tensor | None]:
    """(W as fprop's B operand (N, K), W^T as dgrad's B operand (K, N) or None if ``dgrad`` is False)."""
    def seed(role):
        return operand_seed(recipe.seed, layer_id, step, role)

    w_f = quantize_operand(w, recipe.fprop.b, seed=seed(Role.FPROP_W), dequantized=dequantized)
    if not dgrad:
        return w_f, None
    if shares_weight(recipe):
        return w_f, w_f.t() if dequantized else transpose(w_f)
    return w_f, quantize_operand(w.T, recipe.dgrad.b, seed=seed(Role.DGRAD_W), dequantized=dequantized)


def _emulates(recipe: Recipe, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the three GEMMs run on ``fourbit.kernels.Dequantized`` operands: each operand quantized by one
    kernel straight to the BF16 values the emulated NVFP4 GEMM multiplies (no packed codes, no dequantize
    pass, W^T a view of fprop's W for 16x16 blocks), the same numbers as quantize, dequantize, GEMM.
    Needs CUDA and triton, every operand NVFP4 (wgrad's 1x16), float32 accumulation, and each GEMM's
    reduction dim (K, N, tokens padded to 16) a multiple of the BF16 GEMM's K step."""
    if recipe.accumulation is not None or not ops.dequantized_applies(x, recipe.fprop.a.scheme):
        return False
    operands = [op for g in (recipe.fprop, recipe.dgrad, recipe.wgrad) for op in (g.a, g.b)]
    if not all(isinstance(op.scheme, NVFP4Config) and not op.scheme.four_over_six for op in operands):
        return False
    if recipe.wgrad.a.scheme.block != (1, 16) or recipe.wgrad.b.scheme.block != (1, 16):
        return False
    M, K = x.shape
    return all(d % ops.DEQUANTIZED_K_ALIGN == 0 for d in (K, weight.shape[0], M + (-M) % RHT_SIZE))


def _mm(a, b, recipe: Recipe, out_dtype: torch.dtype) -> torch.Tensor:
    """``A @ B^T`` of two operands from ``quantize_operand``: ``Dequantized`` ones on the BF16 GEMM, else ``qmm``."""
    if isinstance(a, ops.Dequantized):
        return ops.dequantized_mm(a, b, out_dtype)  # _emulates checked that K suits it
    return qmm(a, b, accumulation=recipe.accumulation, out_dtype=out_dtype)


def token_multiple(recipe: Recipe) -> int:
    """Wgrad reduces over tokens: pad M to a multiple of every wgrad block width (and 16 for the RHT)."""
    dims = [1]
    for op in (recipe.wgrad.a, recipe.wgrad.b):
        if op.scheme is not None and op.scheme.block is not None:
            dims.append(op.scheme.block[1])
        if op.rht:
            dims.append(RHT_SIZE)
    return math.lcm(*dims)


def wgrad_inputs(dy: torch.Tensor, x: torch.Tensor, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Wgrad's operands before quantization: dy^T (N, M') and x^T (K, M'), M zero-padded to M'.

    Transposed, padded and, where the recipe says so, Hadamard-transformed along M' (float32, or float64
    for float64 inputs); ``a @ b.T == dy.T @ x`` in exact arithmetic.
    """
    pad = (-dy.shape[0]) % token_multiple(recipe)
    a, b = dy.T, x.T  # (N, M), (K, M)
    if pad:
        a, b = F.pad(a, (0, pad)), F.pad(b, (0, pad))
    if recipe.wgrad.a.rht:  # GemmQuant guarantees both operands or neither
        transform = RHT(RHT_SIZE, recipe.rht_seed)
        a, b = rht(a, -1, transform=transform), rht(b, -1, transform=transform)
    return a, b


def _wgrad_operand(t, op: OperandQuant, role: Role, recipe: Recipe, seed, parallel: DataParallel | None,
                   dequantized: bool = False):  # fmt: skip
    """Q(rht(pad(t^T))) for wgrad from one fused kernel (``fourbit.kernels.quantize_wgrad``: transpose, token
    padding, RHT and quantization, bit-exact with ``wgrad_inputs`` + ``quantize_operand``), or None where
    that kernel does not cover the operand (then the caller takes the reference chain). ``dequantized``:
    as a ``fourbit.kernels.Dequantized`` operand."""
    if token_multiple(recipe) != RHT_SIZE or not isinstance(op.scheme, NVFP4Config):
        return None
    transform = RHT(RHT_SIZE, recipe.rht_seed) if op.rht else None
    if not ops.wgrad_applies(t, op.scheme, transform):
        return None
    amax = None
    if parallel is not None:
        amax = ops.wgrad_amax(t, transform)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=parallel.group)
    stochastic = op.rounding is Rounding.STOCHASTIC
    index = _tokens_index(t.shape[0] + (-t.shape[0]) % RHT_SIZE, parallel)
    return ops.quantize_wgrad(t, op.scheme, stochastic=stochastic, seed=seed(role) if stochastic else None,
                              transform=transform, amax=amax, sr_index=index if stochastic else None,
                              dequantized=dequantized)  # fmt: skip


def _rows_index(t: torch.Tensor, parallel: DataParallel | None) -> ElementIndex | None:
    """A (tokens, features) shard: its rows start at rank * tokens in the global batch."""
    if parallel is None:
        return None
    return ElementIndex(row_offset=parallel.rank * t.shape[0])


def _tokens_index(tokens: int, parallel: DataParallel | None) -> ElementIndex | None:
    """A (features, tokens) shard (wgrad's transposed operands, ``tokens`` padded): columns offset, global
    row length."""
    if parallel is None:
        return None
    return ElementIndex(col_offset=parallel.rank * tokens, row_stride=parallel.world_size * tokens)



# --- keys for what the op cannot take ----------------------------------------------------------------

_RECIPES: dict[str, Recipe] = {}
_PARALLELS: dict[int, DataParallel] = {}


def recipe_key(recipe: Recipe) -> str:
    """A string naming ``recipe`` by content (the same recipe, the same key), registered for the op."""
    key = f"{recipe.name}:{hashlib.sha1(repr(recipe).encode()).hexdigest()[:12]}"
    _RECIPES.setdefault(key, recipe)
    return key


def parallel_key(parallel: DataParallel | None) -> int:
    """0 for a single process, else an int naming ``parallel`` (held here for the life of the process)."""
    if parallel is None:
        return 0
    _PARALLELS[id(parallel)] = parallel
    return id(parallel)


def _recipe(key: str) -> Recipe:
    try:
        return _RECIPES[key]
    except KeyError:
        raise ValueError(f"unknown recipe key {key!r} (made by fourbit.nn.functional.recipe_key?)") from None


def _step_arg(step: Tensor, recipe: Recipe, layer_id: int) -> "int | Tensor":
    """The step as the seeding functions take it: the six roles' keys in device memory on CUDA (no host
    read, valid in a CUDA graph), a host int elsewhere; 0 when nothing is stochastically rounded."""
    if not recipe.stochastic:
        return 0
    if step.is_cuda and ops.device_seeds_available():
        return ops.seed_keys(step, seed_base(recipe.seed, layer_id))
    return int(step.reshape(()).item())


# --- the three GEMMs ------------------------------------------------------------------------------------


def _forward(x: Tensor, weight: Tensor, recipe: Recipe, layer_id: int, step, parallel, out_dtype) -> Tensor:
    """Fprop: y (M, N) = Q(x) (M, K) @ Q(W)^T, rounded once to ``out_dtype``."""
    fast = _emulates(recipe, x, weight)
    qx = quantize_operand(x, recipe.fprop.a, seed=operand_seed(recipe.seed, layer_id, step, Role.FPROP_X),
                          parallel=parallel, sr_index=_rows_index(x, parallel), dequantized=fast)  # fmt: skip
    qw, _ = quantize_weight(weight, recipe, layer_id=layer_id, step=step, dgrad=False, dequantized=fast)
    return _mm(qx, qw, recipe, out_dtype)


def _backward(dy, x, weight, recipe: Recipe, layer_id: int, step, parallel, need_dx: bool, need_dw: bool):
    """(dx (M, K) in x's dtype or None, dW (N, K) in W's dtype or None)."""
    fast = _emulates(recipe, x, weight)

    def seed(role):
        return operand_seed(recipe.seed, layer_id, step, role)

    dx = dw = None
    if need_dx:
        # Dgrad: dx (M, K) = dy (M, N) @ W (N, K), reduction over N
        qdy = quantize_operand(dy, recipe.dgrad.a, seed=seed(Role.DGRAD_DY), parallel=parallel,
                               sr_index=_rows_index(dy, parallel), dequantized=fast)  # fmt: skip
        if shares_weight(recipe):  # the transpose of fprop's quantized W (RNE: the same numbers again)
            _, qw_t = quantize_weight(weight, recipe, layer_id=layer_id, step=step, dequantized=fast)
        else:
            qw_t = quantize_operand(weight.T, recipe.dgrad.b, seed=seed(Role.DGRAD_W), dequantized=fast)  # (K, N)
        dx = _mm(qdy, qw_t, recipe, x.dtype)
    if need_dw:
        # Wgrad: dW (N, K) = dy^T (N, M') @ x (M', K), reduction over tokens; each operand from the fused
        # wgrad kernel where it applies, else both through the reference chain
        qa = _wgrad_operand(dy, recipe.wgrad.a, Role.WGRAD_DY, recipe, seed, parallel, fast)
        qb = _wgrad_operand(x, recipe.wgrad.b, Role.WGRAD_X, recipe, seed, parallel, fast)
        if qa is None or qb is None:
            a, b = wgrad_inputs(dy, x, recipe)  # transposed, padded, RHT'd
            index = _tokens_index(a.shape[1], parallel)
            qa = quantize_operand(a, recipe.wgrad.a, seed=seed(Role.WGRAD_DY), parallel=parallel, sr_index=index)
            qb = quantize_operand(b, recipe.wgrad.b, seed=seed(Role.WGRAD_X), parallel=parallel, sr_index=index)
        dw = _mm(qa, qb, recipe, weight.dtype)
    return dx, dw


@torch.library.custom_op("fourbit::linear_forward", mutates_args=())
def linear_forward(x: Tensor, weight: Tensor, step: Tensor, recipe: str, layer_id: int, parallel: int,
                   out_dtype: torch.dtype) -> Tensor:  # fmt: skip
    """y (M, N) = Q(x) Q(W)^T for x (M, K), W (N, K) under the recipe named by ``recipe`` (``recipe_key``);
    ``step`` (int64, one element) seeds stochastic rounding; ``parallel`` is a ``parallel_key``."""
    r = _recipe(recipe)
    with torch.autocast(x.device.type, enabled=False):  # the recipe decides every precision in here
        return _forward(x, weight, r, layer_id, _step_arg(step, r, layer_id), _PARALLELS.get(parallel), out_dtype)


@linear_forward.register_fake
def _linear_forward_fake(x, weight, step, recipe, layer_id, parallel, out_dtype):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("fourbit::linear_backward", mutates_args=())
def linear_backward(dy: Tensor, x: Tensor, weight: Tensor, step: Tensor, recipe: str, layer_id: int, parallel: int,
                    need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(dx, dW) of ``linear_forward`` for the output gradient dy (M, N); an empty tensor where not needed."""
    r = _recipe(recipe)
    # a backward called inside an autocast region runs there on CPU: the recipe decides every precision
    with torch.autocast(x.device.type, enabled=False):
        dx, dw = _backward(dy, x, weight, r, layer_id, _step_arg(step, r, layer_id), _PARALLELS.get(parallel),
                           need_dx, need_dw)  # fmt: skip
    return (x.new_empty(0) if dx is None else dx), (weight.new_empty(0) if dw is None else dw)


@linear_backward.register_fake
def _linear_backward_fake(dy, x, weight, step, recipe, layer_id, parallel, need_dx, need_dw):
    return (torch.empty_like(x) if need_dx else x.new_empty(0)), (torch.empty_like(weight) if need_dw else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, step, recipe, layer_id, parallel, _ = inputs
    ctx.save_for_backward(x, weight, step)
    ctx.args = (recipe, layer_id, parallel)


def _linear_autograd(ctx, dy):
    x, weight, step = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = linear_backward(dy, x, weight, step, *ctx.args, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None, None, None


torch.library.register_autograd("fourbit::linear_forward", _linear_autograd, setup_context=_setup_context)


def quantized_linear(x: Tensor, weight: Tensor, recipe: Recipe, *, step: Tensor, layer_id: int = 0,
                     parallel: DataParallel | None = None, out_dtype: torch.dtype | None = None) -> Tensor:  # fmt: skip
    """``x @ W^T`` for x (M, K) and W (N, K) with the three GEMMs quantized per ``recipe``; differentiable.

    ``step`` is a one-element int64 tensor on W's device (the stochastic-rounding step of this forward)."""
    return linear_forward(x, weight, step, recipe_key(recipe), layer_id, parallel_key(parallel), out_dtype or x.dtype)
