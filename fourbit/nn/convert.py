"""Model conversion: swap ``nn.Linear`` for ``QuantLinear`` in place, and manage the run-time state.

    model = fourbit.nn.convert(model, "nvfp4")   # the same model object, its Linears swapped in place
    print(fourbit.nn.report(model))              # what became of each Linear, and why

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

It returns the model, as ModelOpt's ``mtq.quantize`` does; a bare ``nn.Linear`` cannot be changed in
place, so for one the new ``QuantLinear`` is returned (use the return value either way). The
``ConversionReport`` is kept on the returned module (``report(model)``), logged on the ``fourbit``
logger, and a conversion that quantizes no Linear, or keeps more than half of those it could quantize,
warns with the reasons (a 2-block model under a recipe that keeps its first and last block quantizes
nothing).

One walk for every layer swap (``convert``, ``qat``, ``fourbit.ptq``):

    plan = plan_linears(model, keep=..., skip=..., check=...)   # decide every Linear, change nothing
    model, rep = swap_linears(model, plan, make, label)         # then swap the chosen ones

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

import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist
from torch import nn

from ..recipes import Recipe, get_recipe
from .linear import DataParallel, QuantLinear, check_features

__all__ = [
    "LayerReport",
    "ConversionReport",
    "PlannedLayer",
    "convert",
    "report",
    "find_blocks",
    "never_quantized",
    "plan_linears",
    "swap_linears",
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
_REPORT_ATTR = "_fourbit_report"  # where the last conversion's report is kept on the returned module
ROOT = "(model)"  # the report's name for a Linear that is the model itself
HP_BLOCK = "high-precision block"  # the reason convert gives for a layer of the recipe's high-precision blocks
MOST = 0.5  # warn when more than this fraction of the quantizable Linears stays in high precision

QUANTIZED = "QuantLinear"
KEPT = "nn.Linear"

log = logging.getLogger("fourbit")


@dataclass(frozen=True)
class LayerReport:
    """One Linear of the model and what convert made of it."""

    name: str
    in_features: int
    out_features: int
    became: str  # "QuantLinear" (or "QATLinear" from qat), or "nn.Linear": kept in high precision
    reason: str  # why it was kept, or the recipe it runs
    always_kept: bool = False  # kept whatever the recipe (tied / LM head / MultiheadAttention)


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

    def summary(self) -> str:
        return (f"recipe {self.recipe}: {len(self.quantized)} of {len(self.layers)} linear layers quantized, "
                f"{len(self.kept)} kept in high precision")  # fmt: skip

    def __str__(self) -> str:
        w = max([len("module")] + [len(r.name) for r in self.layers])
        head = f"{'module':<{w}}  {'in':>6}  {'out':>6}  {'became':<11}  reason"
        rows = [f"{r.name:<{w}}  {r.in_features:>6}  {r.out_features:>6}  {r.became:<11}  {r.reason}" for r in self.layers]
        return "\n".join([head, "-" * len(head), *rows, self.summary()])

    def concern(self) -> str | None:
        """Why this conversion deserves a warning (nothing quantized, or most layers kept), or None."""
        optional = [r for r in self.layers if not r.always_kept]
        kept = [r for r in optional if r.became == KEPT]
        if self.quantized and len(kept) <= MOST * len(optional):
            return None
        shown = "; ".join(f"{r.name}: {r.reason}" for r in kept[:4]) + (" ..." if len(kept) > 4 else "")
        if not self.layers:
            return f"{self.recipe}: the model has no nn.Linear layer to quantize"
        if not optional:
            return f"{self.recipe}: none of the {len(self.layers)} Linear layers can be quantized " + \
                f"({'; '.join(f'{r.name}: {r.reason}' for r in self.layers[:4])})"
        what = "quantized none" if not self.quantized else f"kept {len(kept)} in high precision"
        return f"{self.recipe}: of {len(optional)} quantizable Linear layers, {what} ({shown})"


@dataclass(frozen=True)
class PlannedLayer:
    """One Linear of a planned swap: its name (``""`` for the model itself), module, layer id (index in
    ``named_modules()`` order) and why it stays high precision (``None``: it is swapped)."""

    name: str
    module: nn.Linear
    layer_id: int
    reason: str | None
    always_kept: bool = False


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


def _embedding_weights(model: nn.Module) -> tuple[set[int], set[int]]:
    """ids and (non-zero) data pointers of every embedding weight: a Linear sharing either is tied to one
    (the same Parameter, or another Parameter over the same storage, as some loaders produce)."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    return {id(w) for w in weights}, {w.data_ptr() for w in weights if w.data_ptr()}


