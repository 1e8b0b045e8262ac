"""``QuantLinear``: ``nn.Linear`` whose three GEMMs run on quantized operands, per a ``Recipe``.

With x flattened to (M, K) (M tokens, all leading dims), W (N, K) and dy (M, N), one custom autograd
function runs

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
per-tensor weight scale, W is quantized once in fprop and its transpose reused by dgrad, so both GEMMs see
the same quantized weight; with 1x16 blocks along each reduction dim they see different ones.

Emulation: the quantized operands are dequantized and multiplied with float32 accumulation (or the
recipe's ``Accumulation`` model), and the result is rounded once to the output dtype; with a bias, the
bias is added to the float32 result first. Master weights, their gradients and the
optimizer state stay in the parameters' dtype. Under autocast the input is cast to the autocast dtype
before quantization (as ``nn.Linear`` would cast it) and the output has that dtype. A recipe that quantizes
nothing (``bf16``) is exactly ``F.linear``.

On CUDA with all-NVFP4 recipes the GEMMs run on ``fourbit.kernels.Dequantized`` operands (``_emulates``).
With ``fourbit.kernels.DUAL_OPERANDS`` on, x's fprop and wgrad operands come from one ``quantize_dual``
call in forward (backward keeps Q(x^T) instead of x) and dy's dgrad and wgrad operands from one in
backward: the same numbers as the separate kernels, with one read and one amax pass fewer per tensor.

Data parallel (``fourbit.nn.set_data_parallel``): with the global batch split evenly over ranks, each
per-tensor amax of an activation or gradient operand (NVFP4's tensor scale, per-tensor FP8) is all-reduced
(max) over the ranks, and stochastic rounding indexes each element by its position in the global batch
(``ElementIndex``), so every rank quantizes its shard exactly as a single process quantizes the whole
batch. The gradient a rank sees is ``world_size`` times the single-process one (its loss averages fewer
tokens); for a power-of-two world size that scales every NVFP4/FP8/MX scale by an exact power of two and
leaves the codes unchanged, and DDP/FSDP's gradient averaging divides it back out. Equality with a single
process then holds up to float32 summation order, provided the local token count is a multiple of the
wgrad token padding (16 for NVFP4).

Stochastic rounding is seeded per (recipe seed, layer id, step, role) by ``derive_seed``: ``step`` counts
this layer's training forwards (``module.training`` and grad enabled) and is saved and restored with
``fourbit.nn.rng_state`` / ``load_rng_state``, so a resumed run continues the same random stream.
Every forward with grad enabled in training mode counts: micro-batches of gradient accumulation get
distinct seeds, and activation checkpointing's recomputed forward advances the counter once more
(still deterministic, but the backward then uses the recomputation's seeds). With
``fourbit.nn.use_device_seeds`` the counter lives in device memory and each forward computes its six keys
there (``kernels.seed_keys``, the same keys), so a CUDA graph of the training step draws new bits per replay.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..gemm import qmm, transpose
from ..hadamard import RHT, RHT_SIZE, rht
from ..quantize import QuantizedTensor, quantize
from ..recipes import OperandQuant, Recipe, get_recipe
from ..rounding import ElementIndex, Rounding
from ..schemes import FP8Config, NVFP4Config

__all__ = [
    "QuantLinear",
    "Role",
    "DataParallel",
    "derive_seed",
    "seed_base",
    "quantize_operand",
    "quantize_weight",
    "wgrad_inputs",
]

_M64 = (1 << 64) - 1


class Role(enum.IntEnum):
    """Which operand of which GEMM a stochastic-rounding seed is for (part of the seed mix)."""

    FPROP_X = 0
    FPROP_W = 1
    DGRAD_DY = 2
    DGRAD_W = 3
    WGRAD_DY = 4
    WGRAD_X = 5


def _splitmix64(z: int) -> int:
    """SplitMix64's finaliser (Steele et al. 2014): a bijective, well-mixed 64-bit integer hash."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def seed_base(seed: int, layer_id: int) -> int:
    """The step-independent part of a layer's seeds: ``h(h(seed) ^ layer)``."""
    return _splitmix64(_splitmix64(seed & _M64) ^ (layer_id & _M64))


