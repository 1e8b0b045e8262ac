"""Triton device functions that mirror ``fourbit.formats`` / ``fourbit.rounding`` bit for bit.

Everything here is written so the float32 results equal the PyTorch reference exactly:

* ``encode_exmy`` is ``FloatFormat.encode(saturate=True)``: the binade exponent comes from the float32
  exponent field (``e = max(E - 127, emin)``; zero and float32 subnormals land on ``emin``, as ``frexp``
  gives), ``v = |x| * 2^(mbits - e)`` is an exact power-of-two scaling, and the one rounding is
  round-half-even through ``(v + 2^23) - 2^23`` (exact RNE for ``0 <= v < 2^22``) or stochastic through
  ``(r >> 8) * 2^-24 < frac(v)``.
* ``random_bits`` is ``fourbit.rounding.random_bits``: lowbias32 on uint32, whose multiplies wrap mod 2^32
  in Triton exactly as the reference's 16-bit-split multiplies do in int64.
* Kernels that call these are launched with ``enable_fp_fusion=False`` (no mul+add -> FMA contraction)
  and ``enable_reflect_ftz=False``; ``div_rn`` is IEEE division (PTX ``div.rn.f32``). float32 ``*`` lowers
  to ``mul.rn.f32`` without ``.ftz``, so subnormals survive as on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rounding import ElementIndex, seed_key

# lowbias32 multipliers (fourbit.rounding), as uint32 constants
HASH_MUL1 = tl.constexpr(0x7FEB352D)
HASH_MUL2 = tl.constexpr(0x846CA68B)
TWO_POW_M24 = tl.constexpr(5.960464477539063e-08)  # 2^-24
RNE_MAGIC = tl.constexpr(8388608.0)  # 2^23: (v + 2^23) - 2^23 rounds v half-to-even to an integer
F32_MAX = tl.constexpr(3.4028234663852886e38)
TWO_POW_126 = tl.constexpr(8.507059173023462e37)  # 2^126: decode_e2m1_pair gives e2m1 * 2^-126


@triton.jit
def hash32(x):
    """lowbias32 on uint32 (C. Wellons)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], HASH_MUL1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], HASH_MUL2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def random_bits(key, index):
    """32 random bits (uint32) for int64 flat ``index``: hash(hash(lo ^ key) ^ hi), key = seed_key(seed).

    ``key`` is the int32 scalar or a pointer to it in device memory (``sr_args``; CUDA-graph replays)."""
    if key.dtype.is_ptr():
        key = tl.load(key)
    key = key.to(tl.uint32, bitcast=True)
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    h = hash32(lo ^ key)
    return hash32(h ^ hi)