def _never_quantized(model: nn.Module, blocks) -> dict[str, str]:
    """Linears that stay high precision whatever the recipe, with the reason."""
    emb_ids, emb_ptrs = _embedding_weights(model)
    vocab_sizes = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            for child, sub in m.named_children():
                if isinstance(sub, nn.Linear):
                    out[f"{name}.{child}" if name else child] = "inside nn.MultiheadAttention (used functionally)"
        if not isinstance(m, nn.Linear) or name in out:
            continue
        if id(m.weight) in emb_ids or (m.weight.data_ptr() and m.weight.data_ptr() in emb_ptrs):
            out[name] = "weight tied to an embedding"
        elif name.rsplit(".", 1)[-1] in HEAD_NAMES:
            out[name] = "LM head"
        elif m.out_features in vocab_sizes and _block_index(name, blocks) is None:
            out[name] = "projects onto the vocabulary (LM head)"
    return out


def never_quantized(model: nn.Module) -> dict[str, str]:
    """``{name: reason}`` of the Linears every swap keeps in high precision: tied to an embedding, LM heads
    (by name, or projecting onto an embedding's vocabulary from outside the blocks), and the Linears
    inside ``nn.MultiheadAttention`` (it calls them functionally, so a swapped module would be bypassed)."""
    return _never_quantized(model, find_blocks(model))


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_swap_args(fn: str, model, skip, on_mismatch: str) -> None:
    """The argument checks shared by ``convert``, ``qat`` and ``plan_linears``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} expects an nn.Module, got {type(model).__name__}")
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch must be one of {ON_MISMATCH}, got {on_mismatch!r}")
    if skip is not None and not callable(skip):
        raise TypeError(f"skip must be a callable (name, module) -> bool, got {type(skip).__name__}")


def plan_linears(
    model: nn.Module,
    *,
    keep: Callable[[str, nn.Linear], str | None] | None = None,
    skip: Callable[[str, nn.Module], bool] | None = None,
    check: Callable[[str, nn.Linear], None] | None = None,
    on_mismatch: str = "raise",
    fn: str = "plan_linears",
) -> list[PlannedLayer]:
    """Decide, without changing anything, what happens to every ``nn.Linear`` of ``model``.

    In order: ``never_quantized`` keeps its layers; ``skip(name, m)`` True keeps one; ``keep(name, m)``
    may return a reason to keep one (convert: the recipe's high-precision blocks); ``check(name, m)``
    raises ``ValueError`` for a layer the swap cannot take: re-raised naming ``fn`` (``on_mismatch="raise"``)
    or the layer is kept with that message (``"skip"``). A model that is itself a Linear is named ``""``.
    """
    check_swap_args(fn, model, skip, on_mismatch)
    never = _never_quantized(model, find_blocks(model))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    plan = []
    for layer_id, (name, m) in enumerate(linears):
        reason = never.get(name)
        if reason is None and skip is not None and skip(name, m):
            reason = "skip() returned True"
        if reason is None and keep is not None:
            reason = keep(name, m)
        if reason is None and check is not None:
            try:
                check(name, m)
            except ValueError as e:
                if on_mismatch == "raise":
                    raise ValueError(f"{fn}: {e} (pass on_mismatch='skip' to keep it in high precision)") from None
                reason = str(e)
        plan.append(PlannedLayer(name, m, layer_id, reason, name in never))
    return plan


def swap_linears(
    model: nn.Module, plan: list[PlannedLayer], make: Callable[[PlannedLayer], nn.Module], label: str
) -> tuple[nn.Module, ConversionReport]:
    """Apply a plan: each layer with no reason becomes ``make(layer)``; a kept one that is a converted
    subclass goes back to a plain ``nn.Linear`` over the same Parameters. Returns the model (the new
    module when the model itself was swapped) and the report, also kept on it for ``report(model)``."""
    rows = []
    for p in plan:
        m = p.module
        new = make(p) if p.reason is None else (as_plain_linear(m) if type(m) is not nn.Linear else None)
        if new is not None and p.name:
            _set_child(model, p.name, new)
        elif new is not None:
            model = new  # the model is this Linear: it cannot be swapped in place
        became = KEPT if p.reason is not None else type(new).__name__
        rows.append(LayerReport(p.name or ROOT, m.in_features, m.out_features, became, p.reason or label, p.always_kept))
    rep = ConversionReport(label, tuple(rows))
    object.__setattr__(model, _REPORT_ATTR, rep)  # a plain attribute: not in state_dict, copied by deepcopy
    return model, rep


def report(model: nn.Module) -> ConversionReport:
    """The ``ConversionReport`` of the last ``convert``/``qat`` of ``model`` (also through torch.compile)."""
    for m in (model, getattr(model, "_orig_mod", None)):
        rep = getattr(m, _REPORT_ATTR, None)
        if isinstance(rep, ConversionReport):
            return rep
    raise ValueError(f"report: this {type(model).__name__} was not converted by fourbit.nn.convert or qat")


def announce(rep: ConversionReport, fn: str, hint: str | None = None, stacklevel: int = 3) -> None:
    """Log the report's summary; warn when it quantized nothing or kept most layers (with the reasons)."""
    log.info("%s: %s", fn, rep.summary())
    concern = rep.concern()
    if concern is not None:
        warnings.warn(f"{fn}: {concern}" + (f"; {hint}" if hint else ""), UserWarning, stacklevel=stacklevel)


def convert(
    model: nn.Module,
    recipe: Recipe | str,
    *,
    skip: Callable[[str, nn.Module], bool] | None = None,
    on_mismatch: str = "raise",
) -> nn.Module:
    """Swap the model's ``nn.Linear`` modules for ``QuantLinear`` in place and return the model (the new
    ``QuantLinear`` for a bare Linear); see the module docstring. ``report(model)`` gives what became of each."""
    check_swap_args("convert", model, skip, on_mismatch)
    recipe = get_recipe(recipe)
    blocks = find_blocks(model)
    hp_blocks = recipe.high_precision.blocks(len(blocks[1])) if blocks else frozenset()

    def keep(name: str, m: nn.Linear) -> str | None:
        block = _block_index(name, blocks)
        if block is not None and block in hp_blocks:
            return f"{HP_BLOCK} {block} of {len(blocks[1])}"
        return None

    def check(name: str, m: nn.Linear) -> None:
        check_features(recipe, m.in_features, m.out_features, f"module {name or ROOT!r}")

    plan = plan_linears(model, keep=keep, skip=skip, check=check, on_mismatch=on_mismatch, fn="convert")
    make = lambda p: QuantLinear.from_linear(p.module, recipe, layer_id=p.layer_id)  # noqa: E731
    model, rep = swap_linears(model, plan, make, recipe.name)
    hint = None
    if any(r.reason.startswith(HP_BLOCK) for r in rep.layers):
        hint = (f"recipe.high_precision is '{recipe.high_precision}'; "
                f"dataclasses.replace(recipe, high_precision=HighPrecision.none()) quantizes every block")  # fmt: skip
    announce(rep, "convert", hint)
    return model


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
