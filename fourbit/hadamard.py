"""Random Hadamard transform (RHT) over blocks of 16.

``H16`` is the 16x16 Sylvester Hadamard matrix (entries +-1, ``H H^T = 16 I``). With a fixed random sign
vector ``s``, the transform of a row block is ``x . diag(s) . H16 / 4``: orthogonal, so applying it to both
operands of a GEMM along the reduction dim leaves the exact product unchanged,

    (A D H/4)(B D H/4)^T = A D (H H^T / 16) D B^T = A B^T,

while spreading each block's outliers over its 16 entries before 4-bit quantization (NVFP4 recipe,
arXiv 2509.25149: 16x16 RHT on both Wgrad inputs along the token dim, one sign vector for the run).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .rounding import random_bits

__all__ = ["hadamard_matrix", "random_signs", "RHT", "rht", "rht_matrix"]

RHT_SIZE = 16
DEFAULT_RHT_SEED = 0x5EED


def hadamard_matrix(n: int = RHT_SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sylvester construction: H_1 = [1], H_2n = [[H, H], [H, -H]] (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def random_signs(seed: int = DEFAULT_RHT_SEED, n: int = RHT_SIZE) -> torch.Tensor:
    """A fixed +-1 vector from the counter-based generator (the same on every device)."""
    bits = random_bits(seed, torch.arange(n))
    return torch.where((bits >> 31) == 1, -1.0, 1.0)


def rht_matrix(seed: int = DEFAULT_RHT_SEED, n: int = RHT_SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """diag(s) . H / sqrt(n): multiply row vectors on the right."""
    return (random_signs(seed, n).to(dtype)[:, None] * hadamard_matrix(n, dtype)) / (n**0.5)


@dataclass(frozen=True)
class RHT:
    """A random Hadamard transform: block size and the seed of its sign vector."""

    size: int = RHT_SIZE
    seed: int = DEFAULT_RHT_SEED

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return rht_matrix(self.seed, self.size, dtype)

    def __call__(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return rht(x, dim, transform=self)


@functools.lru_cache(maxsize=64)
def _signs_on(transform: RHT, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The transform's sign vector, built once per (transform, dtype, device)."""
    return random_signs(transform.seed, transform.size).to(dtype=dtype, device=device)


def fwht(blocks: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dim (a power of two): ``blocks . H``.

    Butterflies from the widest stride down, ``(a, b) -> (a + b, a - b)`` with ``a`` the element whose index
    has the stride's bit clear: ``log2(n)`` roundings per output in a fixed order, which the fused Triton
    kernel repeats operation for operation (a matmul's summation order is the library's choice).
    """
    n = blocks.shape[-1]
    lead = blocks.shape[:-1]
    d = n // 2
    while d >= 1:
        y = blocks.reshape(*lead, n // (2 * d), 2, d)
        a, b = y[..., 0, :], y[..., 1, :]
        blocks = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        d //= 2
    return blocks


def rht(x: torch.Tensor, dim: int = -1, *, transform: RHT = RHT()) -> torch.Tensor:
    """Apply the RHT to consecutive blocks of ``transform.size`` along ``dim`` (float32 or float64 math).

    ``y = fwht(x * s) / sqrt(n)``: the sign flips and the final power-of-two scaling (n = 16: 1/4) are exact,
    so the butterflies are the only roundings."""
    n = transform.size
    if x.shape[dim] % n:
        raise ValueError(f"rht: dim {dim} of shape {tuple(x.shape)} is not divisible by {n}")
    if n & (n - 1) or n > 256:
        raise ValueError(f"rht: block size must be a power of two up to 256, got {n}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xt = x.to(dtype).movedim(dim, -1)
    blocks = xt.reshape(*xt.shape[:-1], -1, n) * _signs_on(transform, dtype, x.device)  # (..., C/n, n)
    inv_sqrt_n = 2.0 ** (-(n.bit_length() - 1) / 2)  # 1/4 for n = 16 (exact for even log2 n)
    out = (fwht(blocks) * inv_sqrt_n).reshape(xt.shape)
    return out.movedim(-1, dim)
