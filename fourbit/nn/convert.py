"""Model conversion: swap ``nn.Linear`` for ``QuantLinear`` in place, and manage the run-time state.

``convert(model, recipe)`` walks the model's ``nn.Linear`` modules in ``named_modules()`` order (their
index is the layer id used to seed stochastic rounding) and replaces each by a ``QuantLinear`` that
shares the same Parameter objects (so ``state_dict`` keys, optimizer state and weight tying survive),
except where a layer stays high precision:

    never quantized   a Linear whose weight is an ``nn.Embedding``'s (tied LM head); a Linear named
                      ``lm_head``/``embed_out``, or one outside the repeated blocks projecting onto an
                      embedding's vocabulary; ``out_proj`` of ``nn.MultiheadAttention`` (used functionally)
    skip(name, m)     the user's predicate returns True
    recipe blocks     the Linears of the blocks chosen by ``recipe.high_precision``; the blocks are the
                      children of the model's largest ``nn.ModuleList``/``nn.Sequential`` whose children
                      contain Linears (a GPT's ``transformer.h``, Hugging Face's ``model.layers``)
    block mismatch    in/out features not multiples of the recipe's block dims: ``ValueError`` naming the
                      module, or kept with ``on_mismatch="skip"``

Run-time state (the training loop calls these):

    set_recipe(model, recipe)      change the GEMM recipe of every converted layer (which layers are
                                   quantized was decided by ``convert``)
    set_progress(model, fraction)  training progress in [0, 1], each step, for ``switch_to_bf16_at``
    rng_state(model) / load_rng_state(model, state)
                                   every QuantLinear's step counter (the stochastic-rounding stream), a
                                   JSON-able dict to save with a checkpoint; counters advance by one per
                                   training forward automatically
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..recipes import Recipe, get_recipe
from .linear import DataParallel, QuantLinear, check_features

__all__ = [
    "LayerReport",
    "ConversionReport",
    "convert",
    "find_blocks",
    "set_recipe",
    "set_progress",
    "rng_state",
    "load_rng_state",
    "quant_linears",
    "set_data_parallel",
]

HEAD_NAMES = ("lm_head", "embed_out")  # nanoGPT / Llama / GPT-2 (HF) and GPT-NeoX LM heads
ON_MISMATCH = ("raise", "skip")
_COMPILE_PREFIX = "_orig_mod."  # torch.compile's OptimizedModule wraps the model under this name

QUANTIZED = "QuantLinear"
KEPT = "nn.Linear"


@dataclass(frozen=True)
class LayerReport:
    """One Linear of the model and what convert made of it."""

    name: str
    in_features: int
    out_features: int
    became: str  # "QuantLinear" (or "QATLinear" from qat), or "nn.Linear": kept in high precision
    reason: str  # why it was kept, or the recipe it runs


@dataclass(frozen=True)
class ConversionReport:
    """Every ``nn.Linear`` of a model and what it became; ``print(report)`` gives a table."""

    recipe: str
    layers: tuple[LayerReport, ...]

    @property
    def quantized(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.layers if r.became != KEPT)

    @property
    def kept(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.layers if r.became == KEPT)

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        w = max([len("module")] + [len(r.name) for r in self.layers])
        head = f"{'module':<{w}}  {'in':>6}  {'out':>6}  {'became':<11}  reason"
        rows = [f"{r.name:<{w}}  {r.in_features:>6}  {r.out_features:>6}  {r.became:<11}  {r.reason}" for r in self.layers]
        total = (
            f"recipe {self.recipe}: {len(self.quantized)} of {len(self.layers)} linear layers quantized, "
            f"{len(self.kept)} kept in high precision"
        )
        return "\n".join([head, "-" * len(head), *rows, total])


def find_blocks(model: nn.Module) -> tuple[str, list[str]] | None:
    """The model's repeated blocks: (container name, child names) of the largest ModuleList/Sequential
    whose children contain Linears (at least two); None if there is none."""
    best: tuple[str, list[str]] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = [n for n, c in m.named_children() if any(isinstance(s, nn.Linear) for s in c.modules())]
        if len(kids) >= 2 and (best is None or len(kids) > len(best[1])):
            best = (name, kids)
    return best


def _block_index(name: str, blocks: tuple[str, list[str]] | None) -> int | None:
    if blocks is None:
        return None
    prefix = f"{blocks[0]}." if blocks[0] else ""
    for i, kid in enumerate(blocks[1]):
        full = prefix + kid
        if name == full or name.startswith(full + "."):
            return i
    return None


def _never_quantized(model: nn.Module, blocks) -> dict[str, str]:
    """Linears that stay high precision whatever the recipe, with the reason."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    emb_weights = {id(m.weight) for m in embeddings}
    vocab_sizes = {m.num_embeddings for m in embeddings}
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            for child, sub in m.named_children():
                if isinstance(sub, nn.Linear):
                    out[f"{name}.{child}" if name else child] = "inside nn.MultiheadAttention (used functionally)"
        if not isinstance(m, nn.Linear) or name in out:
            continue
        if id(m.weight) in emb_weights:
            out[name] = "weight tied to an embedding"
        elif name.rsplit(".", 1)[-1] in HEAD_NAMES:
            out[name] = "LM head"
        elif m.out_features in vocab_sizes and _block_index(name, blocks) is None:
            out[name] = "projects onto the vocabulary (LM head)"
    return out


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_swap_args(fn: str, model, skip, on_mismatch: str) -> None:
    """The argument checks shared by ``convert`` and ``qat``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} expects an nn.Module, got {type(model).__name__}")
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch must be one of {ON_MISMATCH}, got {on_mismatch!r}")
    if skip is not None and not callable(skip):
        raise TypeError(f"skip must be a callable (name, module) -> bool, got {type(skip).__name__}")


def convert(
    model: nn.Module,
    recipe: Recipe | str,
    *,
    skip: Callable[[str, nn.Module], bool] | None = None,
    on_mismatch: str = "raise",
) -> ConversionReport:
    """Swap the model's ``nn.Linear`` modules for ``QuantLinear`` in place (see the module docstring)."""
    check_swap_args("convert", model, skip, on_mismatch)
    recipe = get_recipe(recipe)

    blocks = find_blocks(model)
    hp_blocks = recipe.high_precision.blocks(len(blocks[1])) if blocks else frozenset()
    never = _never_quantized(model, blocks)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    plan: list[tuple[str, nn.Linear, int, str | None]] = []  # (name, module, layer id, reason kept or None)
    for layer_id, (name, m) in enumerate(linears):
        block = _block_index(name, blocks)
        if name in never:
            reason = never[name]
        elif skip is not None and skip(name, m):
            reason = "skip() returned True"
        elif block is not None and block in hp_blocks:
            reason = f"high-precision block {block} of {len(blocks[1])}"
        else:
            reason = None
            try:
                check_features(recipe, m.in_features, m.out_features, f"module {name!r}")
            except ValueError as e:
                if on_mismatch == "raise":
                    raise ValueError(f"convert: {e} (pass on_mismatch='skip' to keep it in high precision)") from None
                reason = f"features not multiples of {recipe.feature_multiple()}"
        plan.append((name, m, layer_id, reason))

    rows = []
    for name, m, layer_id, reason in plan:  # mutate only after every layer has been checked
        if reason is None:
            _set_child(model, name, QuantLinear.from_linear(m, recipe, layer_id=layer_id))
            rows.append(LayerReport(name, m.in_features, m.out_features, QUANTIZED, recipe.name))
        else:
            if type(m) is not nn.Linear:  # converted before: back to a plain nn.Linear, same Parameters
                _set_child(model, name, as_plain_linear(m))
            rows.append(LayerReport(name, m.in_features, m.out_features, KEPT, reason))
    return ConversionReport(recipe.name, tuple(rows))


