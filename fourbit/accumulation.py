"""Limited-precision tensor-core accumulation, and DeepSeek-V3's promotion to FP32 every N_C elements.

Hopper's FP8 tensor cores do not accumulate in full FP32. DeepSeek-V3 (arXiv 2412.19437, sections 3.3.2
and 3.5.2) describes the mechanism measured on H800: *after aligning 32 mantissa products by right-shifting
based on the maximum exponent, the Tensor Core only uses the highest 14 bits of each mantissa product for
addition, and truncates bits exceeding this range; the accumulation of addition results into registers also
employs 14-bit precision.* SageAttention2 (arXiv 2411.10958) independently found the FP8 ``mma``
accumulator to be "FP22": 1 sign, 8 exponent and 13 explicit mantissa bits, i.e. 14 significant bits
counting the implicit leading one. DeepSeek-V3's fix is to copy the tensor-core partial sum to an FP32
register on the CUDA cores every N_C = 128 elements of K (four WGMMAs) and reset it.

The model, for one output ``C[m, n] = sum_k a[m, k] b[n, k]`` with ``w = bits``:

    acc = 0                                   limited-precision tensor-core accumulator
    out = 0 (float32)                         FP32 register on the CUDA cores
    for each group G of `group` consecutive k (K zero-padded to a multiple of `group`):
        p_k = a[m, k] * b[n, k]               exact (float64 holds a product of two float32 exactly)
        E   = floor(log2 max(|p_k| for k in G, |acc|))          the group's largest exponent
        q   = 2^(E - w + 1)                   weight of the lowest kept bit: a number in [2^E, 2^(E+1))
                                              keeps w significant bits, the leading one included
        s   = trunc(acc / q) + sum_k trunc(p_k / q)             align by right shift, drop the bits below q
                                                                (toward zero on the magnitude, sign kept)
        acc = trunc_w(s * q)                  the sum written back at w significant bits, toward zero
        if promote_every and (end of G) is a multiple of promote_every, or G is the last group:
            out = fl32(out + acc); acc = 0    promotion: one float32 add (round to nearest even)

``trunc_w(x) = sign(x) * floor(|x| / u) * u`` with ``u = 2^(floor(log2 |x|) - w + 1)`` keeps the highest
``w`` bits of ``|x|`` (leading one included) and clears the rest. Without promotion, ``out`` is the final
``acc`` (exact in float32, since ``w <= 24``). Every step of the group sum is exact in float64: ``|acc / q|``
and each ``|p_k / q|`` are integers below ``2^w``, and ``group + 1`` of them stay below ``2^53``.

What is and is not modelled: truncation (not rounding) of each aligned addend and of the stored sum, which
biases every group toward zero; a single alignment shift per group, so a product far below the group's
maximum is lost entirely (the "swamping" that makes long K hurt); exponent range is float64's (no
overflow/underflow in the tensor core, values are assumed scaled into range, as FP8 recipes do; an Inf or
NaN product makes the output Inf or NaN, as the IEEE sum would). The exact
bit positions of real hardware (extra guard bits inside the adder tree, the order in which the accumulator
joins the tree) are not public; this is the simplest model consistent with DeepSeek-V3's description.

``bits=None`` is exact FP32 accumulation and returns ``a.float() @ b.float().T`` itself, the recipes'
reference GEMM. The limited model is not a kernel: it runs the K groups in a Python loop, vectorised over
M and N (a 256x256x4096 product takes about 2 s on one idle CPU core). It is differentiable as the exact product
(the backward is ``dC @ b`` and ``dC.T @ a`` in float32): the accumulation error is treated as noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Accumulation"]

BITS_MIN = 2  # a leading one and at least one more bit
BITS_MAX = 24  # float32's significand; the limited sum must stay exactly representable in the output
GROUP_MAX = 1 << 16  # keeps (group + 1) * 2^bits < 2^53, so the integer group sums are exact in float64
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2 |x|) of a float64 tensor, as float64 (0 for x == 0, where it is never used)."""
    _, e = torch.frexp(x)  # x = mant * 2^e, |mant| in [0.5, 1)
    return (e - 1).to(torch.float64)


