"""Rounding to an integer grid: round-to-nearest-even and unbiased stochastic rounding.

Stochastic rounding draws its randomness from a counter-based function of ``(seed, element index)``:
``random_bits(seed, index)`` is a pure 32-bit integer hash, so the same seed gives the same bits on any
device, in any chunking, and a GPU kernel computes it with the same integer operations.

For ``v`` between the grid integers ``lo = floor(v)`` and ``lo + 1``, SR returns ``lo + 1`` with
probability ``v - lo`` (to 2^-24): it compares the exact float32 fraction against a 24-bit uniform
``u = (r >> 8) * 2^-24``. ``E[SR(v)] = v``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

__all__ = ["Rounding", "ElementIndex", "random_bits", "random_bits_from_key", "seed_key", "seed_base", "derive_seed", "uniform24", "round_to_integer"]

_MASK32 = 0xFFFFFFFF
_HASH_MUL1 = 0x7FEB352D  # lowbias32 (C. Wellons): a well-mixed 32-bit integer hash
_HASH_MUL2 = 0x846CA68B
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: decorrelates consecutive seeds


class Rounding(enum.Enum):
    NEAREST = "nearest"  # round half to even
    STOCHASTIC = "stochastic"

    @classmethod
    def parse(cls, value: "Rounding | str") -> "Rounding":
        if isinstance(value, Rounding):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown rounding {value!r}; known: {', '.join(r.value for r in cls)}") from None


@dataclass(frozen=True)
class ElementIndex:
    """Where a (rows, cols) tensor sits inside a larger logical one, for stochastic rounding's counter:
    element (r, c) draws ``random_bits(seed, (r + row_offset) * row_stride + c + col_offset)``.

    The default is the tensor itself (``row_stride`` = its last dim). Data-parallel training uses it so a
    rank's shard of a gradient draws the bits that the same elements would draw in a single-process run.
    """

    row_offset: int = 0
    col_offset: int = 0
    row_stride: int | None = None

    def __post_init__(self) -> None:
        for name in ("row_offset", "col_offset"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"ElementIndex.{name} must be a non-negative int, got {v!r}")
        if self.row_stride is not None and (not isinstance(self.row_stride, int) or self.row_stride < 1):
            raise ValueError(f"ElementIndex.row_stride must be a positive int or None, got {self.row_stride!r}")

    def flat(self, rows: int, cols: int, row_stride: int, device=None) -> torch.Tensor:
        """int64 (rows, cols) flat indices; ``row_stride`` is used where the field is None."""
        stride = self.row_stride if self.row_stride is not None else row_stride
        r = torch.arange(rows, device=device, dtype=torch.int64)[:, None] + self.row_offset
        c = torch.arange(cols, device=device, dtype=torch.int64) + self.col_offset
        return r * stride + c


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), in int64 without overflow: split c into 16-bit halves."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _HASH_MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _HASH_MUL2)
    return x ^ (x >> 16)


def _hash32_int(x: int) -> int:
    """``_hash32`` on one Python int (no tensor round trip: kernels call ``seed_key`` per launch)."""
    x ^= x >> 16
    x = (x * _HASH_MUL1) & _MASK32
    x ^= x >> 15
    x = (x * _HASH_MUL2) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The 32-bit key a seed contributes (Python int; kernels receive it as a scalar)."""
    s = _hash32_int((seed & _MASK32) ^ ((seed >> 32) & _MASK32))
    return _hash32_int(s ^ _GOLDEN)


def random_bits(seed: int, index: torch.Tensor) -> torch.Tensor:
    """32 random bits per element (int64 in [0, 2^32)) from the element's flat index and a seed.

    ``r = hash(hash(index_lo ^ key) ^ index_hi)`` with ``key = seed_key(seed)``.
    """
    if not isinstance(seed, int):
        hint = " (a seed key in device memory is read only by the Triton kernels)" if isinstance(seed, torch.Tensor) else ""
        raise TypeError(f"seed must be an int, got {type(seed).__name__}{hint}")
    return random_bits_from_key(seed_key(seed), index)


def random_bits_from_key(key: int, index: torch.Tensor) -> torch.Tensor:
    """``random_bits`` for a seed's 32-bit key (``seed_key(seed)``, or a key the GPU computed)."""
    index = index.to(torch.int64)
    h = _hash32((index & _MASK32) ^ key)
    return _hash32(h ^ (index >> 32))


def uniform24(bits: torch.Tensor) -> torch.Tensor:
    """The top 24 of 32 random bits as a float32 uniform in [0, 1), exactly."""
    return (bits >> 8).to(torch.float32) * 2.0**-24


def round_to_integer(v: torch.Tensor, rounding: Rounding, random_bits: torch.Tensor | None = None) -> torch.Tensor:
    """Round non-negative float32 ``v`` to an integer (int64)."""
    if rounding is Rounding.NEAREST:
        return torch.round(v).to(torch.int64)  # torch.round is half-to-even
    if random_bits is None:
        raise ValueError("stochastic rounding needs random_bits")
    lo = torch.floor(v)
    frac = v - lo  # exact in float32
    up = uniform24(random_bits) < frac
    return lo.to(torch.int64) + up.to(torch.int64)


# --- per-operand seeds of a training run (fourbit.nn) -------------------------------------------------

_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """SplitMix64's finaliser (Steele et al. 2014): a bijective, well-mixed 64-bit integer hash."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def seed_base(seed: int, layer_id: int) -> int:
    """The step-independent part of a layer's seeds: ``h(h(seed) ^ layer)``."""
    return _splitmix64(_splitmix64(seed & _M64) ^ (layer_id & _M64))


def derive_seed(seed: int, layer_id: int, step: int, role: int) -> int:
    """The stochastic-rounding seed of one operand: ``h(h(h(h(seed) ^ layer) ^ step) ^ role)`` in [0, 2^63)."""
    h = seed_base(seed, layer_id)
    for v in (step, int(role)):
        h = _splitmix64(h ^ (v & _M64))
    return h >> 1  # 63 bits: a non-negative int64 for kernels
