"""Floating-point element formats ExMy, bit-exact.

A format is data: sign bit, exponent bits ``ebits``, mantissa bits ``mbits``, exponent ``bias`` and a
convention for special values. One encoder and one decoder serve every format.

A finite value is ``(-1)^s * 2^(e - bias) * 1.m`` for a biased exponent field ``e >= 1`` and
``(-1)^s * 2^(1 - bias) * 0.m`` (subnormal) for ``e == 0``. Codes are returned as ``uint8``
(the low ``1 + ebits + mbits`` bits hold sign, exponent, mantissa).

Special-value conventions (``Specials``):

* ``FINITE``  - every code is a number (E2M1, E2M3, E3M2): no Inf, no NaN; overflow saturates.
* ``FN``      - OCP "fn" (E4M3): only S.1111.111 is NaN, no Inf; max 448.
* ``IEEE``    - IEEE-754-like (E5M2): all-ones exponent holds Inf (mantissa 0) and NaN.
* ``E8M0``    - unsigned power of two ``2^(e - 127)``; 0xFF is NaN; there is no zero. Rounds ties up
                (as ml_dtypes' ``float8_e8m0fnu``); zero, negative and non-finite inputs give NaN.

The encoder works on magnitudes: with ``e = max(floor(log2|x|), emin)`` and ``q = 2^(e - mbits)`` the
grid spacing in that binade, ``n = round(|x| / q)`` is an integer in ``[0, 2^(mbits+1)]`` and the
magnitude code is ``((e - emin) << mbits) + n`` (a carry of ``n`` into the next binade lands on the
right code by itself). ``|x| / q`` is an exact float32 scaling by a power of two, so rounding happens
exactly once, in ``round_to_integer``.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

import torch

from ._fp32 import exp2i
from .rounding import Rounding, round_to_integer

__all__ = [
    "Specials",
    "FloatFormat",
    "E2M1",
    "E2M3",
    "E3M2",
    "E4M3",
    "E5M2",
    "E8M0",
    "E2M1_MAX",
    "E4M3_MAX",
    "FORMATS",
    "get_format",
]


class Specials(enum.Enum):
    FINITE = "finite"
    FN = "fn"
    IEEE = "ieee"
    E8M0 = "e8m0"


@dataclass(frozen=True)
class FloatFormat:
    """A sign/exponent/mantissa element format. ``bias`` defaults to ``2^(ebits-1) - 1``."""

    name: str
    ebits: int
    mbits: int
    specials: Specials = Specials.FINITE
    bias: int | None = None
    signed: bool = True

    def __post_init__(self) -> None:
        if self.ebits < 1 or self.mbits < 0 or self.bits > 8:
            raise ValueError(f"unsupported format E{self.ebits}M{self.mbits}: need ebits >= 1 and at most 8 bits")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.ebits - 1) - 1)
        if self.specials is Specials.E8M0 and (self.signed or self.mbits != 0):
            raise ValueError("the E8M0 convention is for unsigned formats without mantissa")

    # --- layout -----------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return int(self.signed) + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade."""
        return 1 - self.bias if self.specials is not Specials.E8M0 else -self.bias

    @property
    def max_code(self) -> int:
        """Largest magnitude code that encodes a finite value."""
        all_ones = (1 << (self.ebits + self.mbits)) - 1
        if self.specials is Specials.FINITE:
            return all_ones
        if self.specials is Specials.FN:
            return all_ones - 1
        if self.specials is Specials.IEEE:
            return ((1 << self.ebits) - 2 << self.mbits) | ((1 << self.mbits) - 1)
        return all_ones - 1  # E8M0: 0xFE = 2^127

    @property
    def nan_code(self) -> int | None:
        if self.specials is Specials.FN or self.specials is Specials.E8M0:
            return (1 << (self.ebits + self.mbits)) - 1
        if self.specials is Specials.IEEE:
            return self.inf_code | (1 << max(self.mbits - 1, 0))
        return None

    @property
    def inf_code(self) -> int | None:
        if self.specials is Specials.IEEE:
            return ((1 << self.ebits) - 1) << self.mbits
        return None

    # --- range --------------------------------------------------------------------------------------
    @functools.cached_property  # decoded once per format (kernel launchers read it on every call)
    def max(self) -> float:
        return float(self.decode(torch.tensor([self.max_code], dtype=torch.uint8))[0])

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        if self.specials is Specials.E8M0:
            return 2.0**self.emin
        return 2.0 ** (self.emin - self.mbits)

    def values(self) -> torch.Tensor:
        """Every finite representable value, sorted ascending (float32, one zero)."""
        codes = torch.arange(1 << self.bits, dtype=torch.int64).to(torch.uint8)
        v = self.decode(codes)
        return torch.unique(v[torch.isfinite(v)] + 0.0)  # + 0.0 turns -0 into +0; unique sorts

    # --- conversion ---------------------------------------------------------------------------------
    def encode(
        self,
        x: torch.Tensor,
        rounding: Rounding | str = Rounding.NEAREST,
        *,
        saturate: bool = True,
        random_bits: torch.Tensor | None = None,
        check_nan: bool = True,
    ) -> torch.Tensor:
        """float -> uint8 codes. RNE by default; ``rounding="stochastic"`` needs ``random_bits``
        (int64 tensor of 32-bit random words, see ``fourbit.rounding.random_bits``). ``check_nan=False``
        skips the NaN check of formats without NaN (a device sync on GPU) for callers that removed NaN.

        ``saturate=True`` clamps finite overflow to +-max; ``saturate=False`` gives the format's own
        overflow (NaN for E4M3, Inf for E5M2; formats without specials always saturate). Inf inputs
        map to the format's Inf/NaN (or +-max where it has neither); NaN maps to NaN and raises for
        formats that cannot hold it.
        """
        rounding = Rounding.parse(rounding)
        x = x.float()
        if self.specials is Specials.E8M0:
            return _encode_e8m0(x)
        nan = torch.isnan(x)
        if check_nan and self.nan_code is None and bool(nan.any()):
            raise ValueError(f"{self.name} has no NaN encoding, but the input holds {int(nan.sum())} NaN")
        sign = torch.signbit(x)
        a = x.abs()
        inf = torch.isinf(a)
        a = torch.where(inf | nan, torch.zeros_like(a), a)
        mag = self._magnitude_code(a, rounding, random_bits)

        overflow = mag > self.max_code
        if saturate or self.specials is Specials.FINITE:
            mag = torch.where(overflow, self.max_code, mag)
        elif self.specials is Specials.FN:
            mag = torch.where(overflow, self.nan_code, mag)
        else:
            mag = torch.where(overflow, self.inf_code, mag)

        if self.inf_code is not None:
            mag = torch.where(inf, self.inf_code, mag)
        elif self.nan_code is not None:
            mag = torch.where(inf, self.nan_code, mag)
        else:
            mag = torch.where(inf, self.max_code, mag)
        if self.nan_code is not None:
            mag = torch.where(nan, self.nan_code, mag)

        code = mag | (sign.to(torch.int32) << (self.ebits + self.mbits))
        return code.to(torch.uint8)

    def _magnitude_code(self, a: torch.Tensor, rounding: Rounding, random_bits: torch.Tensor | None) -> torch.Tensor:
        """Finite non-negative float32 -> unsaturated magnitude code ``((e - emin) << mbits) + n`` (int32).

        Two exact paths, selected per element:
        * ``a >= 2^emin`` (normal in the target): round the float32 significand to ``mbits`` bits on the
          bit pattern; a carry ripples into the exponent field by itself. With ``k = 23 - mbits`` dropped
          bits, RNE adds ``2^(k-1) - 1 + lsb`` before the shift; SR adds 1 when the 24-bit uniform
          ``r >> 8`` is below the dropped fraction ``t / 2^k`` (i.e. ``r >> 8 < t << (24 - k)``).
        * ``a < 2^emin`` (subnormal in the target): ``n = round(a / 2^(emin - mbits))``, an exact
          power-of-two scaling followed by the one rounding.
        """
        k = 23 - self.mbits
        bits = a.contiguous().view(torch.int32)
        if rounding is Rounding.NEAREST:
            keep = (bits + (((bits >> k) & 1) + ((1 << (k - 1)) - 1))) >> k
        else:
            if random_bits is None:
                raise ValueError("stochastic rounding needs random_bits")
            dropped = bits & ((1 << k) - 1)
            u24 = (random_bits >> 8).to(torch.int32)
            keep = (bits >> k) + (u24 < (dropped << (24 - k))).to(torch.int32)
        # the float32 exponent field is 127 + e; the code's exponent field is e - emin + 1
        normal = keep - ((127 + self.emin - 1) << self.mbits)
        subnormal = round_to_integer(a * 2.0 ** (self.mbits - self.emin), rounding, random_bits).to(torch.int32)
        return torch.where(a < 2.0**self.emin, subnormal, normal)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes -> float32 values (a lookup in the table of all ``2^bits`` values)."""
        if codes.dtype != torch.uint8:
            raise TypeError(f"codes must be uint8, got {codes.dtype}")
        table = _decode_table(self, codes.device)
        return table[(codes & ((1 << self.bits) - 1)).to(torch.int64)]

    def _decode_bits(self, codes: torch.Tensor) -> torch.Tensor:
        """The decoding rule itself (builds the table): sign, exponent field, mantissa field."""
        c = codes.to(torch.int64)
        nbits = self.ebits + self.mbits
        mag = c & ((1 << nbits) - 1)
        if self.specials is Specials.E8M0:
            v = exp2i(mag - self.bias)
            return torch.where(mag == self.nan_code, torch.nan, v)
        e_field = mag >> self.mbits
        mant = (mag & ((1 << self.mbits) - 1)).to(torch.float32)
        # subnormal: 0.m * 2^emin; normal: 1.m * 2^(e - bias)
        significand = torch.where(e_field == 0, mant, mant + (1 << self.mbits))
        exponent = torch.where(e_field == 0, self.emin, e_field - self.bias) - self.mbits
        v = significand * exp2i(exponent)
        if self.inf_code is not None:
            v = torch.where(mag == self.inf_code, torch.inf, v)
            v = torch.where(mag > self.inf_code, torch.nan, v)
        elif self.nan_code is not None:
            v = torch.where(mag == self.nan_code, torch.nan, v)
        negative = ((c >> nbits) & 1).bool() if self.signed else torch.zeros_like(c, dtype=torch.bool)
        return torch.where(negative, -v, v)

    def round(
        self,
        x: torch.Tensor,
        rounding: Rounding | str = Rounding.NEAREST,
        *,
        saturate: bool = True,
        random_bits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Quantize-dequantize onto the format's grid (float32)."""
        return self.decode(self.encode(x, rounding, saturate=saturate, random_bits=random_bits))

    def __repr__(self) -> str:  # short, e.g. "E4M3"
        return f"FloatFormat({self.name})"


