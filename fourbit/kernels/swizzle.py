"""The swizzled block-scale layout Blackwell's block-scaled GEMMs read (cuBLAS ``SWIZZLE_32_4_4``).

A scale matrix ``S`` of shape ``(rows, cols)`` (one scale per 1x16 or 1x32 block along K) is padded to
``(round_up(rows, 128), round_up(cols, 4))`` with zeros and cut into 128x4 tiles, stored tile after tile
in row-major tile order; inside a tile, scale ``(r, c)`` goes to byte ``(r % 32) * 16 + (r // 32) * 4 + c``
(32 lanes x 4 row groups x 4 columns). So, with ``n_col_tiles = round_up(cols, 4) / 4``::

    offset(r, c) = ((r // 128) * n_col_tiles + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4

(cuBLAS "1D block scaling factors layout"; PyTorch/torchao ``to_blocked``.) ``to_blocked`` and
``from_blocked`` are inverses on the unpadded region; the tests check both against ``blocked_offset``.
"""

from __future__ import annotations

import torch

__all__ = ["to_blocked", "from_blocked", "blocked_offset"]


def _padded(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // 128) * 128, -(-cols // 4) * 4


def blocked_offset(r: torch.Tensor, c: torch.Tensor, cols: int) -> torch.Tensor:
    """Flat position of scale (r, c) in the swizzled buffer of a matrix with ``cols`` columns."""
    n_col_tiles = -(-cols // 4)
    tile = (r // 128) * n_col_tiles + c // 4
    return tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """(rows, cols) -> flat swizzled buffer of round_up(rows, 128) * round_up(cols, 4) elements."""
    if scales.dim() != 2:
        raise ValueError(f"to_blocked expects a (rows, cols) matrix, got shape {tuple(scales.shape)}")
    rows, cols = scales.shape
    pr, pc = _padded(rows, cols)
    padded = scales.new_zeros((pr, pc))
    padded[:rows, :cols] = scales
    tiles = padded.view(pr // 128, 128, pc // 4, 4).permute(0, 2, 1, 3)  # (row tiles, col tiles, 128, 4)
    # inside a tile: row r = 32 * g + lane -> (lane, g, c)
    return tiles.reshape(pr // 128, pc // 4, 4, 32, 4).transpose(2, 3).reshape(-1)


def from_blocked(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``to_blocked``: the flat swizzled buffer -> (rows, cols)."""
    pr, pc = _padded(rows, cols)
    if blocked.numel() != pr * pc:
        raise ValueError(f"from_blocked: expected {pr * pc} elements for ({rows}, {cols}), got {blocked.numel()}")
    tiles = blocked.reshape(pr // 128, pc // 4, 32, 4, 4).transpose(2, 3)  # (row tiles, col tiles, g, lane, c)
    padded = tiles.reshape(pr // 128, pc // 4, 128, 4).permute(0, 2, 1, 3).reshape(pr, pc)
    return padded[:rows, :cols]