def derive_seed(seed: int, layer_id: int, step: int, role: Role | int) -> int:
    """The stochastic-rounding seed of one operand: ``h(h(h(h(seed) ^ layer) ^ step) ^ role)`` in [0, 2^63)."""
    h = seed_base(seed, layer_id)
    for v in (step, int(role)):
        h = _splitmix64(h ^ (v & _M64))
    return h >> 1  # 63 bits: a non-negative int64 for kernels


def operand_seed(seed: int, layer_id: int, step: "int | torch.Tensor", role: Role | int) -> "int | torch.Tensor":
    """``derive_seed``; or, with device seeds (``step`` is the layer's int32 keys from ``kernels.seed_keys``),
    the role's key in device memory, which the kernels read as they run (``kernels.tl_formats.sr_args``)."""
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
        from .. import kernels

        q = kernels.quantize_dequantized(t, op.scheme, rounding=op.rounding, seed=seed if stochastic else None,
                                         amax=amax, sr_index=sr_index if stochastic else None)  # fmt: skip
        if q is None:
            raise RuntimeError(f"no dequantized-operand kernel for {op.scheme.name} on {t.device} {t.dtype}")
        return q
    return quantize(
        t,
        op.scheme,
        rounding=op.rounding,
        seed=seed if stochastic else None,
        amax=amax,
        sr_index=sr_index if stochastic else None,
        pad=True,
        check_finite=False,
    )


def _shares_weight(recipe: Recipe) -> bool:
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
    if _shares_weight(recipe):
        return w_f, w_f.t() if dequantized else transpose(w_f)
    return w_f, quantize_operand(w.T, recipe.dgrad.b, seed=seed(Role.DGRAD_W), dequantized=dequantized)


