"""Element formats against ml_dtypes: every code, random/tie/subnormal/overflow inputs, and properties."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fourbit.formats import E2M1, E2M3, E3M2, E4M3, E5M2, E8M0, FORMATS, FloatFormat, Specials, get_format
from fourbit.rounding import random_bits

from oracles import ML_DTYPES, cast_codes

SIGNED = [E2M1, E2M3, E3M2, E4M3, E5M2]
ALL = SIGNED + [E8M0]
ids = lambda f: f.name  # noqa: E731


def all_codes(fmt: FloatFormat) -> torch.Tensor:
    return torch.arange(1 << fmt.bits).to(torch.uint8)


def interesting_inputs(fmt: FloatFormat, seed: int = 0) -> torch.Tensor:
    """Random values over many binades, float32 subnormals, every grid value and every midpoint (ties)."""
    g = torch.Generator().manual_seed(seed)
    scales = [2.0**k for k in range(-40, 40, 3)]
    parts = [torch.randn(2000, generator=g) * s for s in scales]
    parts.append((torch.rand(2000, generator=g) - 0.5) * 2e-38)  # float32 subnormals
    vals = fmt.values().double()
    mids = (vals[1:] + vals[:-1]) / 2  # exact in float32 for these narrow formats
    parts += [vals.float(), mids.float(), torch.tensor([0.0, -0.0])]
    if fmt.signed:
        parts.append(-mids.float())
    return torch.cat(parts)


@pytest.mark.parametrize("fmt", ALL, ids=ids)
def test_decode_every_code_matches_ml_dtypes(fmt):
    ours = fmt.decode(all_codes(fmt)).numpy()
    theirs = all_codes(fmt).numpy().view(ML_DTYPES[fmt.name]).astype(np.float32)
    np.testing.assert_array_equal(ours, theirs)  # NaNs at the same places; -0 vs 0 checked below
    assert np.array_equal(np.signbit(ours), np.signbit(theirs))


@pytest.mark.parametrize("fmt", ALL, ids=ids)
def test_encode_matches_ml_dtypes_without_saturation(fmt):
    x = interesting_inputs(fmt)
    if fmt.specials is not Specials.FINITE:
        x = torch.cat([x, torch.tensor([math.inf, -math.inf, math.nan, 1e30, -1e30])])
    ours = fmt.encode(x, saturate=False).numpy()
    theirs = cast_codes(x.numpy(), fmt.name, saturate=False)
    if fmt.specials is Specials.E8M0:
        theirs = np.where(np.isnan(x.numpy()), 0xFF, theirs)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("fmt", SIGNED, ids=ids)
def test_encode_saturates_to_max(fmt):
    x = torch.cat([interesting_inputs(fmt, 1), torch.tensor([1e30, -1e30, fmt.max * 1.2, -fmt.max * 1.01])])
    ours = fmt.encode(x).numpy()
    np.testing.assert_array_equal(ours, cast_codes(x.numpy(), fmt.name, saturate=True))
    assert fmt.decode(fmt.encode(torch.tensor([1e30])))[0] == fmt.max


@pytest.mark.parametrize(
    "fmt,overflow",
    [(E4M3, math.nan), (E5M2, math.inf)],
    ids=["E4M3-nan", "E5M2-inf"],
)
def test_unsaturated_overflow_is_the_formats_own(fmt, overflow):
    # E4M3: 464 is the tie between 448 and the NaN slot 480 and rounds to even (448); above it is NaN.
    # E5M2: 61440 is the tie between 57344 and 2^16 and rounds to even, which is Inf.
    big = torch.tensor([fmt.max * 1.2, 1e30])
    out = fmt.round(big, saturate=False)
    if math.isnan(overflow):
        assert torch.isnan(out).all()
        assert fmt.round(torch.tensor([464.0]), saturate=False)[0] == 448.0
        assert torch.isnan(fmt.round(torch.tensor([464.01]), saturate=False)).all()
    else:
        assert torch.isinf(out).all()


@pytest.mark.parametrize("fmt", ALL, ids=ids)
def test_range_constants_match_ml_dtypes(fmt):
    fi = ml_dtypes.finfo(ML_DTYPES[fmt.name])
    assert fmt.max == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)


@pytest.mark.parametrize("fmt", ALL, ids=ids)
def test_values_are_every_finite_value_sorted(fmt):
    theirs = all_codes(fmt).numpy().view(ML_DTYPES[fmt.name]).astype(np.float64)
    expected = np.unique(theirs[np.isfinite(theirs)] + 0.0)
    np.testing.assert_array_equal(fmt.values().numpy().astype(np.float64), expected)


def test_named_constants():
    assert (E2M1.max, E4M3.max, E5M2.max, E2M3.max, E3M2.max) == (6.0, 448.0, 57344.0, 7.5, 28.0)
    assert E2M1.values().tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert E8M0.decode(torch.tensor([0, 127, 254, 255], dtype=torch.uint8)).tolist()[:3] == [2.0**-127, 1.0, 2.0**127]


def test_e8m0_rounds_ties_up_and_zero_is_nan():
    x = torch.tensor([1.5, 3.0, 0.75, 1.49, 0.0, -1.0])
    assert E8M0.encode(x).tolist() == [128, 129, 127, 127, 255, 255]


def test_nan_into_a_format_without_nan_raises():
    with pytest.raises(ValueError, match="no NaN"):
        E2M1.encode(torch.tensor([math.nan]))


def test_get_format_parses_layouts():
    assert get_format("e4m3") is E4M3 and get_format("E2M1") is E2M1
    f = get_format("e3m4")
    assert (f.ebits, f.mbits, f.bias) == (3, 4, 3)
    with pytest.raises(ValueError, match="unknown format"):
        get_format("int4")
    assert set(FORMATS) == {"e2m1", "e2m3", "e3m2", "e4m3", "e5m2", "e8m0"}


@pytest.mark.parametrize("fmt", list(ML_DTYPES), ids=str)
def test_get_format_takes_ml_dtypes_names_and_decodes_as_that_dtype(fmt):
    """"e8m0fnu", "e4m3fn", "e2m1fn", ...: the part of ml_dtypes' dtype name after ``floatN_`` names the format
    whose every code decodes as that dtype does (NaN where it has NaN)."""
    dtype = ML_DTYPES[fmt]
    name = np.dtype(dtype).name.split("_", 1)[1]
    assert get_format(name) is FORMATS[fmt.lower()]
    codes = np.arange(1 << FORMATS[fmt.lower()].bits, dtype=np.uint8)
    theirs = codes.view(dtype).astype(np.float64)
    ours = get_format(name).decode(torch.from_numpy(codes)).numpy().astype(np.float64)
    np.testing.assert_array_equal(ours, theirs)


# --- properties -------------------------------------------------------------------------------------
finite_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


@pytest.mark.parametrize("fmt", SIGNED, ids=ids)
@settings(max_examples=60, deadline=None)
@given(xs=st.lists(finite_floats, min_size=1, max_size=64))
def test_round_is_idempotent_monotone_and_sign_symmetric(fmt, xs):
    x = torch.tensor(xs, dtype=torch.float32)
    r = fmt.round(x)
    assert torch.equal(fmt.round(r), r)
    order = torch.argsort(x)
    assert (torch.diff(r[order]) >= 0).all()
    assert torch.equal(fmt.round(-x), -r)


@pytest.mark.parametrize("fmt", SIGNED, ids=ids)
def test_encode_decode_round_trip_every_finite_code(fmt):
    codes = all_codes(fmt)
    v = fmt.decode(codes)
    keep = torch.isfinite(v)
    assert torch.equal(fmt.encode(v[keep], saturate=False), codes[keep])


# --- stochastic rounding, closed form -----------------------------------------------------------
SR_DRAWS = 200_000
SR_SIGMAS = 5.0  # a 5-sigma bound: a false alarm about once in 3.5 million runs


@pytest.mark.parametrize(
    "fmt,x,lo,hi", [(E2M1, 2.3, 2.0, 3.0), (E2M1, 0.1, 0.0, 0.5), (E4M3, 300.0, 288.0, 320.0), (E2M1, -4.5, -6.0, -4.0)],
    ids=["e2m1-2.3", "e2m1-subnormal", "e4m3-300", "e2m1-neg"],
)
def test_stochastic_rounding_probability_and_mean(fmt, x, lo, hi):
    xs = torch.full((SR_DRAWS,), x)
    bits = random_bits(7, torch.arange(SR_DRAWS))
    r = fmt.round(xs, "stochastic", random_bits=bits).double()
    assert set(r.unique().tolist()) <= {lo, hi}
    p_hi = (x - lo) / (hi - lo)
    sigma_p = math.sqrt(p_hi * (1 - p_hi) / SR_DRAWS)
    assert abs(float((r == hi).double().mean()) - p_hi) < SR_SIGMAS * sigma_p
    assert abs(float(r.mean()) - x) < SR_SIGMAS * sigma_p * abs(hi - lo)


def test_stochastic_rounding_of_grid_values_is_exact():
    v = E2M1.values()
    bits = random_bits(3, torch.arange(v.numel()))
    assert torch.equal(E2M1.round(v, "stochastic", random_bits=bits), v)
