"""NVFP4 checkpoints in the two layouts inference engines load, and back.

    fourbit.export(model, "out/", layout="modelopt")             # or "compressed-tensors"
    model = fourbit.load_quantized("out/")

Both layouts are one ``model.safetensors`` (quantized Linears plus every other tensor of the model in
its own dtype; a weight tied to another is stored once, as Hugging Face does) and a ``config.json``
carrying ``quantization_config``. Per quantized Linear ``p`` (out x in, in a multiple of 16):

ModelOpt (NVIDIA Model Optimizer's unified HF export; vLLM ``modelopt.py`` ``ModelOptNvFp4LinearMethod``
and ``ModelOptNvFp4W4A16LinearMethod`` read it):

    p.weight          uint8          [out, in/2]   E2M1 codes, element 2i in the low nibble
    p.weight_scale    float8_e4m3fn  [out, in/16]  block decode scales
    p.weight_scale_2  float32        []            tensor decode scale  (ModelOpt: amax / (6 * 448))
    p.input_scale     float32        []            activation decode scale, W4A4 only

    x_hat = e2m1(code) * weight_scale * weight_scale_2

``hf_quant_config.json`` is ``{"producer": {...}, "quantization": {"quant_algo", "kv_cache_quant_algo",
"group_size", "exclude_modules"}}`` (vLLM refuses an NVFP4 file without any of the last three), with
``quant_algo`` "NVFP4" (W4A4) or "W4A16_NVFP4" (weight-only; vLLM's ``QUANT_ALGOS``), as
``modelopt/torch/export/quant_utils.py`` ``process_layer_quant_config`` writes it; ``config.json`` gets
``convert_hf_quant_config_format``'s version of it (``modelopt/torch/export/convert_hf_config.py``):
``config_groups.group_0`` (``weights`` / ``input_activations`` = {dynamic false, num_bits 4, type float,
group_size 16}, ``targets ["Linear"]``), ``ignore``, ``quant_algo``, ``producer``, ``quant_method
"modelopt"``.

compressed-tensors ("nvfp4-pack-quantized"; ``compressed_tensors/compressors/quantized_compressors/
fp4_quantized.py``, read by vLLM ``compressed_tensors_w4a4_nvfp4.py``):

    p.weight_packed        uint8          [out, in/2]
    p.weight_scale         float8_e4m3fn  [out, in/16]
    p.weight_global_scale  float32        [1]   tensor ENCODE scale 6 * 448 / amax (``generate_gparam``)
    p.input_global_scale   float32        [1]   activation encode scale, W4A4 only

    x_hat = e2m1(code) * (weight_scale / weight_global_scale)

with ``quantization_config`` = {config_groups.group_0: {targets ["Linear"], weights, input_activations
(None for NVFP4A16), output_activations None, format}, quant_method "compressed-tensors", format
"nvfp4-pack-quantized", quantization_status "compressed", kv_cache_scheme None, global_compression_ratio
None, ignore}; the ``weights`` / ``input_activations`` dicts are ``QuantizationArgs`` of the NVFP4 /
NVFP4A16 presets (``quantization/quant_scheme.py``: strategy "tensor_group", group_size 16, symmetric,
type float, num_bits 4; activations ``dynamic: "local"``: static global scale, dynamic block scales).

Scales, bit for bit. fourbit computes ``s_enc = fp32(6*448 / amax)`` and ``s_dec = fp32(1 / s_enc)``
and quantizes against ``s_dec``. ModelOpt's ``amax / (6*448)`` is the same number rounded once instead
of twice: equal in about 73% of tensors, one ulp apart otherwise. So ModelOpt's ``weight_scale_2`` here
is fourbit's ``s_dec`` itself (the scale the codes were made for; read back as is), and
compressed-tensors' ``weight_global_scale`` is ``s_enc`` itself (read back, ``s_dec = fp32(1/s_enc)``
recomputes fourbit's exactly). Input scales come from an amax that ``fourbit.ptq`` picks so that both
forms give the same ``s_enc`` back (``fourbit.ptq.stable_input_amax``). Export then import is
bit-exact in both layouts: same codes, scales and logits.

Loading checks every quantized tensor before use and raises ``CheckpointError`` naming it: missing,
wrong dtype or shape, a global scale that is zero, negative, NaN or Inf, a NaN block scale (a zero block
scale is legal: it encodes an all-zero or underflowed block).
"""

from __future__ import annotations

import enum
import json
from pathlib import Path

import torch
import torch.nn as nn

from .ptq import QuantizedLinear, amax_for_encode_scale, quantized_linears
from .nvfp4 import global_encode_scale
from .schemes import NVFP4Config