def _emulates(recipe: Recipe, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the three GEMMs run on ``fourbit.kernels.Dequantized`` operands: each operand quantized by one
    kernel straight to the BF16 values the emulated NVFP4 GEMM multiplies (no packed codes, no dequantize
    pass, W^T a view of fprop's W for 16x16 blocks), the same numbers as quantize, dequantize, GEMM.
    Needs CUDA and triton, every operand NVFP4 (wgrad's 1x16), float32 accumulation, and each GEMM's
    reduction dim (K, N, tokens padded to 16) a multiple of the BF16 GEMM's K step."""
    from .. import kernels

    if recipe.accumulation is not None or not kernels.dequantized_applies(x, recipe.fprop.a.scheme):
        return False
    ops = [op for g in (recipe.fprop, recipe.dgrad, recipe.wgrad) for op in (g.a, g.b)]
    if not all(isinstance(op.scheme, NVFP4Config) and not op.scheme.four_over_six for op in ops):
        return False
    if recipe.wgrad.a.scheme.block != (1, 16) or recipe.wgrad.b.scheme.block != (1, 16):
        return False
    from ..kernels.dequant_gemm import K_ALIGN

    M, K = x.shape
    return all(d % K_ALIGN == 0 for d in (K, weight.shape[0], M + (-M) % RHT_SIZE))


def _mm(a, b, recipe: Recipe, out_dtype: torch.dtype) -> torch.Tensor:
    """``A @ B^T`` of two operands from ``quantize_operand``: ``Dequantized`` ones on the BF16 GEMM, else ``qmm``."""
    from .. import kernels

    if isinstance(a, kernels.Dequantized):
        return kernels.dequantized_mm(a, b, out_dtype=out_dtype)  # _emulates checked that K suits it
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


class _QuantLinearFunction(torch.autograd.Function):
    """The three quantized GEMMs of a linear layer (see the module docstring). No bias: added outside."""

    @staticmethod
    def forward(ctx, x, weight, recipe: Recipe, layer_id: int, step: int, parallel, out_dtype: torch.dtype):
        # x (M, K), weight (N, K) -> y (M, N) in out_dtype; M is this rank's share of the tokens
        def seed(role):
            return operand_seed(recipe.seed, layer_id, step, role)

        fast = _emulates(recipe, x, weight)
        # x's fprop and wgrad operands from one kernel where it applies (wgrad then needs no copy of x)
        dual = _dual_operands(x, recipe.fprop.a, recipe.wgrad.b, recipe, seed(Role.FPROP_X), seed(Role.WGRAD_X),
                              parallel) if fast and ctx.needs_input_grad[1] else None  # fmt: skip
        if dual is not None:
            qx, qx_t = dual
        else:
            qx = quantize_operand(x, recipe.fprop.a, seed=seed(Role.FPROP_X), parallel=parallel,
                                  sr_index=_rows_index(x, parallel), dequantized=fast)  # fmt: skip
        share = _shares_weight(recipe) and ctx.needs_input_grad[0]
        qw, qw_t = quantize_weight(weight, recipe, layer_id=layer_id, step=step, dgrad=share, dequantized=fast)
        y = _mm(qx, qw, recipe, out_dtype)  # (M, N)
        if dual is not None:  # keep Q(x^T) (features, tokens'), not x
            ctx.save_for_backward(qx_t.values, weight, qx_t.tensor_scale)
        else:
            ctx.save_for_backward(x, weight)
        ctx.x_dual, ctx.x_dtype = dual is not None, x.dtype
        ctx.qw_t = qw_t  # dgrad's W^T when shared with fprop, else quantized in backward
        ctx.recipe, ctx.layer_id, ctx.step, ctx.parallel, ctx.fast = recipe, layer_id, step, parallel, fast
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        recipe, parallel = ctx.recipe, ctx.parallel
        if ctx.x_dual:  # forward kept Q(x^T) (features, tokens'), not x
            from ..kernels import Dequantized

            xt_values, weight, xt_scale = ctx.saved_tensors
            x, qx_t = None, Dequantized(xt_values, xt_scale, xt_values.shape[0])
        else:
            (x, weight), qx_t = ctx.saved_tensors, None  # (M, K), (N, K)

        def seed(role):
            return operand_seed(recipe.seed, ctx.layer_id, ctx.step, role)

        dx = dw = None
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # dy's dgrad and wgrad operands from one kernel, where both are needed and it applies
        dual = _dual_operands(dy, recipe.dgrad.a, recipe.wgrad.a, recipe, seed(Role.DGRAD_DY), seed(Role.WGRAD_DY),
                              parallel) if ctx.fast and need_dx and need_dw else None  # fmt: skip
        if need_dx:
            # Dgrad: dx (M, K) = dy (M, N) @ W (N, K), reduction over N
            if dual is not None:
                qdy = dual[0]
            else:
                qdy = quantize_operand(dy, recipe.dgrad.a, seed=seed(Role.DGRAD_DY), parallel=parallel,
                                       sr_index=_rows_index(dy, parallel), dequantized=ctx.fast)  # fmt: skip
            qw_t = ctx.qw_t
            if qw_t is None:
                qw_t = quantize_operand(weight.T, recipe.dgrad.b, seed=seed(Role.DGRAD_W), dequantized=ctx.fast)  # (K, N)
            dx = _mm(qdy, qw_t, recipe, ctx.x_dtype)
        if need_dw:
            # Wgrad: dW (N, K) = dy^T (N, M') @ x (M', K), reduction over tokens; each operand from the dual
            # kernel or the fused wgrad kernel, else both through the reference chain
            qa, qb = dual[1] if dual is not None else None, qx_t
            if qa is None:
                qa = _wgrad_operand(dy, recipe.wgrad.a, Role.WGRAD_DY, recipe, seed, parallel, ctx.fast)
            if qb is None:
                qb = _wgrad_operand(x, recipe.wgrad.b, Role.WGRAD_X, recipe, seed, parallel, ctx.fast)
            if qa is None or qb is None:
                if x is None:  # cannot happen: the dual kernel ran, so the wgrad kernel applies to dy as well
                    raise RuntimeError("QuantLinear: no wgrad kernel for dy although x took the dual kernel")
                a, b = wgrad_inputs(dy, x, recipe)  # transposed, padded, RHT'd
                index = _tokens_index(a.shape[1], parallel)
                qa = quantize_operand(a, recipe.wgrad.a, seed=seed(Role.WGRAD_DY), parallel=parallel, sr_index=index)
                qb = quantize_operand(b, recipe.wgrad.b, seed=seed(Role.WGRAD_X), parallel=parallel, sr_index=index)
            dw = _mm(qa, qb, recipe, weight.dtype)
        ctx.qw_t = None
        return dx, dw, None, None, None, None, None


def _wgrad_operand(t, op: OperandQuant, role: Role, recipe: Recipe, seed, parallel: DataParallel | None,
                   dequantized: bool = False):  # fmt: skip
    """Q(rht(pad(t^T))) for wgrad from one fused kernel (``fourbit.kernels.quantize_wgrad``: transpose, token
    padding, RHT and quantization, bit-exact with ``wgrad_inputs`` + ``quantize_operand``), or None where
    that kernel does not cover the operand (then the caller takes the reference chain). ``dequantized``:
    as a ``fourbit.kernels.Dequantized`` operand."""
    from .. import kernels

    if token_multiple(recipe) != RHT_SIZE or not isinstance(op.scheme, NVFP4Config):
        return None
    transform = RHT(RHT_SIZE, recipe.rht_seed) if op.rht else None
    amax = None
    if parallel is not None:
        amax = kernels.wgrad_amax(t, op.scheme, transform)
        if amax is None:
            return None
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=parallel.group)
    stochastic = op.rounding is Rounding.STOCHASTIC
    index = _tokens_index(t.shape[0] + (-t.shape[0]) % RHT_SIZE, parallel)
    return kernels.quantize_wgrad(
        t, op.scheme, rounding=op.rounding, seed=seed(role) if stochastic else None, transform=transform,
        amax=amax, sr_index=index if stochastic else None, dequantized=dequantized,
    )  # fmt: skip


def _dual_operands(t, row: OperandQuant, col: OperandQuant, recipe: Recipe, row_seed, col_seed,
                   parallel: DataParallel | None):  # fmt: skip
    """(rowwise operand, wgrad operand) of ``t`` (tokens, features) as ``Dequantized`` from one kernel
    (``fourbit.kernels.quantize_dual``), the same numbers as ``quantize_operand`` and ``_wgrad_operand``;
    None unless ``kernels.DUAL_OPERANDS`` is on and the kernel covers both (the same NVFP4 1x16 scheme)."""
    from .. import kernels

    if not kernels.DUAL_OPERANDS or row.scheme != col.scheme or row.rht or token_multiple(recipe) != RHT_SIZE:
        return None
    transform = RHT(RHT_SIZE, recipe.rht_seed) if col.rht else None
    if not isinstance(row.scheme, NVFP4Config) or not kernels.dual_applies(t, row.scheme, transform):
        return None
    amax = None
    if parallel is not None:  # both are NVFP4: each tensor scale comes from the global amax
        amax = kernels.dual_amax(t, row.scheme, transform)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=parallel.group)

    def op(q: OperandQuant, seed, index):
        stochastic = q.rounding is Rounding.STOCHASTIC
        return kernels.DualOperand(q.rounding, seed if stochastic else None, index if stochastic else None)

    tokens = t.shape[0] + (-t.shape[0]) % RHT_SIZE
    return kernels.quantize_dual(t, row.scheme, op(row, row_seed, _rows_index(t, parallel)),
                                 op(col, col_seed, _tokens_index(tokens, parallel)), transform=transform, amax=amax,
                                 dequantized=True)  # fmt: skip


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


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _advance_step(module: "QuantLinear", recipe: Recipe) -> "int | torch.Tensor":
    """This forward's step (an int, or with device seeds its six keys on the device), advancing the counter
    once per training forward whatever the recipe, so the SR stream never depends on the late switch."""
    advance = module.training and torch.is_grad_enabled()
    counter = module._step_counter
    if counter is None:
        step = module._step
        if advance:
            module._step += 1
        return step
    if counter.device != module.weight.device:
        raise RuntimeError(f"QuantLinear: the device step counter is on {counter.device}, the weight on "
                           f"{module.weight.device}; call fourbit.nn.use_device_seeds after moving the model")  # fmt: skip
    if recipe.stochastic:  # (an unquantized operand is never stochastically rounded)
        from .. import kernels

        return kernels.seed_keys(counter, seed_base(recipe.seed, module.layer_id), advance)
    if advance:
        counter.add_(1)
    return 0  # nothing is stochastically rounded: no seed is read


@torch.compiler.disable
def _quant_forward(module: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
    """Runs eagerly under torch.compile: quantization is data-dependent and the step counter is Python state."""
    recipe = module.recipe.at(module.progress)
    step = _advance_step(module, recipe)
    if not recipe.quantized or x.numel() == 0:  # no tokens: nothing to quantize, every grad is exactly 0
        return F.linear(x, module.weight, module.bias)
    if x.shape[-1] != module.in_features:
        raise ValueError(
            f"QuantLinear: input's last dim is {x.shape[-1]}, expected in_features={module.in_features}"
        )
    device_type = x.device.type
    cast = _autocast_dtype(device_type)
    out_dtype = cast or x.dtype
    x2 = x.to(out_dtype).reshape(-1, module.in_features)  # (M, K)
    # the GEMM rounds its float32 result to out_dtype once; with a bias, the bias is added in float32 first
    gemm_dtype = out_dtype if module.bias is None else torch.float32
    with torch.autocast(device_type, enabled=False):
        y = _QuantLinearFunction.apply(x2, module.weight, recipe, module.layer_id, step, module.parallel, gemm_dtype)
        if module.bias is not None:
            y = y + module.bias.float()
    return y.to(out_dtype).reshape(*x.shape[:-1], module.out_features)


class QuantLinear(nn.Linear):
    """``nn.Linear`` with quantized Fprop, Dgrad and Wgrad GEMMs per ``recipe`` (same parameters and keys).

    recipe    a ``Recipe`` or a name from ``fourbit.recipes.RECIPES``
    layer_id  part of the stochastic-rounding seed (``fourbit.nn.convert`` numbers the linears of a model)
    step      training forwards so far (advanced automatically; saved by ``fourbit.nn.rng_state``); a host int,
              or with ``fourbit.nn.use_device_seeds`` a counter in device memory (reading it syncs)
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
        self.recipe = recipe
        self.layer_id = layer_id
        self._step_counter: torch.Tensor | None = None  # fourbit.nn.use_device_seeds
        self._step = 0
        self.progress: float | None = None
        self.parallel: DataParallel | None = None  # set by fourbit.nn.set_data_parallel

    @property
    def step(self) -> int:
        counter = self._step_counter
        return self._step if counter is None else int(counter)

    @step.setter
    def step(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"QuantLinear.step must be a non-negative int, got {value!r}")
        self._step = value
        if self._step_counter is not None:
            self._step_counter.fill_(value)

    @property
    def recipe(self) -> Recipe:
        return self._recipe

    @recipe.setter
    def recipe(self, recipe: Recipe | str) -> None:
        recipe = get_recipe(recipe)
        check_features(recipe, self.in_features, self.out_features, type(self).__name__)
        self._recipe = recipe

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe | str, *, layer_id: int = 0) -> "QuantLinear":
        """A QuantLinear sharing ``linear``'s Parameter objects (optimizer state stays valid)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                recipe=recipe, layer_id=layer_id)
        q.weight = linear.weight
        q.bias = linear.bias
        q.train(linear.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _quant_forward(self, x)

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