def as_plain_linear(m: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` sharing ``m``'s Parameters (undoes QuantLinear / QATLinear)."""
    plain = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
    plain.weight, plain.bias = m.weight, m.bias
    plain.train(m.training)
    return plain


def quant_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    """(name, module) of every QuantLinear, names without torch.compile's ``_orig_mod.`` prefix."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return [(n.replace(_COMPILE_PREFIX, ""), m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def set_recipe(model: nn.Module, recipe: Recipe | str) -> int:
    """Give every QuantLinear of the model a new recipe (all checked before any changes); returns their count."""
    recipe = get_recipe(recipe)
    layers = quant_linears(model)
    for name, m in layers:
        check_features(recipe, m.in_features, m.out_features, f"module {name!r}")
    for _, m in layers:
        m.recipe = recipe
    return len(layers)


def set_progress(model: nn.Module, fraction: float) -> int:
    """Tell every QuantLinear how far training is (``step / total_steps`` in [0, 1]); returns their count.

    Only recipes with ``switch_to_bf16_at`` use it; call it each step (or at least once the switch is due).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"set_progress: fraction must be a number in [0, 1], got {fraction!r}")
    layers = quant_linears(model)
    for _, m in layers:
        m.progress = float(fraction)
    return len(layers)


def set_data_parallel(model: nn.Module, group=None) -> int:
    """Make every QuantLinear quantize its data-parallel shard as a single process would the whole batch.

    ``group``: the process group the per-tensor amaxes are all-reduced over (default: a new group of all
    ranks, so the reductions never interleave with the gradient collectives). ``None`` without an
    initialized process group turns it off. Returns the number of layers. Each rank must hold an equal
    number of tokens per step.
    """
    layers = quant_linears(model)
    parallel = None
    if dist.is_available() and dist.is_initialized():
        group = group if group is not None else dist.new_group(backend=dist.get_backend())
        parallel = DataParallel(group, dist.get_rank(group), dist.get_world_size(group))
    for _, m in layers:
        m.parallel = parallel
    return len(layers)


def use_device_seeds(model: nn.Module, enabled: bool = True) -> int:
    """Check that every QuantLinear's stochastic-rounding step counter lives in CUDA memory, as a CUDA graph
    needs (kept for callers of earlier versions: the counter is now always a buffer on the weight's device,
    and on CUDA each forward computes its keys there). Returns the layer count."""
    layers = quant_linears(model)
    if enabled:
        off_gpu = [name for name, m in layers if m._counter.device.type != "cuda"]
        if off_gpu:
            device = dict(layers)[off_gpu[0]]._counter.device
            raise ValueError(f"use_device_seeds needs CUDA parameters (the counters live in device memory); "
                             f"{', '.join(off_gpu[:3])}{' ...' if len(off_gpu) > 3 else ''} on {device}")  # fmt: skip
    return len(layers)


def rng_state(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{layer name: {"layer_id": int, "step": int}}`` for every QuantLinear (JSON-able)."""
    return {name: {"layer_id": m.layer_id, "step": m.step} for name, m in quant_linears(model)}


def load_rng_state(model: nn.Module, state: dict[str, dict[str, int]]) -> None:
    """Restore the counters saved by ``rng_state``; the model must have the same QuantLinears."""
    if not isinstance(state, dict):
        raise TypeError(f"load_rng_state expects the dict from rng_state, got {type(state).__name__}")
    layers = dict(quant_linears(model))
    state = {k.replace(_COMPILE_PREFIX, ""): v for k, v in state.items()}
    missing, unexpected = sorted(set(layers) - set(state)), sorted(set(state) - set(layers))
    if missing or unexpected:
        raise ValueError(f"load_rng_state: QuantLinears differ; missing {missing}, unexpected {unexpected}")
    for name, s in state.items():
        step, layer_id = s.get("step"), s.get("layer_id")
        if not isinstance(step, int) or step < 0 or not isinstance(layer_id, int):
            raise ValueError(f"load_rng_state: bad entry for {name!r}: {s!r}")
        if layer_id != layers[name].layer_id:
            raise ValueError(f"load_rng_state: {name!r} has layer_id {layers[name].layer_id}, state says {layer_id}")
    for name, s in state.items():
        layers[name].step = s["step"]