def truncate_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the highest ``bits`` significant bits of each float64 value (leading one included), toward zero."""
    u = torch.ldexp(torch.ones_like(x), _floor_log2(x) - (bits - 1))
    return torch.trunc(x / u) * u  # division by a power of two is exact


@dataclass(frozen=True)
class Accumulation:
    """How a GEMM accumulates over K: exact FP32 (``bits=None``), or the limited tensor-core model above.

    bits           significant bits kept by the tensor-core adder, implicit leading one included
                   (Hopper FP8: 14, i.e. 13 stored mantissa bits); None for exact FP32 accumulation
    group          products aligned together to one exponent (Hopper: 32)
    promote_every  N_C: add the partial sum into an FP32 accumulator every N_C elements of K and reset it
                   (DeepSeek-V3: 128); None never promotes. A multiple of ``group``.
    """

    bits: int | None = None
    group: int = 32
    promote_every: int | None = None

    def __post_init__(self) -> None:
        if self.bits is not None and (
            isinstance(self.bits, bool) or not isinstance(self.bits, int) or not BITS_MIN <= self.bits <= BITS_MAX
        ):
            raise ValueError(f"Accumulation: bits must be None or an int in [{BITS_MIN}, {BITS_MAX}], got {self.bits!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or not 1 <= self.group <= GROUP_MAX:
            raise ValueError(f"Accumulation: group must be an int in [1, {GROUP_MAX}], got {self.group!r}")
        if self.promote_every is not None:
            if isinstance(self.promote_every, bool) or not isinstance(self.promote_every, int) or self.promote_every < 1:
                raise ValueError(f"Accumulation: promote_every must be None or a positive int, got {self.promote_every!r}")
            if self.promote_every % self.group:
                raise ValueError(
                    f"Accumulation: promote_every={self.promote_every} must be a multiple of group={self.group}"
                )
            if self.bits is None:
                raise ValueError("Accumulation: promote_every needs limited accumulation (bits=None is already FP32)")

    @property
    def exact(self) -> bool:
        return self.bits is None

    @property
    def name(self) -> str:
        if self.bits is None:
            return "fp32"
        s = f"acc{self.bits}" + (f"/g{self.group}" if self.group != 32 else "")
        return s + (f"-promote{self.promote_every}" if self.promote_every else "")

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b.T`` in float32 under this accumulation model. a: (*, K), b: (N, K) -> (*, N)."""
        _check_operands(a, b)
        if self.bits is None:
            return a.float() @ b.float().T
        lead = a.shape[:-1]
        out = _LimitedMatmul.apply(a.reshape(-1, a.shape[-1]), b, self)
        return out.reshape(*lead, b.shape[0])