__all__ = ["Layout", "CheckpointError", "export", "load_quantized", "GROUP_SIZE"]

GROUP_SIZE = 16
SAFETENSORS_NAME = "model.safetensors"
MODELOPT_CONFIG_NAME = "hf_quant_config.json"
CT_FORMAT = "nvfp4-pack-quantized"
MODELOPT_ALGOS = {True: "NVFP4", False: "W4A16_NVFP4"}  # keyed by "activations quantized"


class Layout(enum.Enum):
    MODELOPT = "modelopt"
    COMPRESSED_TENSORS = "compressed-tensors"


class CheckpointError(ValueError):
    """A checkpoint that would not load into correct numbers (names the tensor or field)."""


def _recip(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(1.0, dtype=torch.float32) / x


# ---------------------------------------------------------------------------------- configs
def _fp4_args(dynamic, observer: str) -> dict:
    """compressed-tensors ``QuantizationArgs`` of its NVFP4 / NVFP4A16 presets, every field written out."""
    return {
        "num_bits": 4, "type": "float", "symmetric": True, "group_size": GROUP_SIZE,
        "strategy": "tensor_group", "block_structure": None, "dynamic": dynamic, "actorder": None,
        "observer": observer, "observer_kwargs": {},
    }  # fmt: skip


def modelopt_configs(activations: bool, exclude: list[str]) -> tuple[dict, dict]:
    """(hf_quant_config.json, config.json ``quantization_config``) as ModelOpt writes them."""
    algo = MODELOPT_ALGOS[activations]
    from . import __version__  # late: fourbit/__init__ may import this module

    producer = {"name": "fourbit", "version": __version__}
    hf_quant = {
        "producer": producer,
        "quantization": {
            "quant_algo": algo, "kv_cache_quant_algo": None, "group_size": GROUP_SIZE, "exclude_modules": exclude,
        },
    }  # fmt: skip
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": GROUP_SIZE}
    group = {"input_activations": dict(fp4), "weights": dict(fp4)} if activations else {"weights": dict(fp4)}
    group["targets"] = ["Linear"]
    config = {
        "config_groups": {"group_0": group}, "ignore": exclude, "quant_algo": algo, "producer": producer,
        "quant_method": "modelopt",
    }  # fmt: skip
    return hf_quant, config


def compressed_tensors_config(activations: bool, exclude: list[str]) -> dict:
    group = {
        "targets": ["Linear"],
        "weights": _fp4_args(False, "static_minmax" if activations else "minmax"),
        "input_activations": _fp4_args("local", "static_minmax") if activations else None,
        "output_activations": None,
        "format": CT_FORMAT,
    }
    return {
        "config_groups": {"group_0": group}, "quant_method": "compressed-tensors", "format": CT_FORMAT,
        "quantization_status": "compressed", "kv_cache_scheme": None, "global_compression_ratio": None,
        "ignore": exclude,
    }  # fmt: skip


# ---------------------------------------------------------------------------------- export
def _check_exportable(model: nn.Module) -> tuple[dict[str, QuantizedLinear], bool]:
    qlins = quantized_linears(model)
    if not qlins:
        raise ValueError("export: the model has no QuantizedLinear; run fourbit.ptq(model, 'nvfp4') first")
    for name, m in qlins.items():
        c = m.config
        if not isinstance(c, NVFP4Config) or c.block != (1, GROUP_SIZE):
            raise ValueError(f"export: {name!r} is {c.name} with block {c.block}; the layouts hold nvfp4 1x16 only")
        if m.rht is not None:
            raise ValueError(f"export: {name!r} is RHT-rotated; neither layout stores the rotation")
        if m.in_features % GROUP_SIZE:
            raise ValueError(f"export: {name!r} has in_features {m.in_features}, not a multiple of {GROUP_SIZE}")
    acts = {m.activations for m in qlins.values()}
    if len(acts) > 1:
        raise ValueError("export: some layers quantize activations and some do not; one quant_algo per file")
    return qlins, acts.pop()


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of a tensor that shares storage with an earlier one (tied weights)."""
    seen: set[tuple] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def _layer_tensors(m: QuantizedLinear, layout: Layout) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one quantized Linear (names relative to the module)."""
    t: dict[str, torch.Tensor] = {}
    if layout is Layout.MODELOPT:
        t["weight"] = m.weight_data
        t["weight_scale"] = m.weight_scales
        t["weight_scale_2"] = m.weight_tensor_scale.reshape(())
        if m.activations:
            t["input_scale"] = _recip(global_encode_scale(m.input_amax)).reshape(())
    else:
        t["weight_packed"] = m.weight_data
        t["weight_scale"] = m.weight_scales
        t["weight_global_scale"] = m.weight_encode_scale.reshape(1)
        if m.activations:
            t["input_global_scale"] = global_encode_scale(m.input_amax).reshape(1)
    return t


def export(model: nn.Module, out_dir: str | Path, layout: str | Layout = "modelopt") -> Path:
    """Write ``model`` (after ``fourbit.ptq(model, "nvfp4", ...)``) as a ModelOpt or compressed-tensors checkpoint."""
    from safetensors.torch import save_file

    layout = Layout(layout) if isinstance(layout, str) else layout
    qlins, activations = _check_exportable(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    owned = {f"{name}.{b}" for name, m in qlins.items() for b, _ in m.named_buffers(recurse=False)}
    for k, v in _unique_tensors(state).items():
        if k not in owned:
            tensors[k] = v
    for name, m in qlins.items():
        for k, v in _layer_tensors(m, layout).items():
            tensors[f"{name}.{k}"] = v
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})

    exclude = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
    if layout is Layout.MODELOPT:
        hf_quant, config["quantization_config"] = modelopt_configs(activations, exclude)
        (out / MODELOPT_CONFIG_NAME).write_text(json.dumps(hf_quant, indent=4) + "\n")
    else:
        config["quantization_config"] = compressed_tensors_config(activations, exclude)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return out


