"""``fourbit diagnose``: per-layer, per-GEMM error, gradient bias and operand statistics of each recipe on
one real training step (see ``fourbit.diagnose``).

    fourbit diagnose --model runs/bf16-tiny-seed0 --out runs/diagnose       # a harness checkpoint, its val text
    fourbit diagnose --model preset:tiny --trials 16                        # the preset at initialization
    fourbit diagnose --model smollm2 --text ruth.txt --layers 'layers\\.(0|29)\\.'   # an HF / GGUF causal LM
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="per-layer GEMM errors, SR gradient bias, RHT SQNR, flush-to-zero per recipe")
    p.add_argument("--model", default="preset:tiny",
                   help="a `fourbit train` run directory, preset:<name> (fresh init), 'smollm2', a .gguf or HF dir")  # fmt: skip
    p.add_argument("--text", default=None, help="held-out text file (HF models; harness models use their val split)")
    p.add_argument("--recipes", default=",".join(_default_recipes()), help="comma-separated recipe names")
    p.add_argument("--trials", type=int, default=8, help="stochastic-rounding seeds per GEMM (N)")
    p.add_argument("--batches", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", default=None, help="regex: only Linears whose name matches")
    p.add_argument("--out", default="runs/diagnose", help="writes diagnose.md, diagnose.json, diagnose.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _default_recipes() -> tuple[str, ...]:
    from ..diagnose import DEFAULT_RECIPES

    return DEFAULT_RECIPES


def load_model_and_tokens(spec: str, text: str | None):
    """(model, 1-D held-out token ids, description) for ``--model``."""
    from pathlib import Path

    import torch

    from ..eval import is_harness_run, load_harness_run, load_hf_model

    if spec.startswith("preset:"):
        from ..harness.data import load_tokens
        from ..harness.model import GPT, get_preset
        from ..harness.train import train_config

        name = spec.split(":", 1)[1]
        cfg = train_config(name)
        data = load_tokens(cfg.tokenizer, cfg.data_dir)
        torch.manual_seed(0)
        return GPT(get_preset(name, vocab_size=data.vocab_size)), data.val, f"preset {name} at initialization (seed 0)"
    if is_harness_run(spec):
        model, ids = load_harness_run(spec)
        return model, ids, f"harness run {spec}"
    if text is None:
        raise ValueError("--text FILE is required for a Hugging Face / GGUF model")
    model, tok = load_hf_model(spec)
    if tok is None:
        raise ValueError(f"{spec}: no tokenizer found next to the model")
    return model, tok(Path(text).read_text(), return_tensors="pt").input_ids[0], f"{spec} on {Path(text).name}"


def run(args: argparse.Namespace) -> int:
    import json
    import re
    import time
    from pathlib import Path

    from .. import diagnose as dg

    t0 = time.time()
    model, ids, what = load_model_and_tokens(args.model, args.text)
    need = args.batches * args.batch_size * args.seq_len
    if ids.numel() < need:
        raise ValueError(f"{what}: {ids.numel()} held-out tokens, fewer than the {need} asked for")
    windows = ids[:need].reshape(args.batches, args.batch_size, args.seq_len)
    pattern = re.compile(args.layers) if args.layers else None
    include = None
    if pattern is not None:
        include = lambda name, m: bool(pattern.search(name)) and not name.endswith("lm_head")  # noqa: E731
    layers = dg.capture(model, list(windows), include=include)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    results = dg.diagnose(layers, recipes, trials=args.trials, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = (f"{what}; {len(layers)} Linears; one fp32 step on {need} held-out tokens ({args.batches} x "
             f"{args.batch_size} x {args.seq_len}); N = {args.trials} stochastic-rounding seeds per GEMM.")  # fmt: skip
    (out / "diagnose.md").write_text(dg.markdown(results, setup=setup))
    (out / "diagnose.json").write_text(json.dumps({"setup": setup, "results": dg.results_json(results)}, indent=1))
    dg.plot(results, out / "diagnose.png")
    print(dg.markdown(results, setup=setup).split("## Per layer")[0])
    print(f"wrote {out}/diagnose.md, diagnose.json, diagnose.png in {time.time() - t0:.0f}s")
    return 0