_TABLES: dict = {}


def _decode_table(fmt: FloatFormat, device: torch.device) -> torch.Tensor:
    key = (fmt, str(device))
    if key not in _TABLES:
        _TABLES[key] = fmt._decode_bits(torch.arange(1 << fmt.bits).to(torch.uint8)).to(device)
    return _TABLES[key]


def _encode_e8m0(x: torch.Tensor) -> torch.Tensor:
    """float32 -> E8M0 code, as ml_dtypes: nearest power of two, ties up; up to 2^-127 -> 2^-127;
    zero, negative, non-finite -> NaN (0xFF); overflow past 2^127 -> NaN."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    biased = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    # a normal float rounds up when its mantissa is at least one half; a float32 subnormal m * 2^-149 lies
    # below 2^-126, so it is code 0 (2^-127) up to the midpoint 1.5 * 2^-127 (m = 0x600000) and code 1 from there
    code = torch.where(biased == 0, (mant >= 0x600000).to(torch.int64), biased + (mant >= 0x400000).to(torch.int64))
    bad = ~(x > 0) | torch.isinf(x)
    code = torch.where(bad | (code > 0xFE), 0xFF, code)
    return code.to(torch.uint8)


E2M1 = FloatFormat("E2M1", 2, 1)
E2M3 = FloatFormat("E2M3", 2, 3)
E3M2 = FloatFormat("E3M2", 3, 2)
E4M3 = FloatFormat("E4M3", 4, 3, Specials.FN)
E5M2 = FloatFormat("E5M2", 5, 2, Specials.IEEE)
E8M0 = FloatFormat("E8M0", 8, 0, Specials.E8M0, bias=127, signed=False)

E2M1_MAX = 6.0  # 1.1b * 2^2
E4M3_MAX = 448.0  # 1.110b * 2^8 (1.111b * 2^8 is NaN)

FORMATS: dict[str, FloatFormat] = {f.name.lower(): f for f in (E2M1, E2M3, E3M2, E4M3, E5M2, E8M0)}


def get_format(name: str | FloatFormat) -> FloatFormat:
    """Look a format up by name ("e2m1", "E4M3", ...) or parse any "ExMy" layout.

    The suffixes of torch's and ml_dtypes' dtype names are accepted: "fn" (finite, "e4m3fn") and "fnu"
    (finite and unsigned, "e8m0fnu"); "fp4" is "e2m1"."""
    if isinstance(name, FloatFormat):
        return name
    if not isinstance(name, str):
        raise TypeError(f"format must be a name or FloatFormat, got {type(name).__name__}")
    key = re.sub(r"fnu?$", "", name.lower().replace("fp4", "e2m1"))
    if key in FORMATS:
        return FORMATS[key]
    m = re.fullmatch(r"e(\d)m(\d)", key)
    if m:
        return FloatFormat(name.upper(), int(m.group(1)), int(m.group(2)))
    raise ValueError(f"unknown format {name!r}; known: {', '.join(sorted(FORMATS))} or any 'ExMy'")