# ---------------------------------------------------------------------------------- import
def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _read_layout(path: Path) -> tuple[Layout, bool, dict]:
    """(layout, activations quantized, config.json)."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    config = json.loads(cfg_file.read_text())
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_file}: no quantization_config")
    method = str(qc.get("quant_method", "")).lower()
    if method.startswith("modelopt"):
        hq = path / MODELOPT_CONFIG_NAME
        if hq.exists():
            q = json.loads(hq.read_text()).get("quantization")
            if not isinstance(q, dict):
                raise CheckpointError(f"{hq}: no 'quantization' dict")
            missing = [k for k in ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules") if k not in q]
            if missing:
                raise CheckpointError(f"{hq}: quantization lacks {missing}")
            algo, group = str(q["quant_algo"]).upper(), q["group_size"]
        else:
            algo, group = str(qc.get("quant_algo", "")).upper(), qc.get("group_size", GROUP_SIZE)
        if algo not in MODELOPT_ALGOS.values():
            raise CheckpointError(f"{path}: quant_algo {algo!r} is not one of {sorted(MODELOPT_ALGOS.values())}")
        if group != GROUP_SIZE:
            raise CheckpointError(f"{path}: group_size {group!r}, NVFP4 needs {GROUP_SIZE}")
        return Layout.MODELOPT, algo == "NVFP4", config
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        if qc.get("format") != CT_FORMAT and not all(g.get("format") == CT_FORMAT for g in groups.values()):
            raise CheckpointError(f"{cfg_file}: format {qc.get('format')!r}, expected {CT_FORMAT!r}")
        if len(groups) != 1:
            raise CheckpointError(f"{cfg_file}: expected one config group, got {len(groups)}")
        (g,) = groups.values()
        w = g.get("weights") or {}
        if (w.get("num_bits"), w.get("type"), w.get("group_size")) != (4, "float", GROUP_SIZE):
            raise CheckpointError(f"{cfg_file}: weights are not NVFP4 (num_bits 4, type float, group_size 16): {w}")
        return Layout.COMPRESSED_TENSORS, g.get("input_activations") is not None, config
    raise CheckpointError(f"{cfg_file}: quant_method {qc.get('quant_method')!r} is neither modelopt nor compressed-tensors")


def _expect(tensors: dict, name: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if name not in tensors:
        raise CheckpointError(f"missing tensor {name!r}")
    t = tensors[name]
    if t.dtype != dtype:
        raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _global_scale(tensors: dict, name: str, shape: tuple) -> torch.Tensor:
    t = _expect(tensors, name, torch.float32, shape)
    v = float(t.reshape(()))
    if not (v > 0 and v < float("inf")):
        raise CheckpointError(f"tensor {name!r} is a global scale of {v}: must be finite and > 0")
    return t.reshape(())


def _quantized_prefixes(tensors: dict, layout: Layout) -> list[str]:
    marker = "weight_scale_2" if layout is Layout.MODELOPT else "weight_packed"
    names = {k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] == marker}
    if layout is Layout.MODELOPT:  # a missing weight_scale_2 must not hide a layer: find uint8 weights too
        names |= {k.rsplit(".", 1)[0] for k, v in tensors.items() if k.endswith(".weight") and v.dtype == torch.uint8}
    return sorted(names)


def _fill_layer(m: QuantizedLinear, p: str, tensors: dict, layout: Layout) -> set[str]:
    """Validate layer ``p``'s tensors and write them into ``m``; returns the names consumed."""
    out, inn = m.out_features, m.in_features
    data_name = f"{p}.weight" if layout is Layout.MODELOPT else f"{p}.weight_packed"
    data = _expect(tensors, data_name, torch.uint8, (out, inn // 2))
    scales = _expect(tensors, f"{p}.weight_scale", torch.float8_e4m3fn, (out, inn // GROUP_SIZE))
    nan = torch.isnan(scales.float())
    if bool(nan.any()):
        raise CheckpointError(f"tensor {p + '.weight_scale'!r} holds {int(nan.sum())} NaN block scale(s)")
    used = {data_name, f"{p}.weight_scale"}
    if layout is Layout.MODELOPT:
        s_dec = _global_scale(tensors, f"{p}.weight_scale_2", ())
        s_enc = _recip(s_dec)
        used.add(f"{p}.weight_scale_2")
    else:
        s_enc = _global_scale(tensors, f"{p}.weight_global_scale", (1,))
        s_dec = _recip(s_enc)
        used.add(f"{p}.weight_global_scale")
    if not (bool(torch.isfinite(s_enc)) and float(s_enc) > 0 and float(s_dec) > 0):
        raise CheckpointError(f"layer {p!r}: global weight scale {float(s_dec)} has no finite reciprocal")
    m.weight_data.copy_(data)
    m.weight_scales.copy_(scales)
    m.weight_tensor_scale.copy_(s_dec)
    m.weight_encode_scale.copy_(s_enc)
    if m.activations:
        if layout is Layout.MODELOPT:
            a_enc = _recip(_global_scale(tensors, f"{p}.input_scale", ()))
            used.add(f"{p}.input_scale")
        else:
            a_enc = _global_scale(tensors, f"{p}.input_global_scale", (1,))
            used.add(f"{p}.input_global_scale")
        if not (bool(torch.isfinite(a_enc)) and float(a_enc) > 0):
            raise CheckpointError(f"layer {p!r}: input scale has no finite reciprocal")
        m.input_amax.copy_(amax_for_encode_scale(a_enc))
    if f"{p}.bias" in tensors:
        m.bias.copy_(tensors[f"{p}.bias"])
        used.add(f"{p}.bias")
    m.refresh()
    return used


def _skeleton(config: dict) -> nn.Module:
    """An (untrained) Hugging Face model of the architecture in config.json."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the hf extra
        raise RuntimeError("load_quantized without model= needs transformers (pip install fourbit[hf])") from e
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    if "model_type" not in cfg:
        raise CheckpointError("config.json has no model_type; pass model= (a module of the same architecture)")
    hf_config = transformers.AutoConfig.for_model(**cfg)
    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
        return cls.from_config(hf_config)
    return cls(hf_config)


def load_quantized(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model with ``QuantizedLinear`` layers from a ModelOpt or compressed-tensors NVFP4 checkpoint.

    ``model``: a module of the checkpoint's architecture (its Linears are replaced, its other tensors
    overwritten); by default a Hugging Face model built from ``config.json``.
    """
    path = Path(path)
    layout, activations, config = _read_layout(path)
    tensors = _read_tensors(path)
    if model is None:
        model = _skeleton(config)
    modules = dict(model.named_modules())
    used: set[str] = set()
    prefixes = _quantized_prefixes(tensors, layout)
    if not prefixes:
        raise CheckpointError(f"{path}: no quantized layer found for layout {layout.value}")
    for p in prefixes:
        lin = modules.get(p)
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(f"quantized tensors under {p!r}, but the model has no Linear there")
        m = QuantizedLinear(
            lin.in_features, lin.out_features, NVFP4Config(),
            bias=lin.bias is not None, activations=activations, dtype=lin.weight.dtype,
        )  # fmt: skip
        used |= _fill_layer(m, p, tensors, layout)
        parent_name, _, child = p.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, m)

    rest = {k: v for k, v in tensors.items() if k not in used}
    qnames = set(prefixes)
    own = {k for k in model.state_dict() if k.rsplit(".", 1)[0] not in qnames}
    unexpected = sorted(set(rest) - own)
    if unexpected:
        raise CheckpointError(f"tensor {unexpected[0]!r} has no place in the model ({len(unexpected)} such)")
    model.load_state_dict(rest, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = sorted(k for k in own - set(rest) if not _is_tied(model, k, rest))
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]!r} ({len(missing)} missing)")
    return model.eval()


def _is_tied(model: nn.Module, key: str, loaded: dict) -> bool:
    """Whether ``key`` shares storage with a tensor that was loaded (a tied weight stored once)."""
    state = model.state_dict()
    ptr = state[key].data_ptr()
    return any(state[k].data_ptr() == ptr for k in loaded if k in state and k != key)
