"""``fourbit train``: train the harness GPT on Shakespeare (or ``--corpus``) under one recipe (resumable;
Ctrl-C and SIGTERM checkpoint and exit with 128 + the signal). A directory holding a run is refused unless ``--resume``
continues it or ``--overwrite`` deletes it (``docs/training.md``)."""

from __future__ import annotations

import argparse


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``compare`` (None: take the preset's value)."""
    p.add_argument("--preset", default="tiny", help="model and budget: tiny (CPU, minutes), small (CPU, ~30 min "
                   "per recipe), gpu (~100M params, one H100)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--tokenizer", default=None, help="gpt2, gpt2-4k or bytes (default: the preset's)")
    p.add_argument("--corpus", default=None, help="shakespeare (default, 1.6M tokens) or debian-en (~20M GPT-2 "
                   "tokens of English from Debian packages; docs/training.md)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model; default: on for one CUDA device (mode reduce-overhead: Inductor "
                   "and CUDA graphs), off on CPU and under --parallel; --no-compile runs eager")  # fmt: skip
    p.add_argument("--cuda-graph", action="store_true", help="capture the training step in a CUDA graph and "
                   "replay it (one CUDA device, no --parallel, no --compile)")  # fmt: skip
    p.add_argument("--data-dir", default=None, help="token cache and PyPI archives (default ~/.cache/fourbit)")
    p.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default: the "
                   "preset's; one is also written at the end and on Ctrl-C or SIGTERM)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--parallel", default=None, choices=("none", "ddp", "fsdp2"),
                   help="data parallel under torchrun: ddp or fsdp2 (--batch-size is the global batch)")  # fmt: skip


def overrides(args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "tokenizer": args.tokenizer,
            "corpus": args.corpus, "device": args.device, "compile": args.compile,
            "cuda_graph": args.cuda_graph or None,
            "data_dir": args.data_dir, "ckpt_every": args.ckpt_every,
            "parallel": args.parallel}  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the harness GPT on Shakespeare under one recipe")
    p.add_argument("--recipe", default="bf16", help="bf16, fp8, fp8-blockwise, mxfp4, nvfp4, nvfp4-no-sr, ...")
    p.add_argument("--seed", type=int, default=0, help="init, data order and stochastic-rounding seed")
    p.add_argument("--out", default=None, help="run directory (default runs/<recipe>-<preset>-seed<seed>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in <out> from its ckpt.pt")
    mode.add_argument("--overwrite", action="store_true", help="delete the run in <out> and start over "
                      "(without --resume or --overwrite, a directory holding a run is refused)")  # fmt: skip
    add_training_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import signal
    import sys

    from ..harness.train import train, train_config

    cfg = train_config(args.preset, recipe=args.recipe, seed=args.seed, **overrides(args))
    out = args.out or f"runs/{args.recipe}-{args.preset}-seed{args.seed}"
    try:
        train(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt as e:  # harness.train.Interrupted: SIGINT or SIGTERM, checkpoint saved
        print(f"\nfourbit train: {e or 'interrupted'}; resume with --resume --out {out}", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    from ..harness.train import read_metrics

    from ..harness.parallel import finish

    if not finish():
        return 0  # ranks other than 0 of a torchrun job print nothing
    last = [m for m in read_metrics(out) if m.get("val_loss") is not None][-1]
    print(f"{args.recipe}: step {last['step']}, val loss {last['val_loss']:.4f}; metrics in {out}/metrics.jsonl")
    return 0