def _check_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Accumulation.matmul: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"Accumulation.matmul: {name} must be a floating tensor, got {t.dtype}")
    if a.dim() < 1 or b.dim() != 2:
        raise ValueError(f"Accumulation.matmul: expects a (*, K) and b (N, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[1]:
        raise ValueError(f"Accumulation.matmul: K differs, a {tuple(a.shape)} vs b {tuple(b.shape)}")


def limited_matmul(a: torch.Tensor, b: torch.Tensor, acc: Accumulation) -> torch.Tensor:
    """The limited model on a (M, K), b (N, K) -> float32 (M, N); no autograd (see module docstring).

    Rows of ``a`` run in chunks so that one chunk's (rows, N, group) products stay cache-sized; each chunk
    loops over the K groups. Row chunks are independent, so chunking does not change any bit.
    """
    if acc.bits is None:
        raise ValueError("limited_matmul needs Accumulation.bits, got None (use Accumulation.matmul)")
    M, K = a.shape
    N = b.shape[0]
    g = acc.group
    # operands are taken as float32 (as the bits=None path does); their products are exact in float64
    a64, b64 = a.detach().float().double(), b.detach().float().double()
    pad = (-K) % g
    if pad:  # zero products change neither the group maximum nor the sum
        a64 = torch.nn.functional.pad(a64, (0, pad))
        b64 = torch.nn.functional.pad(b64, (0, pad))
    ngroups = (K + pad) // g
    promote_groups = acc.promote_every // g if acc.promote_every else None
    rows = max(1, _CHUNK_ELEMENTS // max(1, N * g))
    out = torch.empty(M, N, dtype=torch.float32, device=a.device)
    for r in range(0, M, rows):
        out[r : r + rows] = _limited_rows(a64[r : r + rows], b64, acc.bits, g, ngroups, promote_groups)
    return out


_CHUNK_ELEMENTS = 1 << 19  # products per row chunk: 4 MiB of float64, measured fastest on CPU


def _limited_rows(
    a64: torch.Tensor, b64: torch.Tensor, bits: int, g: int, ngroups: int, promote_groups: int | None
) -> torch.Tensor:
    """a64 (m, G*g), b64 (N, G*g) float64 -> float32 (m, N): the loop of the module docstring."""
    m, N = a64.shape[0], b64.shape[0]
    a_g = a64.reshape(m, ngroups, g)  # (m, G, g)
    b_g = b64.reshape(N, ngroups, g)  # (N, G, g)
    p = torch.empty(m, N, g, dtype=torch.float64, device=a64.device)  # reused buffers: no page faults
    p_abs = torch.empty_like(p)
    p_int = torch.empty(m, N, g, dtype=torch.int64, device=a64.device)
    one = torch.ones(m, N, dtype=torch.float64, device=a64.device)
    out = torch.zeros(m, N, dtype=torch.float32, device=a64.device)  # FP32 CUDA-core register
    tc = torch.zeros(m, N, dtype=torch.float64, device=a64.device)  # tensor-core accumulator (w bits)
    for i in range(ngroups):
        torch.mul(a_g[:, None, i, :], b_g[None, :, i, :], out=p)  # (m, N, g) exact products
        torch.abs(p, out=p_abs)
        amax = torch.maximum(p_abs.amax(dim=-1), tc.abs())  # (m, N), accumulator included
        finite = torch.isfinite(amax)
        overflow = None if bool(finite.all()) else p.sum(dim=-1) + tc  # Inf/NaN: the IEEE sum, before scaling
        _, e = torch.frexp(amax)  # amax in [2^(e-1), 2^e): E = e - 1
        inv_q = torch.ldexp(one, bits - e)  # 1/q = 2^(w - 1 - E), exact power of two
        p.mul_(inv_q[..., None])  # aligned: |p/q| < 2^w
        p_int.copy_(p)  # float -> int casts truncate toward zero
        s = p_int.sum(dim=-1).double() + torch.trunc(tc * inv_q)  # exact integer sum
        tc = truncate_bits(s / inv_q, bits)  # written back at w bits
        if overflow is not None:  # an int cast of Inf/NaN is garbage: keep the non-finite sum instead
            tc = torch.where(finite, tc, overflow)
        if promote_groups and (i + 1) % promote_groups == 0:
            out += tc.float()  # exact cast (w <= 24 bits), then one float32 add
            tc.zero_()
    if promote_groups:
        return out + tc.float() if ngroups % promote_groups else out
    return tc.float()


class _LimitedMatmul(torch.autograd.Function):
    """Forward: the limited model. Backward: the exact product's gradients in float32."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, acc: Accumulation) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        with torch.no_grad():
            return limited_matmul(a, b, acc)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_a = (grad @ b.float()).to(a.dtype) if ctx.needs_input_grad[0] else None  # (M, K)
        grad_b = (grad.T @ a.float()).to(b.dtype) if ctx.needs_input_grad[1] else None  # (N, K)
        return grad_a, grad_b, None
