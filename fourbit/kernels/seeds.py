"""Stochastic-rounding keys computed on the GPU, so a captured CUDA graph draws new random bits each replay.

``QuantLinear`` seeds each operand with ``seed_key(derive_seed(seed, layer, step, role))`` (``fourbit.nn.linear``,
``fourbit.rounding``): a host-side hash of a host-side step counter. A CUDA graph freezes every scalar
argument of its kernels, so a replayed step would reuse the captured step's keys. With device seeds the
step counter lives in device memory and one launch per layer forward computes

    key[role] = seed_key(h(h(base ^ step) ^ role) >> 1)     base = h(h(seed) ^ layer), h = SplitMix64

for the six roles into a fresh int32 buffer (and advances the counter when the forward trains), the same
integers the host computes; the quantize kernels read their key from that buffer (``sr_args``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rounding import _GOLDEN
from .tl_formats import hash32

N_ROLES = 6  # fourbit.nn.linear.Role


@triton.jit
def _u64(hi: tl.constexpr, lo: tl.constexpr):
    """A uint64 constant from two 32-bit halves (literals above 2^63 have no int64 form)."""
    return (tl.full([], hi, tl.uint64) << 32) | tl.full([], lo, tl.uint64)


@triton.jit
def splitmix64(z):
    """SplitMix64's finaliser on uint64 (``fourbit.nn.linear._splitmix64``); the multiplies wrap mod 2^64."""
    z = z + _u64(0x9E3779B9, 0x7F4A7C15)
    z = (z ^ (z >> 30)) * _u64(0xBF58476D, 0x1CE4E5B9)
    z = (z ^ (z >> 27)) * _u64(0x94D049BB, 0x133111EB)
    return z ^ (z >> 31)


@triton.jit(do_not_specialize=["base"])
def _seed_keys_kernel(counter_ptr, keys_ptr, base, GOLDEN: tl.constexpr, ADVANCE: tl.constexpr,
                      N: tl.constexpr, NP2: tl.constexpr):  # fmt: skip
    step = tl.load(counter_ptr)  # int64, >= 0
    h = splitmix64(base.to(tl.int64).to(tl.uint64, bitcast=True) ^ step.to(tl.uint64, bitcast=True))
    roles = tl.arange(0, NP2)
    s = splitmix64(h ^ roles.to(tl.uint64)) >> 1  # derive_seed: 63 bits
    # seed_key(s) = hash(hash(lo ^ hi) ^ golden)
    k = hash32((s & 0xFFFFFFFF).to(tl.uint32) ^ (s >> 32).to(tl.uint32))
    k = hash32(k ^ tl.full([], GOLDEN, tl.uint32))
    tl.store(keys_ptr + roles, k.to(tl.int32, bitcast=True), mask=roles < N)
    if ADVANCE:
        tl.store(counter_ptr, step + 1)


def seed_keys(counter: torch.Tensor, base: int, advance: bool) -> torch.Tensor:
    """The six roles' int32 keys for the step in ``counter`` (int64, one element), from ``base`` =
    ``h(h(seed) ^ layer)`` (``fourbit.nn.linear.seed_base``); then ``counter += 1`` if ``advance``."""
    if counter.dtype != torch.int64 or counter.numel() != 1:
        raise ValueError(f"seed_keys: the step counter must be one int64 element, got {counter.dtype} {tuple(counter.shape)}")
    if not counter.is_cuda and isinstance(_seed_keys_kernel, triton.runtime.jit.JITFunction):  # (not interpreted)
        raise ValueError(f"seed_keys: the step counter must be a CUDA tensor (device seeds live in GPU memory), "
                         f"got one on {counter.device}")  # fmt: skip
    if not 0 <= base < 1 << 64:
        raise ValueError(f"seed_keys: base must be a 64-bit unsigned int, got {base}")
    keys = torch.empty(N_ROLES, dtype=torch.int32, device=counter.device)
    signed = base - (1 << 64) if base >= 1 << 63 else base  # the kernel reinterprets the int64 bits
    _seed_keys_kernel[(1,)](counter, keys, signed, GOLDEN=_GOLDEN, ADVANCE=advance, N=N_ROLES, NP2=8)
    return keys
