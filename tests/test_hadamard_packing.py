"""Random Hadamard transform, FP4 packing, and the counter-based random bits."""

import numpy as np
import pytest
import torch

import fourbit
from fourbit.hadamard import RHT, hadamard_matrix, random_signs, rht
from fourbit.packing import as_float4_x2, pack_fp4, unpack_fp4
from fourbit.rounding import random_bits, uniform24


def test_sylvester_hadamard_matches_scipy_and_is_orthogonal():
    h = hadamard_matrix(16, torch.float64)
    assert torch.equal(h @ h.T, 16 * torch.eye(16, dtype=torch.float64))
    scipy_linalg = pytest.importorskip("scipy.linalg")
    np.testing.assert_array_equal(h.numpy(), scipy_linalg.hadamard(16))


def test_rht_matrix_is_orthogonal_with_fixed_signs():
    m = RHT().matrix(torch.float64)
    assert torch.allclose(m @ m.T, torch.eye(16, dtype=torch.float64), atol=1e-15)
    s = random_signs()
    assert set(s.tolist()) == {-1.0, 1.0} and torch.equal(s, random_signs())
    assert not torch.equal(random_signs(1), random_signs(2))


def test_rht_on_both_operands_preserves_the_product_in_float64():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 64, dtype=torch.float64, generator=g)
    b = torch.randn(5, 64, dtype=torch.float64, generator=g)
    t = RHT(seed=123)
    torch.testing.assert_close(rht(a, -1, transform=t) @ rht(b, -1, transform=t).T, a @ b.T, rtol=0, atol=1e-12)
    # along the token dim (dim 0) for a Wgrad-style product x^T dy
    x = torch.randn(32, 6, dtype=torch.float64, generator=g)
    dy = torch.randn(32, 4, dtype=torch.float64, generator=g)
    torch.testing.assert_close(rht(dy, 0).T @ rht(x, 0), dy.T @ x, rtol=0, atol=1e-12)


def test_rht_spreads_an_outlier():
    x = torch.zeros(1, 16)
    x[0, 3] = 16.0
    y = rht(x)
    assert torch.equal(y.abs(), torch.full((1, 16), 4.0))  # one spike becomes 16 equal magnitudes


def test_rht_rejects_indivisible_dims():
    with pytest.raises(ValueError, match="not divisible by 16"):
        rht(torch.randn(3, 20))


def test_pack_layout_low_nibble_first():
    codes = torch.tensor([[0x1, 0x7, 0x8, 0xF]], dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.tolist() == [[0x71, 0xF8]]
    assert torch.equal(unpack_fp4(packed), codes)


def test_pack_unpack_are_inverses():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 5, 64), generator=g).to(torch.uint8)
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)
    b = torch.randint(0, 256, (7, 10), generator=g).to(torch.uint8)
    assert torch.equal(pack_fp4(unpack_fp4(b)), b)
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))


def test_float4_view_shares_bytes():
    q = fourbit.quantize(torch.randn(2, 32), "nvfp4")
    v = as_float4_x2(q.data)
    assert v.dtype == torch.float4_e2m1fn_x2 and torch.equal(v.view(torch.uint8), q.data)


def test_random_bits_are_a_pure_function_of_seed_and_index():
    idx = torch.arange(100_000)
    a = random_bits(42, idx)
    assert torch.equal(a, torch.cat([random_bits(42, idx[:31_337]), random_bits(42, idx[31_337:])]))
    assert int(a.min()) >= 0 and int(a.max()) < 2**32
    assert (a != random_bits(43, idx)).float().mean() > 0.99
    # uniform: each of 16 equal bins of u holds 1/16 of the draws within 5 sigma
    u = uniform24(a)
    counts = torch.bincount((u * 16).long(), minlength=16).double()
    expected = idx.numel() / 16
    assert ((counts - expected).abs() < 5 * np.sqrt(expected)).all()
    # high indices (past 2^32) mix their upper word too
    big = torch.tensor([5, 5 + 2**32])
    assert random_bits(1, big)[0] != random_bits(1, big)[1]


def test_fwht_is_the_sylvester_matrix_product():
    """Butterflies = x . H exactly on integers (every partial sum is exactly representable)."""
    from fourbit.hadamard import fwht

    x = torch.randint(-1000, 1000, (64, 16)).double()
    assert torch.equal(fwht(x), x @ hadamard_matrix(16, torch.float64))
    y = torch.randint(-1000, 1000, (8, 32)).double()
    assert torch.equal(fwht(y), y @ hadamard_matrix(32, torch.float64))


def test_rht_float32_is_the_matrix_product_to_rounding():
    """float32 butterflies vs the float64 matrix product: 4 roundings of partial sums bounded by sum |x|."""
    from fourbit.hadamard import rht_matrix

    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(4))
    got = rht(x).double()
    want = (x.double().reshape(-1, 16) @ rht_matrix(dtype=torch.float64)).reshape(x.shape)
    bound = 4 * 2.0**-24 * (x.double().abs().reshape(-1, 16).sum(-1, keepdim=True) / 4).expand(-1, 16).reshape(x.shape)
    assert ((got - want).abs() <= bound).all()
