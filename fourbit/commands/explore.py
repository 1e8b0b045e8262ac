"""``fourbit explore``: PNGs of NVFP4 vs MXFP4 vs FP8 error for a tensor file or a model's Linear weights."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explore", help="plot NVFP4 vs MXFP4 vs FP8 block error, NVFP4 block scales, flush-to-zero")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tensor", metavar="FILE.pt", help="a torch.save'd tensor or dict of tensors")
    src.add_argument("--model", metavar="PATH", help="'smollm2', a .gguf file or a Hugging Face directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where the PNGs go")
    p.add_argument("--limit", type=int, default=None, help="explore only the first N tensors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..explore import EXPLORE_SCHEMES, explore, summarize

    tensors = _load(args)
    summary = summarize(tensors)
    for path in explore(tensors, args.out, title=args.model or "", summary=summary):
        print(f"wrote {path}")
    rows = summary["per_layer"].values()
    print(f"{'scheme':<8}{'mean SQNR dB':>14}{'flushed %':>11}{'median block rel. error':>25}")
    for s in EXPLORE_SCHEMES:
        sq = sum(r[s]["sqnr_db"] for r in rows) / len(rows)
        fl = 100 * sum(r[s]["flushed"] for r in rows) / len(rows)
        print(f"{s:<8}{sq:>14.2f}{fl:>11.2f}{float(summary['block_errors'][s].median()):>25.4f}")
    return 0


def _load(args: argparse.Namespace) -> dict:
    """``load_tensors`` with a bad ``--tensor`` file named: missing, empty, truncated, not torch.save'd."""
    import pickle

    from ..explore import load_tensors

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of tensors, got {args.limit}")
    if args.tensor is None:
        return load_tensors(tensor=None, model=args.model, limit=args.limit)
    try:
        return load_tensors(tensor=args.tensor, model=None, limit=args.limit)
    except (EOFError, pickle.UnpicklingError, RuntimeError) as e:
        what = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"--tensor {args.tensor!r} is not a readable torch.save'd file ({what})") from None
    except ValueError as e:
        raise ValueError(f"--tensor {args.tensor!r}: {e}") from None
