"""Post-training quantization: swap a trained model's ``nn.Linear`` layers for ``QuantizedLinear``.

    model = fourbit.ptq(model, "nvfp4")                                    # W4A16: weights only
    model = fourbit.ptq(model, "nvfp4", activations=True, calibration=batches)   # W4A4
    model = fourbit.ptq(model, "fp8", activations=True)                    # W8A8, dynamic activation scale

What a ``QuantizedLinear`` holds and computes (inference only, no autograd; the *training* layer with
quantized GEMMs in all three passes is ``fourbit.nn``'s, not this one):

    weight  W (out, in)  ->  q_w = quantize(W [. R], scheme)           codes, block scales, tensor scale
    forward x (..., in)  ->  x' = x [. R]                              R: optional RHT (16x16 blocks)
                             x_hat = quantize(x', scheme, amax=a).dequantize()   only with activations
                             y = x_hat @ dequantize(q_w)^T + b          float32 matmul, bias high precision

so the output equals a plain dequantize-then-matmul in float32 (that is the oracle the tests use; a real
W4A4 kernel differs from it only by its accumulation order).

Activation scales. NVFP4 uses a *static* per-tensor scale and dynamic per-block scales, as ModelOpt and
vLLM do: the tensor amax ``a`` of each layer's input is calibrated on a few batches before the swap,
and ``s_enc = 6 * 448 / a`` is fixed from then on (``fourbit.quantize(x, "nvfp4", amax=a)``). FP8 and
MX activations are quantized dynamically from the live tensor (per tensor / per tile / per block): the
core FP8 quantizer takes no external amax, and MX has no tensor scale.

Export-exact amax. A checkpoint stores the input scale, not ``a``: as a decode scale ``1/s_enc``
(ModelOpt ``input_scale``) or as ``s_enc`` itself (compressed-tensors ``input_global_scale``). For the
re-imported layer to quantize activations bit-for-bit as before, the calibrated amax is moved up by at
most a few float32 ulps to one whose ``s_enc`` survives ``fp32(1 / fp32(1 / s_enc)) == s_enc`` (86% of
float32 values do), and whose ``s_enc`` maps back to it through ``fp32(6 * 448 / s_enc)``
(``amax_for_encode_scale``).

Fused groups. Serving engines run some sibling Linears as one GEMM: vLLM's ``QKVParallelLinear`` and
``MergedColumnParallelLinear`` load q/k/v and gate/up into one weight and keep ONE tensor scale for it,
the max of the members' checkpoint scales, without touching their block scales. A group quantized with
separate global scales then decodes wrongly there. So ``ptq`` quantizes each such group (found by
``fused_groups``: Hugging Face sibling names, same input width; or passed as ``fuse=``) against the
group's maximum weight amax and maximum calibrated input amax, before any block scale is computed, as
ModelOpt's ``preprocess_linear_fusion`` and llm-compressor's ``update_fused_layer_weight_global_scales``
do. The model in memory is then exactly what an engine decodes from its export.

Kept in high precision by default: ``lm_head``, every embedding (not a Linear), and any Linear whose
weight is tied to an embedding's. Four-over-six (NVFP4 only) applies to weights; ``rht=True`` rotates
weights and inputs of each layer with the same 16x16 random Hadamard transform (``(x R)(W R)^T = x W^T``),
which spreads outliers before 4-bit rounding, but checkpoint layouts have no place for the rotation, so
such a model cannot be exported.
"""

from __future__ import annotations

from ._callable_module import make_callable

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hadamard import RHT, rht as apply_rht
from .nvfp4 import FOUR_OVER_SIX_SCALE_MAX, global_encode_scale
from .formats import E2M1_MAX, E4M3_MAX
from .quantize import QuantizedTensor, quantize
from .schemes import FP8Config, MXConfig, NVFP4Config, SchemeConfig, resolve_scheme
from .nn.convert import never_quantized, plan_linears, swap_linears

__all__ = [
    "PTQ_SCHEMES",
    "DEFAULT_SKIP",
    "QuantizedLinear",
    "ptq",
    "calibrate_input_amax",
    "stable_input_amax",
    "amax_for_encode_scale",
    "quantized_linears",
    "FUSED_SIBLINGS",
    "fused_groups",
]