@triton.jit
def encode_exmy(
    x,
    rbits,
    EBITS: tl.constexpr,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    MAX_CODE: tl.constexpr,
    INF_CODE: tl.constexpr,
    NAN_CODE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """float32 -> int32 code of a sign/exponent/mantissa format, saturating (``FloatFormat.encode``).

    ``INF_CODE``/``NAN_CODE`` are the magnitude codes that +-Inf / NaN map to (``MAX_CODE`` for formats
    without specials); ``rbits`` (uint32) is used only when ``STOCHASTIC``.
    """
    u = x.to(tl.uint32, bitcast=True)
    sign = (u >> 31).to(tl.int32)
    abits = u & 0x7FFFFFFF
    nonfinite = abits >= 0x7F800000
    isnan = abits > 0x7F800000
    abits = tl.where(nonfinite, 0, abits)
    a = abits.to(tl.float32, bitcast=True)
    e = tl.maximum((abits >> 23).to(tl.int32) - 127, EMIN)  # floor(log2 a), at least emin
    v = a * ((MBITS - e + 127) << 23).to(tl.float32, bitcast=True)  # a * 2^(mbits - e), exact
    if STOCHASTIC:
        lo = v.to(tl.int32)  # v >= 0: truncation is floor
        frac = v - lo.to(tl.float32)  # exact
        up = ((rbits >> 8).to(tl.float32) * TWO_POW_M24) < frac
        n = lo + up.to(tl.int32)
    else:
        n = ((v + RNE_MAGIC) - RNE_MAGIC).to(tl.int32)
    mag = ((e - EMIN) << MBITS) + n
    mag = tl.minimum(mag, MAX_CODE)
    mag = tl.where(nonfinite, INF_CODE, mag)
    mag = tl.where(isnan, NAN_CODE, mag)
    return mag | (sign << (EBITS + MBITS))


def sr_args(stochastic: bool, seed, sr_index, row_len: int) -> tuple:
    """(row_off, col_off, row_stride, key) for a kernel that draws ``random_bits(key, (r + row_off) *
    row_stride + c + col_off)``: the ``ElementIndex`` (default: the tensor itself, rows of ``row_len``) and
    the seed's 32-bit key as an int32 (the kernel reinterprets it as uint32; 0 without stochastic rounding).

    ``seed`` is an int, or a one-element int32 tensor on the operand's device that already holds the key
    (``fourbit.kernels.seed_keys``): the kernel then reads the key when it runs, so a CUDA graph replays
    with whatever key the graph's earlier kernels wrote there."""
    index = sr_index or ElementIndex()
    stride = index.row_stride if index.row_stride is not None else row_len
    if stochastic and isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int32 or seed.numel() != 1:
            raise ValueError(f"a device seed key must be one int32 element, got {seed.dtype} {tuple(seed.shape)}")
        return index.row_offset, index.col_offset, stride, seed
    key = seed_key(seed) if stochastic else 0
    return index.row_offset, index.col_offset, stride, key - (1 << 32) if key >= 1 << 31 else key


def exmy_constants(fmt) -> dict:
    """``encode_exmy``'s constexpr arguments for a ``fourbit.formats.FloatFormat`` (saturating encode):
    Inf goes to the format's Inf, else its NaN, else its largest finite code; NaN to its NaN, else +0."""
    inf = fmt.inf_code if fmt.inf_code is not None else (fmt.nan_code if fmt.nan_code is not None else fmt.max_code)
    nan = fmt.nan_code if fmt.nan_code is not None else 0
    return dict(EBITS=fmt.ebits, MBITS=fmt.mbits, EMIN=fmt.emin, MAX_CODE=fmt.max_code, INF_CODE=inf, NAN_CODE=nan)


@triton.jit
def div_ieee(a, b, PRECISE: tl.constexpr):
    """a / b rounded once (``div.rn.f32``); ``PRECISE=False`` (the CPU interpreter, IEEE anyway) uses ``/``."""
    if PRECISE:
        return tl.math.div_rn(a, b)
    return a / b


@triton.jit
def encode_e4m3(x):
    """float32 -> E4M3 (fn) code, RNE, saturating to 448; Inf and NaN -> 0x7F (NaN)."""
    return encode_exmy(x, 0, 4, 3, -6, 0x7E, 0x7F, 0x7F, False)


@triton.jit
def encode_e2m1(x, rbits, STOCHASTIC: tl.constexpr):
    """float32 -> E2M1 code, saturating to 6 (Inf too); the caller maps NaN to 0 first."""
    return encode_exmy(x, rbits, 2, 1, 0, 7, 7, 0, STOCHASTIC)


@triton.jit
def encode_e2m1_rne_magic(x):
    """float32 -> E2M1 code, round-half-even; equals ``encode_e2m1(x, 0, False)`` and ``E2M1.encode`` for every x.

    ``a = min(|x|, 6)`` (NaN gives 6, fixed at the end); ``M = 2^(22 + e)`` with ``e = floor(log2 max(a, 1))``
    in {0, 1, 2}, so ``ulp(M) = 2^(e-1)`` is E2M1's spacing in a's binade (0.5 below 2, then 1, then 2).
    ``a + M`` rounds a half-to-even onto that grid (one IEEE add), and ``bits(a + M) - bits(M)`` counts
    grid steps: the code is that count plus ``2e``. About 10 integer/float operations instead of seven
    threshold compares and their sums, or ``encode_exmy``'s general path. -0 and negatives below the first
    midpoint keep the sign (code 8), as the reference does; NaN gives +0.
    """
    xb = x.to(tl.int32, bitcast=True)
    a = tl.minimum((xb & 0x7FFFFFFF).to(tl.float32, bitcast=True), 6.0)
    mb = tl.maximum(a, 1.0).to(tl.int32, bitcast=True) & 0x7F800000  # exponent field of max(a, 1): 127 + e
    big = mb + (22 << 23)  # bits of M = 2^(22 + e)
    steps = (a + big.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) - big
    mag = steps + ((mb >> 22) - 254)  # + 2e
    code = mag | ((xb >> 28) & 8)
    return tl.where(x == x, code, 0)


@triton.jit
def decode_e4m3(code):
    """E4M3 (fn) code (int32) -> float32, exact; 0x7F/0xFF -> NaN."""
    mag = code & 0x7F
    ef = mag >> 3
    m = mag & 7
    normal = (((ef + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)  # 2^(ef - 7) * (1 + m/8)
    sub = m.to(tl.float32) * 0.001953125  # m * 2^-9, exact
    v = tl.where(ef == 0, sub, normal)
    v = tl.where(mag == 0x7F, tl.full(v.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True), v)
    return tl.where((code & 0x80) != 0, -v, v)


@triton.jit
def decode_e2m1_pair(w, SHIFT: tl.constexpr):
    """The two E2M1 codes at bits SHIFT..SHIFT+3 and SHIFT+16..SHIFT+19 of 32-bit words ``w`` (SHIFT 0 or 4;
    the other bits are ignored) -> (float32 ``e2m1(low code) * 2^-126``, ``e2m1(high code) * 2^-126``), exact.

    The one E2M1 decode of the kernels. A BF16 number whose exponent field is E2M1's two exponent bits and
    whose top mantissa bit is E2M1's mantissa bit is ``e2m1 * 2^-126`` (E2M1's bias is 1, BF16's 127; a BF16
    subnormal for exponent 0, just as E2M1's 0.5 is subnormal). So each code only has to be moved into place
    in its 16-bit half: the multiply by ``2^(6-SHIFT) + 2^(12-SHIFT)`` copies the code to bits 6..9 and
    12..15 of its half (no overlap, no carries), and the mask 0x81C0 per half keeps the magnitude at bits
    6..8 (BF16's top mantissa bit and two lowest exponent bits) and the sign at bit 15. The high half is then
    a float32 as it stands, the low half after a 16-bit shift: two codes for one multiply, the ``2^126`` left
    to a scale multiply the caller does anyway (``decode_e2m1`` does it when there is none)."""
    w = w.to(tl.uint32, bitcast=True)  # int32 codes and bytes too (a no-op on the bits)
    p = (w & (0x000F000F << SHIFT)) * (0x1040 >> SHIFT) & 0x81C081C0
    lo = (p << 16).to(tl.float32, bitcast=True)
    hi = (p & 0xFFFF0000).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def decode_e2m1(code):
    """E2M1 code (int32, 0-15) -> float32, exact: ``decode_e2m1_pair``'s low value times 2^126."""
    v, _ = decode_e2m1_pair(code, 0)
    return v * TWO_POW_126
