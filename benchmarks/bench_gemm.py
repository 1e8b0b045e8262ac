"""GEMM speed against cuBLAS BF16 ``F.linear`` measured in the same run.

* emulated NVFP4 x NVFP4 (``fourbit.kernels.qmm``) at M = N = K = 8192: the default dispatch (dequantize
  to BF16, then an autotuned Triton GEMM), each of its tiles, dequantize + cuBLAS, the in-register kernel;
* the same on the 12 GEMM shapes of one block of the evidence harness's ``gpu`` preset (``train``);
* W4A16 NVFP4 GEMV / skinny GEMM, x (B, 8192) . W (28672, 8192)^T for B = 1, 4, 8, 16: the default
  dispatch and each config of the kernel that serves that batch;
* FP8 through ``scaled_mm``: per tensor and DeepSeek blockwise (1x128 x 128x128) at 8192^3.

Quantization is outside the timed region (operands quantized once). Prints compiler facts for the
Triton kernels (registers, spills, whether wgmma was used).

    PYTHONPATH=. python benchmarks/bench_gemm.py [--parts qmm train fp8 w4a16]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import median_ms, device_header

import fourbit
from fourbit.kernels import fp8_mm
from fourbit.kernels import dequant_gemm as dq
from fourbit.kernels import nvfp4_gemm as g


def kernel_facts(kernel) -> list[str]:
    try:
        return _kernel_facts(kernel)
    except Exception as e:  # triton internals move between versions; facts are a nicety
        return [f"  (no compiler facts: {type(e).__name__}: {e})"]


def _kernel_facts(kernel) -> list[str]:
    facts = []
    for per_device in kernel.device_caches.values() if hasattr(kernel, "device_caches") else [kernel.cache]:
        cache = per_device[0] if isinstance(per_device, tuple) else per_device
        for compiled in cache.values():
            ptx = compiled.asm.get("ptx", "")
            c = compiled.metadata
            facts.append(
                f"  regs {compiled.n_regs}, spills {compiled.n_spills}, shared {c.shared} B, warps {c.num_warps}, "
                f"stages {c.num_stages}, wgmma {'wgmma' in ptx}, mma.sync {'mma.sync' in ptx}"
            )
    return facts


def main() -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--parts", nargs="+", default=["qmm", "train", "fp8", "w4a16"], choices=["qmm", "train", "fp8", "w4a16"])
    parts = p.parse_args().parts
    print(device_header())
    rows = []
    M = N = K = 8192
    flop = 2 * M * N * K
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    bf16_ms = median_ms(lambda: F.linear(a, b))
    rows.append(("cuBLAS BF16 F.linear 8192^3", bf16_ms, flop / bf16_ms / 1e9, 1.0))

    qa, qb = fourbit.quantize(a, "nvfp4"), fourbit.quantize(b, "nvfp4")
    # (label, method, config): the default dispatch (dequantize to BF16, autotuned GEMM), each GEMM tile of
    # that path and the cuBLAS variant
    qmm_cases = [("default dispatch (dequant, autotuned)", None, None), ("dequant + cuBLAS", "cublas", None)]
    qmm_cases += [(f"dequant, tile {t}", "dequant", t) for t in dq.GEMM_TILES]
    qmm_cases = qmm_cases if "qmm" in parts else []
    ref = F.linear(qa.dequantize(torch.bfloat16), qb.dequantize(torch.bfloat16)).float() if qmm_cases else None
    for label, method, cfg in qmm_cases:
        try:
            def run(method=method, cfg=cfg):
                return g.qmm(qa, qb, config=cfg, method=method, out_dtype=torch.bfloat16)

            rel = float((run().float() - ref).norm() / ref.norm())
            ms = median_ms(run)
            rows.append((f"NVFP4 qmm 8192^3 {label} (rel err vs bf16 {rel:.1e})", ms, flop / ms / 1e9, bf16_ms / ms))
        except Exception as e:  # a config that does not fit (shared memory) is reported, not fatal
            rows.append((f"NVFP4 qmm {label}: {type(e).__name__}: {str(e)[:80]}", float("nan"), float("nan"), float("nan")))
    if qmm_cases:
        ma, mb = g._nvfp4_matrix(qa, "a"), g._nvfp4_matrix(qb, "b")
        ms = median_ms(lambda: dq.dequantize_bf16(ma[0], ma[1], ma[5], K))
        gbs = M * K * (0.5 + 1 / 16 + 2) / ms / 1e6
        rows.append((f"  of which: dequantize one 8192^2 operand to BF16 ({gbs:.0f} GB/s)", ms, float("nan"), float("nan")))
        print("dequant GEMM kernel (autotuned):", *kernel_facts(dq._scaled_gemm_kernel.fn), sep="\n")
    del qa, qb, ref

    # the gpu preset's GEMMs (16,384 tokens, C = 768, SwiGLU H = 2048): fprop, dgrad and wgrad of each
    # linear against cuBLAS BF16 on the same shapes (BF16 out, as in training). Per shape: qmm from packed
    # operands (two dequantize passes + the Triton BF16 GEMM), the Triton GEMM alone on BF16 operands (what
    # QuantLinear's dequantized path runs; dgrad's B a transposed view, as there) and cuBLAS on the same
    # operands with FP32 out plus a tensor-scale pass (the alternative for the GEMM).
    if "train" in parts:
        T = 16384
        totals = [0.0] * 4
        one = torch.ones(1, device="cuda")
        for name, n_in, n_out in (("c_attn", 768, 2304), ("attn.c_proj", 768, 768), ("c_fc", 768, 4096), ("mlp.c_proj", 2048, 768)):
            for gemm, (m_, n_, k_) in (("fprop", (T, n_out, n_in)), ("dgrad", (T, n_in, n_out)), ("wgrad", (n_out, n_in, T))):
                x = torch.randn(m_, k_, device="cuda", dtype=torch.bfloat16)
                y = torch.randn(n_, k_, device="cuda", dtype=torch.bfloat16)
                y16 = y.T.contiguous().T if gemm == "dgrad" else y  # dgrad's W^T: a view of fprop's (N, K) W
                qx, qy = fourbit.quantize(x, "nvfp4"), fourbit.quantize(y, "nvfp4")
                times = [
                    median_ms(lambda: F.linear(x, y)),
                    median_ms(lambda: g.qmm(qx, qy, out_dtype=torch.bfloat16)),
                    median_ms(lambda: dq.scaled_gemm(x, y16, one, one, torch.bfloat16)),
                    median_ms(lambda: (torch.mm(x, y16.T, out_dtype=torch.float32) * one).to(torch.bfloat16)),
                ]
                totals = [a + b for a, b in zip(totals, times)]
                f = 2 * m_ * n_ * k_
                t_bf16, t_q, t_tri, t_cub = times
                rows.append((f"gpu preset {name} {gemm} {m_}x{n_}x{k_}: NVFP4 qmm (BF16 {t_bf16:.4f} ms)", t_q, f / t_q / 1e9, t_bf16 / t_q))
                rows.append((f"  same, Triton scaled GEMM on BF16 operands / cuBLAS FP32 out + scale pass {t_cub:.4f} ms "
                             f"({t_bf16 / t_cub:.2f}x)", t_tri, f / t_tri / 1e9, t_bf16 / t_tri))  # fmt: skip
        t_bf16, t_q, t_tri, t_cub = totals
        rows.append((f"gpu preset, all 12 GEMMs of one block: NVFP4 qmm (BF16 {t_bf16:.4f} ms)", t_q, float("nan"), t_bf16 / t_q))
        rows.append((f"  same: Triton scaled GEMM alone / cuBLAS FP32 + scale pass {t_cub:.4f} ms ({t_bf16 / t_cub:.2f}x)",
                     t_tri, float("nan"), t_bf16 / t_tri))  # fmt: skip

    fp8_cases = (("tensorwise", None, None), ("blockwise 1x128 x 128x128", (1, 128), (128, 128))) if "fp8" in parts else ()
    for name, ka, kb in fp8_cases:
        fa, fb = fourbit.quantize(a, "fp8", block=ka), fourbit.quantize(b, "fp8", block=kb)
        if fp8_mm(fa, fb) is None:
            rows.append((f"FP8 {name}: unsupported here", float("nan"), float("nan"), float("nan")))
            continue
        ms = median_ms(lambda: fp8_mm(fa, fb))
        rows.append((f"FP8 scaled_mm {name} 8192^3", ms, flop / ms / 1e9, bf16_ms / ms))
    del a, b

    N, K = 28672, 8192
    batches = (1, 4, 8, 16) if "w4a16" in parts else ()
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    qw = fourbit.quantize(w, "nvfp4")
    wbytes = N * K // 2 + N * K // 16  # packed codes + E4M3 scales
    for B in batches:
        x = torch.randn(B, K, device="cuda", dtype=torch.bfloat16)
        lin_ms = median_ms(lambda: F.linear(x, w))
        gb = (N * K * 2) / lin_ms / 1e6
        rows.append((f"cuBLAS BF16 F.linear {B}x{K} . {N}x{K} ({gb:.0f} GB/s of weights)", lin_ms, 2 * B * N * K / lin_ms / 1e9, 1.0))
        ref = F.linear(x.float(), qw.dequantize()).float()
        configs = [None] + (list(g.GEMV_FMA_CONFIGS) if B <= g.FMA_BATCH_LIMIT else [])
        configs += list(g.GEMV_CONFIGS[:1] if B <= g.FMA_BATCH_LIMIT else g.GEMV_CONFIGS[:3])
        for cfg in configs:
            y = g.linear_w4a16(x, qw, config=cfg)
            rel = float((y.float() - ref).norm() / ref.norm())
            ms = median_ms(lambda: g.linear_w4a16(x, qw, config=cfg))
            label = "default dispatch" if cfg is None else cfg
            rows.append((f"W4A16 B={B} {label} ({wbytes / ms / 1e6:.0f} GB/s, rel err {rel:.1e})", ms, 2 * B * N * K / ms / 1e9, lin_ms / ms))
    print("w4a16 tensor-core kernel:", *kernel_facts(g._w4a16_kernel), sep="\n")
    print("w4a16 CUDA-core kernel:", *kernel_facts(g._w4a16_fma_kernel), sep="\n")

    print("\n| what | ms | TFLOP/s | speed-up vs BF16 |")
    print("|---|---|---|---|")
    for name, ms, tf, ratio in rows:
        print(f"| {name} | {ms:.4f} | {tf:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