PTQ_SCHEMES = ("nvfp4", "mxfp4", "fp8", "fp8-blockwise")
DEFAULT_SKIP = ("lm_head", "*.lm_head")
# Sibling Linears (child names under one parent) that serving engines fuse into one GEMM (vLLM's
# QKVParallelLinear / MergedColumnParallelLinear): attention q/k/v (Llama, Mistral, Qwen, Gemma, ...;
# BERT-style query/key/value), the MLP's gate/up (Llama-style, incl. MoE experts; Mixtral experts w1/w3),
# DeepSeek MLA's q_a_proj + kv_a_proj_with_mqa (fused_qkv_a_proj). Layers already fused in the HF model
# (Phi-3 qkv_proj, GPT-OSS gate_up_proj) are one Linear and need nothing.
FUSED_SIBLINGS = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
)
MAX_ULP_STEPS = 64  # search radius (float32 ulps) for export-exact amax; a few steps suffice in practice


def _next_up(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.tensor(torch.inf, dtype=torch.float32))


def _recip(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(1.0, dtype=torch.float32) / x


def stable_input_amax(amax: torch.Tensor | float, scale_max: float = E4M3_MAX) -> torch.Tensor:
    """Smallest float32 ``a >= amax`` whose ``s_enc = global_encode_scale(a)`` survives both checkpoint forms.

    Conditions: ``fp32(1/fp32(1/s_enc)) == s_enc`` (a ModelOpt decode scale gives ``s_enc`` back) and
    ``global_encode_scale(fp32(6*scale_max/s_enc)) == s_enc`` (``amax_for_encode_scale`` finds ``a``'s class).
    """
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    if not bool(torch.isfinite(a)) or float(a) <= 0:
        raise ValueError(f"calibrated amax must be finite and positive, got {float(a)}")
    for _ in range(MAX_ULP_STEPS):
        s_enc = global_encode_scale(a, scale_max)
        if bool(_recip(_recip(s_enc)) == s_enc) and bool(
            global_encode_scale(amax_for_encode_scale(s_enc, scale_max), scale_max) == s_enc
        ):
            return a
        a = _next_up(a)
    raise ValueError(f"no export-exact amax within {MAX_ULP_STEPS} ulps above {float(amax)!r}")


def amax_for_encode_scale(s_enc: torch.Tensor | float, scale_max: float = E4M3_MAX) -> torch.Tensor:
    """A float32 amax with ``global_encode_scale(amax) == s_enc`` (nearest candidate if none is exact).

    ``fp32(6*scale_max / s_enc)`` is exact whenever ``s_enc`` itself came from a float32 amax; for scales
    written by other tools the neighbours within ``MAX_ULP_STEPS`` ulps are tried.
    """
    s_enc = torch.as_tensor(s_enc, dtype=torch.float32).reshape(())
    a0 = torch.tensor(E2M1_MAX * scale_max, dtype=torch.float32) / s_enc
    best, best_err = a0, None
    lo = hi = a0
    for step in range(MAX_ULP_STEPS + 1):
        for a in (lo, hi) if step else (a0,):
            got = global_encode_scale(a, scale_max)
            if bool(got == s_enc):
                return a
            err = abs(float(got) - float(s_enc))
            if best_err is None or err < best_err:
                best, best_err = a, err
        lo = torch.nextafter(lo, torch.tensor(0.0))
        hi = _next_up(hi)
    return best


class QuantizedLinear(nn.Module):
    """An inference Linear whose weight is stored quantized (codes, block scales, tensor scale).

    Buffers (the ``state_dict``), with (out, in) zero-padded up to whole blocks where they do not
    divide (e.g. 128x128 FP8 blocks of a 576-wide layer): ``weight_data`` uint8 (FP4: (out, in/2), two
    codes a byte, element 2i in the low nibble; FP8: (out, in)), ``weight_scales`` (NVFP4 float8_e4m3fn (out, in/16); MX
    float8_e8m0fnu (out, in/32); FP8 float32 () or (out, in/128)), for NVFP4 also
    ``weight_tensor_scale`` (float32 (), decode ``s_dec``) and ``weight_encode_scale`` (float32 (),
    ``s_enc``; ``s_dec = fp32(1/s_enc)`` when quantized here), and ``input_amax`` (float32 (), NVFP4
    activations only). ``bias`` stays in its original dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: SchemeConfig,
        *,
        bias: bool = False,
        activations: bool = False,
        rht: RHT | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        br, bc = config.block if config.block is not None else (1, 1)
        rows, cols = -(-out_features // br) * br, -(-in_features // bc) * bc  # zero-padded to whole blocks
        self.in_features, self.out_features = in_features, out_features
        self.config, self.activations, self.rht, self.dtype = config, activations, rht, dtype
        packed = config.elem.bits == 4
        self.register_buffer("weight_data", torch.zeros(rows, cols // (2 if packed else 1), dtype=torch.uint8))
        if isinstance(config, NVFP4Config):
            scales = torch.zeros(rows // br, cols // bc, dtype=torch.float8_e4m3fn)
        elif isinstance(config, MXConfig):
            scales = torch.zeros(rows // br, cols // bc, dtype=torch.float8_e8m0fnu)
        elif config.block is None:
            scales = torch.ones((), dtype=torch.float32)
        else:
            scales = torch.ones(rows // br, cols // bc, dtype=torch.float32)
        self.register_buffer("weight_scales", scales)
        if isinstance(config, NVFP4Config):
            self.register_buffer("weight_tensor_scale", torch.ones((), dtype=torch.float32))
            self.register_buffer("weight_encode_scale", torch.ones((), dtype=torch.float32))
            if activations:
                self.register_buffer("input_amax", torch.full((), E2M1_MAX * E4M3_MAX, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self._w_hat: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: SchemeConfig,
        *,
        activations: bool = False,
        input_amax: torch.Tensor | None = None,
        weight_amax: torch.Tensor | None = None,
        rht: RHT | None = None,
    ) -> "QuantizedLinear":
        """``weight_amax`` (NVFP4): the amax the tensor scale is made from, default the weight's own; a
        fused group passes its maximum (it must be >= this weight's amax, or codes would saturate)."""
        w = linear.weight.detach()
        m = cls(
            linear.in_features, linear.out_features, config,
            bias=linear.bias is not None, activations=activations, rht=rht, dtype=w.dtype,
        )  # fmt: skip
        w_q = apply_rht(w.float(), -1, transform=rht) if rht is not None else w.float()
        own = w_q.abs().amax()
        if weight_amax is None or not isinstance(config, NVFP4Config):
            weight_amax = own
        weight_amax = torch.as_tensor(weight_amax, dtype=torch.float32).reshape(())
        if not bool(weight_amax >= own):
            raise ValueError(f"weight_amax {float(weight_amax)} is below the weight's own amax {float(own)}")
        q = quantize(w_q, config, pad=True, amax=weight_amax if isinstance(config, NVFP4Config) else None)
        m.weight_data.copy_(q.data)
        m.weight_scales.copy_(q.scales.reshape(m.weight_scales.shape))
        if isinstance(config, NVFP4Config):
            scale_max = FOUR_OVER_SIX_SCALE_MAX if config.four_over_six else E4M3_MAX
            s_enc = global_encode_scale(weight_amax, scale_max)
            assert bool(_recip(s_enc) == q.tensor_scale), "s_dec must be fp32(1/s_enc)"
            m.weight_tensor_scale.copy_(q.tensor_scale)
            m.weight_encode_scale.copy_(s_enc)
            if activations:
                if input_amax is None:
                    raise ValueError("nvfp4 activations need a calibrated input amax")
                m.input_amax.copy_(stable_input_amax(input_amax))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    # ------------------------------------------------------------------ math
    def quantized_weight(self) -> QuantizedTensor:
        shape = torch.Size((self.out_features, self.in_features))
        ts = self.weight_tensor_scale if isinstance(self.config, NVFP4Config) else None
        return QuantizedTensor(self.weight_data, self.weight_scales, ts, self.config, shape, torch.float32)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 (out, in): codes x block scale x tensor scale (in the rotated basis when ``rht``)."""
        if self._w_hat is None:
            self._w_hat = self.quantized_weight().dequantize(torch.float32)
        return self._w_hat

    def refresh(self) -> None:
        """Drop the cached dequantized weight (call after writing the buffers directly)."""
        self._w_hat = None

    def _load_from_state_dict(self, *args, **kwargs):
        self.refresh()
        super()._load_from_state_dict(*args, **kwargs)

    def act_config(self) -> SchemeConfig:
        """The activation scheme: the weight scheme with 1D blocks along the reduction dim, no 4/6."""
        c = self.config
        if isinstance(c, NVFP4Config):
            return replace(c, block=(1, 16), four_over_six=False)
        if c.block is not None and c.block[0] != 1:
            return replace(c, block=(1, c.block[1]))
        return c

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (..., in) -> the dequantized activations the GEMM sees."""
        amax = self.input_amax if isinstance(self.config, NVFP4Config) else None
        return quantize(x, self.act_config(), amax=amax, pad=True).dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self.rht is not None:
            x32 = apply_rht(x32, -1, transform=self.rht)
        if self.activations:
            x32 = self.quantize_input(x32)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x32, self.dequantized_weight(), bias).to(x.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight: codes, scales, tensor scales (the bias and input scale excluded)."""
        return self.quantized_weight().nbytes

    def extra_repr(self) -> str:
        act = "W+A" if self.activations else "W"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.config.name}, "
            f"{act}, bias={self.bias is not None}, rht={self.rht is not None}"
        )


# ---------------------------------------------------------------------------------- model-level
def quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


SkipSpec = Iterable[str] | Callable[[str, nn.Module], bool] | None


def _skipper(model: nn.Module, skip: SkipSpec) -> Callable[[str, nn.Module], bool]:
    never = never_quantized(model)  # convert's rule: tied to an embedding, LM heads, nn.MultiheadAttention
    if callable(skip):
        return lambda name, m: name in never or bool(skip(name, m))
    patterns = DEFAULT_SKIP if skip is None else tuple(skip)
    if isinstance(skip, str):
        raise TypeError("skip must be a list of fnmatch patterns or a callable, not a single string")
    return lambda name, m: name in never or any(fnmatch.fnmatchcase(name, p) for p in patterns)


FuseSpec = Iterable[Iterable[str]] | None


def fused_groups(model: nn.Module, names: Iterable[str], fuse: FuseSpec = None) -> list[tuple[str, ...]]:
    """Groups of the Linears ``names`` that share one tensor scale (each group sorted, 2+ members).

    ``fuse=None``: siblings named as in ``FUSED_SIBLINGS`` under one parent, all in ``names``, all with the
    same ``in_features`` (they read one input). Otherwise ``fuse`` lists the groups by module name
    (``[]``: none); each must name Linears in ``names`` of one ``in_features``, no name twice.
    """
    names = list(names)
    modules = dict(model.named_modules())
    chosen = set(names)
    if fuse is None:
        groups = []
        for parent in sorted({n.rpartition(".")[0] for n in names}):
            for siblings in FUSED_SIBLINGS:
                full = tuple(f"{parent}.{c}" if parent else c for c in siblings)
                if all(f in chosen for f in full) and len({modules[f].in_features for f in full}) == 1:
                    groups.append(full)
        return groups
    if isinstance(fuse, str):
        raise TypeError("fuse must be a list of groups of module names, not a single string")
    groups, seen = [], set()
    for g in fuse:
        if isinstance(g, str):
            raise TypeError(f"fuse: each group is a list of module names, got the string {g!r}")
        g = tuple(g)
        for n in g:
            if n not in chosen:
                raise ValueError(f"fuse: {n!r} is not a Linear being quantized")
            if n in seen:
                raise ValueError(f"fuse: {n!r} is in two groups")
            seen.add(n)
        widths = {modules[n].in_features for n in g}
        if len(widths) != 1:
            raise ValueError(f"fuse: group {list(g)} mixes in_features {sorted(widths)}; a fused GEMM reads one input")
        if len(g) > 1:
            groups.append(g)
    return groups


def _group_max(values: dict[str, torch.Tensor], groups: list[tuple[str, ...]]) -> dict[str, torch.Tensor]:
    """Each member of a group mapped to the group's maximum; others unchanged."""
    out = dict(values)
    for g in groups:
        m = torch.stack([values[n].float().reshape(()) for n in g]).amax()
        out.update({n: m for n in g})
    return out


def _resolve(scheme: str | SchemeConfig, four_over_six: bool) -> SchemeConfig:
    if isinstance(scheme, str):
        key = scheme.lower().replace("_", "-")
        if key not in PTQ_SCHEMES:
            raise ValueError(f"ptq: unknown scheme {scheme!r}; known: {', '.join(PTQ_SCHEMES)}")
        config = resolve_scheme(key)
    else:
        config = resolve_scheme(scheme)
    if isinstance(config, FP8Config) and config.block is not None and config.block[0] == 1:
        config = replace(config, block=(128, 128))  # DeepSeek-V3: 128x128 weight blocks (1x128 activation tiles)
    if four_over_six:
        if not isinstance(config, NVFP4Config):
            raise ValueError(f"four_over_six applies to nvfp4 only, not {config.name}")
        config = replace(config, four_over_six=True)
    return config


def _weight_amax(linear: nn.Linear, transform: RHT | None) -> torch.Tensor:
    w = linear.weight.detach().float()
    return (apply_rht(w, -1, transform=transform) if transform is not None else w).abs().amax()


def _run_batch(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def calibrate_input_amax(
    model: nn.Module,
    names: Iterable[str],
    calibration: Iterable,
    *,
    rht: RHT | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Running max of |input| (float32, after the RHT when given) of each named Linear over the batches.

    Batches are passed as ``model(**b)`` for dicts, ``model(*b)`` for tuples/lists, else ``model(b)``.
    """
    from tqdm.auto import tqdm

    modules = dict(model.named_modules())
    amax: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(name):
        def hook(_module, args):
            x = args[0].detach().float()
            if rht is not None:
                x = apply_rht(x, -1, transform=rht)
            a = x.abs().amax() if x.numel() else torch.zeros(())
            amax[name] = torch.maximum(amax[name], a) if name in amax else a

        return hook

    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        batches = list(calibration) if not hasattr(calibration, "__len__") else calibration
        for batch in tqdm(batches, desc="calibrating activation amax", disable=not progress, leave=False):
            _run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [n for n in names if n not in amax]
    if missing:
        raise ValueError(f"calibration never reached {len(missing)} layer(s), e.g. {missing[0]!r}")
    zero = [n for n, a in amax.items() if not float(a) > 0 or not bool(torch.isfinite(a))]
    if zero:
        raise ValueError(f"calibrated input amax of {zero[0]!r} is {float(amax[zero[0]])}: need finite and > 0")
    return amax


def ptq(
    model: nn.Module,
    scheme: str | SchemeConfig = "nvfp4",
    *,
    activations: bool = False,
    calibration: Iterable | None = None,
    skip: SkipSpec = None,
    four_over_six: bool = False,
    rht: bool | RHT = False,
    fuse: FuseSpec = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize ``model``'s Linear layers in place (and return it).

    ``scheme``: "nvfp4", "mxfp4", "fp8" (per-tensor) or "fp8-blockwise" (128x128 weight blocks, 1x128
    activation tiles), or a config. ``activations``: also quantize each Linear's input (W4A4 / W8A8);
    NVFP4 then needs ``calibration`` (an iterable of model inputs) for its static tensor scale.
    ``skip``: fnmatch patterns on module names (default ``DEFAULT_SKIP``, the LM head) or a callable
    ``(name, module) -> bool``; Linears tied to an embedding are always skipped. ``four_over_six``:
    NVFP4 weights pick map-to-4 or map-to-6 per block. ``rht``: True or an ``RHT`` rotates weights and
    inputs (not exportable). ``fuse`` (NVFP4): groups of Linear names that share one weight tensor scale
    and one input scale (the group's max amax), default ``fused_groups``' detection of q/k/v and gate/up;
    ``[]`` quantizes every Linear on its own.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ptq expects an nn.Module, got {type(model).__name__}")
    config = _resolve(scheme, four_over_six)
    transform = RHT() if rht is True else (rht or None)
    if transform is not None and not isinstance(transform, RHT):
        raise TypeError(f"rht must be a bool or an RHT, got {type(rht).__name__}")
    plan = plan_linears(model, skip=_skipper(model, skip), fn="ptq")
    targets = [p.name for p in plan if p.reason is None]
    if not targets:
        raise ValueError("ptq: no Linear layer left to quantize")
    modules = dict(model.named_modules())
    if transform is not None:
        bad = [n for n in targets if modules[n].in_features % transform.size]
        if bad:
            raise ValueError(
                f"ptq: rht needs in_features divisible by {transform.size}; {bad[0]!r} has "
                f"{modules[bad[0]].in_features}: add it to skip="
            )

    groups = fused_groups(model, targets, fuse) if isinstance(config, NVFP4Config) else []
    amax: dict[str, torch.Tensor] = {}
    if activations and isinstance(config, NVFP4Config):
        if calibration is None:
            raise ValueError("ptq: nvfp4 activations need calibration= batches to fix the static tensor scale")
        amax = _group_max(calibrate_input_amax(model, targets, calibration, rht=transform, progress=progress), groups)
    w_amax: dict[str, torch.Tensor] = {}
    if groups:
        grouped = {n for g in groups for n in g}
        w_amax = _group_max({n: _weight_amax(modules[n], transform) for n in grouped}, groups)

    def make(p):
        return QuantizedLinear.from_linear(p.module, config, activations=activations, input_amax=amax.get(p.name),
                                           weight_amax=w_amax.get(p.name), rht=transform)  # fmt: skip

    model, _ = swap_linears(model, plan, make, f"ptq {config.name}")
    return model  # fourbit.nn.report(model): what each Linear became


make_callable(__name__)  # fourbit.ptq(...) calls ptq(...); fourbit.ptq.<name> still reads the module
