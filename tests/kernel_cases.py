"""Inputs and comparisons shared by the kernel tests (GPU and Triton-interpreter runs).

Bit-exactness is judged on raw bytes: packed codes (uint8), scales viewed as uint8, the tensor scale viewed
as int32, all at zero tolerance. The oracle is ``fourbit.quantize(..., backend="reference")`` on the CPU.
GEMM oracles are float64 products of the dequantized operands (operands on the grid, so only the
accumulation order differs).
"""

from __future__ import annotations

import torch

import fourbit
from fourbit.formats import E2M1

# fp32 accumulation of K exact products: |err| <= gamma_K * sum |a_i b_i| with gamma_K ~ K * 2^-24; the
# tensor cores add in blocks whose internal alignment may drop a few more bits: allow twice that, plus
# the epilogue's tensor-scale multiplies (a few roundings).
def accumulation_bound(K: int) -> float:
    return (2 * K + 8) * 2.0**-24


# one bf16 rounding of the output (8 significant bits): half an ulp, at most 2^-8 relative, for
# round-to-nearest; Triton's CPU interpreter truncates instead: one ulp, 2^-7
BF16_OUT_RTOL = 2.0**-8
BF16_TRUNC_RTOL = 2.0**-7


def quant_bytes(q):
    ts = torch.zeros((), dtype=torch.int32) if q.tensor_scale is None else q.tensor_scale.reshape(()).view(torch.int32)
    return q.data.cpu(), q.scales.reshape(-1).view(torch.uint8).cpu(), ts.cpu()  # no tensor scale (MX): 0


def assert_same_bytes(got, want):
    gd, gs, gt = quant_bytes(got)
    wd, ws, wt = quant_bytes(want)
    assert gd.shape == wd.shape and gs.shape == ws.shape, (gd.shape, wd.shape, gs.shape, ws.shape)
    nd = int((gd != wd).sum())
    ns = int((gs != ws).sum())
    assert nd == 0 and ns == 0 and torch.equal(gt, wt), (
        f"{nd} code bytes and {ns} scales differ; tensor scale {gt.view(torch.float32).item()!r} vs "
        f"{wt.view(torch.float32).item()!r}"
    )


def edge_input(kind: str, shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Random and edge-case matrices (built in float32, then cast to ``dtype``)."""
    R, C = shape
    if kind == "random":
        x = torch.randn(R, C, generator=gen) * torch.exp(torch.randn(R, 1, generator=gen) * 2)
    elif kind == "zeros":
        x = torch.zeros(R, C)
        x[0, 1] = -0.0
    elif kind == "denormals":
        tiny = torch.finfo(dtype).tiny
        x = torch.randn(R, C, generator=gen) * tiny * 0.3  # mostly subnormal in dtype
    elif kind == "huge":
        x = torch.randn(R, C, generator=gen).sign() * torch.finfo(dtype).max * torch.rand(R, C, generator=gen)
    elif kind == "ties":
        # per 16-block: amax 6 (exact scales with s_enc = 448), other entries on E2M1 midpoints
        mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 3.0])
        idx = torch.randint(0, len(mids), (R, C), generator=gen)
        x = mids[idx] * torch.where(torch.rand(R, C, generator=gen) < 0.5, -1.0, 1.0)
        x[:, ::16] = 6.0
        x = x * torch.exp2(torch.randint(-3, 4, (R, 1), generator=gen).float())
    elif kind == "mixed_scale":
        # block amaxes spread over 40 binades: E4M3 scales saturate, underflow and go subnormal
        binades = torch.randint(-30, 10, (R, -(-C // 16)), generator=gen).float()  # one per 16 columns, last cut
        x = torch.randn(R, C, generator=gen) * torch.exp2(binades).repeat_interleave(16, 1)[:, :C]
    else:
        raise ValueError(kind)
    return x.to(dtype)


def grid_operand(rows: int, K: int, gen: torch.Generator, block=(1, 16)):
    """An NVFP4 QuantizedTensor (reference path) of a random matrix with varied block scales."""
    x = torch.randn(rows, K, generator=gen) * torch.exp2(torch.randint(-4, 5, (rows, 1), generator=gen).float())
    return fourbit.quantize(x, "nvfp4", block=block, pad=True, backend="reference")


def gemm_check(out: torch.Tensor, a_hat: torch.Tensor, b_hat: torch.Tensor, rtol_out: float = 0.0):
    """|out - A B^T| <= bound(K) * |A| |B|^T + rtol_out * |A B^T|, elementwise, in float64."""
    a64, b64 = a_hat.double().reshape(-1, a_hat.shape[-1]), b_hat.double()
    ref = a64 @ b64.T
    mag = a64.abs() @ b64.abs().T
    err = (out.double().reshape(ref.shape).cpu() - ref).abs()
    bound = accumulation_bound(a64.shape[1]) * mag + rtol_out * ref.abs()
    worst = float((err - bound).max())
    assert worst <= 0, f"error exceeds the bound by {worst:.3g} (max err {float(err.max()):.3g})"
    assert torch.isfinite(out).all()


E2M1_VALUES = E2M1.values()


def block_values(q) -> torch.Tensor:
    """float64 e2m1(code) * e4m3(block scale) of an NVFP4 QuantizedTensor, as (padded rows, padded cols): the
    OCP table and torch's own E4M3 decode, an oracle independent of the kernels' bit tricks."""
    codes = q.codes().long().reshape(-1, q.data.shape[-1] * 2)
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)  # OCP MX v1.0, table 5
    values = torch.where(codes >= 8, -e2m1[codes % 8], e2m1[codes % 8])
    br = q.config.block[0]
    scale = q.scales.view(torch.float8_e4m3fn).double().reshape(-1, codes.shape[1] // 16)
    return values * scale.repeat_interleave(br, 0).repeat_interleave(16, 1)
