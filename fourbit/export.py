"""NVFP4 checkpoints in the two layouts inference engines load, and back.

    fourbit.export(model, "out/", layout="modelopt")             # or "compressed-tensors"
    model = fourbit.load_quantized("out/")

Both layouts are one ``model.safetensors`` (quantized Linears plus every other tensor of the model, the
floating ones in ``dtype``, bf16 by default; a weight tied to another is stored once, as Hugging Face
does), ``config.json`` written by transformers' own ``PretrainedConfig.save_pretrained`` (``architectures``,
``dtype``, ``transformers_version`` as ``model.save_pretrained`` sets them) carrying
``quantization_config``, and ``generation_config.json`` when the model can generate. Per quantized
Linear ``p`` (out x in, in a multiple of 16):

ModelOpt (NVIDIA Model Optimizer's unified HF export; vLLM ``modelopt.py`` ``ModelOptNvFp4LinearMethod``
and ``ModelOptNvFp4W4A16LinearMethod`` read it):

    p.weight          uint8          [out, in/2]   E2M1 codes, element 2i in the low nibble
    p.weight_scale    float8_e4m3fn  [out, in/16]  block decode scales
    p.weight_scale_2  float32        []            tensor decode scale  (ModelOpt: amax / (6 * 448))
    p.input_scale     float32        []            activation decode scale, W4A4 only

    x_hat = e2m1(code) * weight_scale * weight_scale_2

``hf_quant_config.json`` is ``{"producer": {...}, "quantization": {"quant_algo", "kv_cache_quant_algo",
"group_size", "exclude_modules"}}`` (vLLM refuses an NVFP4 file without any of the last three), with
``quant_algo`` "NVFP4" (W4A4) or "W4A16_NVFP4" (weight-only; vLLM's ``QUANT_ALGOS``) and
``exclude_modules`` every Linear and Embedding left unquantized, as ``modelopt/torch/export/
quant_utils.py`` writes it; ``config.json`` gets ``convert_hf_quant_config_format``'s version of it
(``modelopt/torch/export/convert_hf_config.py``): ``config_groups.group_0`` (``weights`` /
``input_activations`` = {dynamic false, num_bits 4, type float, group_size 16}, ``targets ["Linear"]``),
``ignore``, ``quant_algo``, ``producer``, ``quant_method "modelopt"``. Both JSON files are indented by
4, as ModelOpt's ``_write_hf_export_config`` does.

compressed-tensors ("nvfp4-pack-quantized"; ``compressed_tensors/compressors/quantized_compressors/
fp4_quantized.py``, read by vLLM ``compressed_tensors_w4a4_nvfp4.py``):

    p.weight_packed        uint8          [out, in/2]
    p.weight_scale         float8_e4m3fn  [out, in/16]
    p.weight_global_scale  float32        [1]   tensor ENCODE scale 6 * 448 / amax (``generate_gparam``)
    p.input_global_scale   float32        [1]   activation encode scale, W4A4 only

    x_hat = e2m1(code) * (weight_scale / weight_global_scale)

``quantization_config`` is what ``ModelCompressor.update_config`` writes for a ``QuantizationConfig``
holding the library's NVFP4 / NVFP4A16 preset scheme (``preset_name_to_scheme``; ``scale_dtype``
float8_e4m3fn, strategy "tensor_group", activations ``dynamic: "local"``: static global scale, dynamic
block scales) with format "nvfp4-pack-quantized" and status "compressed". With compressed-tensors
installed the library builds it; without, ``compressed_tensors_config`` returns the equal literal
(the tests compare the two).

Fused layers. vLLM loads q/k/v and gate/up as one GEMM with ONE tensor scale, the max of the members'
(block scales untouched). ``fourbit.ptq`` already quantizes such groups against their shared max amax
(``fourbit.ptq.fused_groups``), so every member stores the same global and input scale and any reader's
fusion is exact; ``export`` refuses a model whose detected groups disagree (``unfused_ok=True`` writes it
anyway).

Scales, and what "bit-exact" means. fourbit computes ``s_enc = fp32(6*448 / amax)`` and
``s_dec = fp32(1 / s_enc)`` and quantizes against ``s_dec``. ModelOpt's ``amax / (6*448)`` is the same
number rounded once instead of twice: equal in about 73% of tensors, one ulp apart otherwise. So
ModelOpt's ``weight_scale_2`` here is fourbit's ``s_dec`` itself, and compressed-tensors'
``weight_global_scale`` is ``s_enc`` itself. fourbit-to-fourbit (export, then ``load_quantized``) is
bit-exact: same codes, scales and logits. Other readers decode the same codes and block scales with
their own arithmetic: ModelOpt / vLLM ``q * s_b * s_dec`` is fourbit's to the bit; compressed-tensors
``q * (s_b / s_enc)`` rounds differently from fourbit's ``(q * s_b) * fp32(1/s_enc)``, so its weights are
within 1 ulp of fourbit's (not always equal).

Loading checks every file and tensor before use and raises ``CheckpointError`` naming it: unreadable
safetensors or JSON; a tensor in two files, a file the index does not list, an index entry whose file
lacks it; a missing, mis-typed or mis-shaped quantized tensor; a floating tensor not in the checkpoint's
``dtype``; a global scale (or its reciprocal, or the amax ``6 * 448 * s_dec`` it stands for, or the
largest value it decodes to) that is zero, negative, subnormal, NaN or Inf; a NaN or negative block
scale (zero is legal: an all-zero or underflowed block); ``config.json`` and ``hf_quant_config.json``
that disagree, or an ``hf_quant_config.json`` beside a compressed-tensors config.
"""

from __future__ import annotations

from ._callable_module import make_callable

import copy
import enum
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .formats import E2M1_MAX, E4M3_MAX
from .nvfp4 import global_encode_scale
from .ptq import QuantizedLinear, amax_for_encode_scale, fused_groups, quantized_linears
from .schemes import NVFP4Config

__all__ = [
    "Layout", "CheckpointError", "export", "load_quantized", "GROUP_SIZE", "DEFAULT_DTYPE",
    "modelopt_configs", "compressed_tensors_config", "read_checkpoint_tensors",
]  # fmt: skip

GROUP_SIZE = 16
DEFAULT_DTYPE = torch.bfloat16  # non-quantized tensors, as checkpoints on the Hub ship them
SAFETENSORS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MODELOPT_CONFIG_NAME = "hf_quant_config.json"
CT_FORMAT = "nvfp4-pack-quantized"
CT_PRESETS = {True: "NVFP4", False: "NVFP4A16"}  # keyed by "activations quantized"
CT_VERSION = "0.20.1"  # the compressed-tensors release whose config the literal matches
MODELOPT_ALGOS = {True: "NVFP4", False: "W4A16_NVFP4"}
MODELOPT_JSON_INDENT = 4
F32 = torch.finfo(torch.float32)


class Layout(enum.Enum):
    MODELOPT = "modelopt"
    COMPRESSED_TENSORS = "compressed-tensors"


class CheckpointError(ValueError):
    """A checkpoint that would not load into correct numbers (names the tensor, file or field)."""


def _recip(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(1.0, dtype=torch.float32) / x


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------- configs
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


def _ct_args(dynamic, observer: str | None = None) -> dict:
    """A serialized ``QuantizationArgs`` of compressed-tensors' NVFP4 presets (fields it writes)."""
    args = {
        "num_bits": 4, "type": "float", "symmetric": True, "group_size": GROUP_SIZE,
        "strategy": "tensor_group", "dynamic": dynamic, "scale_dtype": "torch.float8_e4m3fn",
    }  # fmt: skip
    if observer is not None:
        args["observer"] = observer
    return args


def compressed_tensors_literal(activations: bool, ignore: list[str]) -> dict:
    """``compressed_tensors_config`` without the library: the dict compressed-tensors 0.20.1 writes."""
    group = {
        "targets": ["Linear"],
        "weights": _ct_args(False),
        "input_activations": _ct_args("local", "static_minmax") if activations else None,
        "output_activations": None,
        "format": CT_FORMAT,
    }
    return {
        "version": CT_VERSION, "quant_method": "compressed-tensors", "sparsity_config": {},
        "transform_config": {}, "config_groups": {"group_0": group}, "kv_cache_scheme": None, "format": CT_FORMAT,
        "quantization_status": "compressed", "global_compression_ratio": None, "ignore": ignore,
        "moe_sparsity_config": None,
    }  # fmt: skip


def compressed_tensors_library_config(activations: bool, ignore: list[str]) -> dict:
    """The ``quantization_config`` compressed-tensors' own objects serialize to (needs the library)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme

    scheme = preset_name_to_scheme(CT_PRESETS[activations], ["Linear"])
    scheme.format = CT_FORMAT
    qc = QuantizationConfig(
        config_groups={"group_0": scheme}, format=CT_FORMAT, quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )  # fmt: skip
    # ModelCompressor.update_config's wrapping of the dump
    return {
        "version": compressed_tensors.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
        "transform_config": {}, **qc.model_dump(exclude=["quant_method"]),
    }  # fmt: skip


def compressed_tensors_config(activations: bool, ignore: list[str]) -> dict:
    """config.json ``quantization_config`` of an NVFP4 (W4A4) or NVFP4A16 compressed-tensors checkpoint:
    built by the library when installed, else its literal equal."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return compressed_tensors_literal(activations, ignore)
    return compressed_tensors_library_config(activations, ignore)


# ---------------------------------------------------------------------------------- export
# QuantizedLinear buffers as ptq makes them; Module.to(dtype) casts float8 and float32 buffers too
_BUFFER_DTYPES = {
    "weight_data": torch.uint8, "weight_scales": torch.float8_e4m3fn, "weight_tensor_scale": torch.float32,
    "weight_encode_scale": torch.float32, "input_amax": torch.float32,
}  # fmt: skip


def _check_exportable(model: nn.Module, unfused_ok: bool) -> tuple[dict[str, QuantizedLinear], bool]:
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
        for buf, want in _BUFFER_DTYPES.items():
            got = getattr(m, buf, None)
            if got is not None and got.dtype != want:
                raise ValueError(
                    f"export: {name}.{buf} is {got.dtype}, not {want}: was the model cast (e.g. .to(torch.bfloat16)) "
                    "after ptq? Cast it before ptq"
                )
    acts = {m.activations for m in qlins.values()}
    if len(acts) > 1:
        raise ValueError("export: some layers quantize activations and some do not; one quant_algo per file")
    activations = acts.pop()
    if not unfused_ok:
        for group in fused_groups(model, list(qlins)):
            for buf in ("weight_tensor_scale",) + (("input_amax",) if activations else ()):
                values = {float(getattr(qlins[n], buf)) for n in group}
                if len(values) > 1:
                    raise ValueError(
                        f"export: {list(group)} are fused by serving engines but have different {buf} "
                        f"{sorted(values)}; quantize with fourbit.ptq's default fuse (or pass unfused_ok=True)"
                    )
    return qlins, activations


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


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _export_tensors(model: nn.Module, qlins: dict, layout: Layout, dtype: torch.dtype | None) -> dict:
    owned = {f"{name}.{b}" for name, m in qlins.items() for b, _ in m.named_buffers(recurse=False)}
    tensors = {k: _cast(v, dtype) for k, v in _unique_tensors(model.state_dict()).items() if k not in owned}
    for name, m in qlins.items():
        for k, v in _layer_tensors(m, layout).items():
            tensors[f"{name}.{k}"] = v
        if m.bias is not None:
            tensors[f"{name}.bias"] = _cast(m.bias, dtype)
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _model_dtype(tensors: dict[str, torch.Tensor], qnames: set[str]) -> torch.dtype:
    """The dtype of the non-quantized floating tensors (the first one's; float32 if there are none)."""
    for k, v in tensors.items():
        if v.is_floating_point() and k.rsplit(".", 1)[0] not in qnames:
            return v.dtype
    return torch.float32


def _excluded(model: nn.Module, qlins: dict) -> tuple[list[str], list[str]]:
    """(ModelOpt exclude_modules: unquantized Linears and Embeddings; compressed-tensors ignore: Linears)."""
    lin = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in qlins)
    emb = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Embedding))
    return sorted(lin + emb), lin


# files a previous export (of either layout, sharded or not) may have left; export replaces them
_OWN_WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors")


def _clear_stale(out: Path) -> None:
    """Remove weight files and the ModelOpt config an earlier export left; refuse unknown *.safetensors."""
    own = {f for pat in _OWN_WEIGHT_FILES for f in out.glob(pat)}
    other = sorted(f.name for f in out.glob("*.safetensors") if f not in own)
    if other:
        raise ValueError(
            f"export: {out} holds {other}, not written by an export; loaders read every *.safetensors in "
            "the folder, so remove them or export elsewhere"
        )
    for f in sorted(own) + [out / INDEX_NAME, out / MODELOPT_CONFIG_NAME]:
        f.unlink(missing_ok=True)


def _hf_config(model: nn.Module, dtype: torch.dtype):
    """A copy of ``model.config`` as ``PreTrainedModel.save_pretrained`` sets it (None for plain modules)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "save_pretrained"):
        return None
    cfg = copy.deepcopy(cfg)
    cfg.dtype = _dtype_name(dtype)
    cfg.architectures = [type(model).__name__.removeprefix("FSDP")]
    return cfg


def _write_config(model: nn.Module, out: Path, dtype: torch.dtype, qconfig: dict, layout: Layout) -> None:
    """config.json (and generation_config.json) as the layout's own tool writes them: ModelOpt indents by
    4 in insertion order, compressed-tensors' ``update_config`` by 2 with sorted keys."""
    indent, sort_keys = (MODELOPT_JSON_INDENT, False) if layout is Layout.MODELOPT else (2, True)
    cfg = _hf_config(model, dtype)
    if cfg is None:  # a plain module: only what load_quantized needs
        data = {"dtype": _dtype_name(dtype), "quantization_config": qconfig}
    else:
        cfg.save_pretrained(str(out))  # transformers' own writer: transformers_version, defaults dropped
        data = json.loads((out / CONFIG_NAME).read_text())
        data["quantization_config"] = qconfig
    (out / CONFIG_NAME).write_text(json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")
    gen = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if gen is not None and callable(can_generate) and can_generate():
        gen.save_pretrained(str(out))


def export(
    model: nn.Module,
    out_dir: str | Path,
    layout: str | Layout = "modelopt",
    *,
    dtype: torch.dtype | None = DEFAULT_DTYPE,
    unfused_ok: bool = False,
) -> Path:
    """Write ``model`` (after ``fourbit.ptq(model, "nvfp4", ...)``) as a ModelOpt or compressed-tensors checkpoint.

    ``dtype``: of every non-quantized floating tensor (embeddings, norms, biases, unquantized Linears),
    bf16 by default, ``None`` for each tensor's own. The quantized tensors have the layouts' fixed dtypes.
    A folder holding an earlier export is cleaned of its weight files and ``hf_quant_config.json``.
    """
    from safetensors.torch import save_file

    layout = Layout(layout) if isinstance(layout, str) else layout
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"export: dtype must be a floating torch.dtype or None, got {dtype!r}")
    qlins, activations = _check_exportable(model, unfused_ok)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_stale(out)

    tensors = _export_tensors(model, qlins, layout, dtype)
    save_file(tensors, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
    file_dtype = dtype or _model_dtype(tensors, set(qlins))
    exclude, ignore = _excluded(model, qlins)
    if layout is Layout.MODELOPT:
        hf_quant, qconfig = modelopt_configs(activations, exclude)
        (out / MODELOPT_CONFIG_NAME).write_text(json.dumps(hf_quant, indent=MODELOPT_JSON_INDENT) + "\n")
        _write_config(model, out, file_dtype, qconfig, layout)
    else:
        _write_config(model, out, file_dtype, compressed_tensors_config(activations, ignore), layout)
    return out


# ---------------------------------------------------------------------------------- reading files
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(f))
    except Exception as e:  # SafetensorError, OSError, ...: the library's message names no file
        raise CheckpointError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class _Source:
    """Which file each tensor came from (for error messages)."""

    files: dict[str, Path]


def read_checkpoint_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: through ``model.safetensors.index.json`` when present (each
    tensor from the file it names; a file it does not list is an error), else every ``*.safetensors``.
    A tensor found in two files is an error naming both."""
    tensors, _ = _read_tensors(Path(path))
    return tensors


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], _Source]:
    files = sorted(path.glob("*.safetensors"))
    index_file = path / INDEX_NAME
    weight_map = None
    if index_file.exists():
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file}: no weight_map")
        listed = set(weight_map.values())
        stray = [f.name for f in files if f.name not in listed]
        if stray:
            raise CheckpointError(f"{path / stray[0]}: not listed in {index_file.name} ({len(stray)} such file(s))")
        absent = sorted(n for n in listed if not (path / n).exists())
        if absent:
            raise CheckpointError(f"{index_file}: lists {absent[0]!r}, which is not in {path}")
        files = [path / n for n in sorted(listed)]
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for f in files:
        for k, v in _load_safetensors(f).items():
            if k in where:
                raise CheckpointError(f"tensor {k!r} is in both {where[k]} and {f}")
            tensors[k], where[k] = v, f
    if weight_map is not None:
        for k, fname in weight_map.items():
            if k not in where:
                raise CheckpointError(f"{index_file}: tensor {k!r} is listed in {fname}, which lacks it")
            if where[k].name != fname:
                raise CheckpointError(f"tensor {k!r} is in {where[k]}, but {index_file.name} places it in {fname}")
        extra = sorted(set(where) - set(weight_map))
        if extra:
            raise CheckpointError(f"tensor {extra[0]!r} in {where[extra[0]]} is not in {index_file.name}")
    return tensors, _Source(where)


def _modelopt_algo(path: Path, qc: dict) -> tuple[str, object]:
    """(quant_algo, group_size) of a ModelOpt checkpoint; both config files must agree."""
    cfg_file, hq = path / CONFIG_NAME, path / MODELOPT_CONFIG_NAME
    groups = qc.get("config_groups") or {}
    cfg_group = next(iter(groups.values()), {}).get("weights", {}).get("group_size") if groups else None
    algo, group = qc.get("quant_algo"), qc.get("group_size", cfg_group)
    if not hq.exists():
        return str(algo or "").upper(), GROUP_SIZE if group is None else group
    q = _read_json(hq).get("quantization")
    if not isinstance(q, dict):
        raise CheckpointError(f"{hq}: no 'quantization' dict")
    missing = [k for k in ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules") if k not in q]
    if missing:
        raise CheckpointError(f"{hq}: quantization lacks {missing}")
    pairs = [("quant_algo", algo, q["quant_algo"]), ("group_size", group, q["group_size"])]
    if "ignore" in qc:
        pairs.append(("ignore / exclude_modules", sorted(qc["ignore"] or []), sorted(q["exclude_modules"] or [])))
    for field, a, b in pairs:
        if a is not None and a != b:
            raise CheckpointError(f"{cfg_file} and {hq} disagree on {field}: {a!r} vs {b!r}")
    return str(q["quant_algo"]).upper(), q["group_size"]


def _read_layout(path: Path) -> tuple[Layout, bool, dict]:
    """(layout, activations quantized, config.json)."""
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    config = _read_json(cfg_file)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_file}: no quantization_config")
    method = str(qc.get("quant_method", "")).lower()
    if method.startswith("modelopt"):
        algo, group = _modelopt_algo(path, qc)
        if algo not in MODELOPT_ALGOS.values():
            raise CheckpointError(f"{path}: quant_algo {algo!r} is not one of {sorted(MODELOPT_ALGOS.values())}")
        if group != GROUP_SIZE:
            raise CheckpointError(f"{path}: group_size {group!r}, NVFP4 needs {GROUP_SIZE}")
        return Layout.MODELOPT, algo == "NVFP4", config
    if method == "compressed-tensors":
        if (path / MODELOPT_CONFIG_NAME).exists():
            raise CheckpointError(
                f"{path / MODELOPT_CONFIG_NAME}: a ModelOpt config beside a compressed-tensors {cfg_file.name}; "
                "readers disagree on which one holds (a stale file from another export?)"
            )
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


# ---------------------------------------------------------------------------------- checking tensors
def _expect(tensors: dict, name: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if name not in tensors:
        raise CheckpointError(f"missing tensor {name!r}")
    t = tensors[name]
    if t.dtype != dtype:
        raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _normal_positive(v: float) -> bool:
    return F32.tiny <= v <= F32.max  # False for NaN, Inf, zero, negatives and subnormals


def _scale_pair(tensors: dict, name: str, shape: tuple, stored_is_decode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_enc, s_dec) from a stored global scale: both, and the amax ``6*448*s_dec`` they stand for,
    must be normal positive float32 numbers (a subnormal or overflowing reciprocal decodes to garbage)."""
    stored = _expect(tensors, name, torch.float32, shape).reshape(())
    other = _recip(stored)
    s_enc, s_dec = (other, stored) if stored_is_decode else (stored, other)
    amax = torch.tensor(E2M1_MAX * E4M3_MAX, dtype=torch.float32) * s_dec
    for what, v in (("value", stored), ("reciprocal", other), ("amax 6*448*s_dec", amax)):
        if not _normal_positive(float(v)):
            raise CheckpointError(
                f"tensor {name!r} is a global scale of {float(stored)!r}: its {what} {float(v)!r} is not a "
                "finite, positive, normal float32"
            )
    return s_enc, s_dec


def _block_scales(tensors: dict, name: str, shape: tuple) -> torch.Tensor:
    scales = _expect(tensors, name, torch.float8_e4m3fn, shape)
    f = scales.float()
    nan, neg = torch.isnan(f), f < 0
    if bool(nan.any()):
        raise CheckpointError(f"tensor {name!r} holds {int(nan.sum())} NaN block scale(s)")
    if bool(neg.any()):
        raise CheckpointError(f"tensor {name!r} holds {int(neg.sum())} negative block scale(s)")
    return scales


def _check_products(name: str, scales: torch.Tensor, s_enc: torch.Tensor, s_dec: torch.Tensor) -> None:
    """The largest decoded magnitude, in both readers' forms (6*s_b*s_dec and 6*(s_b/s_enc)), is finite."""
    top = scales.float().amax() if scales.numel() else torch.zeros(())
    six = torch.tensor(E2M1_MAX, dtype=torch.float32)
    for form, v in (("6*s_b*s_dec", six * top * s_dec), ("6*(s_b/s_enc)", six * (top / s_enc))):
        if not bool(torch.isfinite(v)):
            raise CheckpointError(
                f"tensor {name!r}: the largest block scale {float(top)} times the global scale overflows ({form})"
            )


def _fill_layer(m: QuantizedLinear, p: str, tensors: dict, layout: Layout) -> set[str]:
    """Validate layer ``p``'s tensors and write them into ``m``; returns the names consumed."""
    out, inn = m.out_features, m.in_features
    data_name = f"{p}.weight" if layout is Layout.MODELOPT else f"{p}.weight_packed"
    data = _expect(tensors, data_name, torch.uint8, (out, inn // 2))
    scales = _block_scales(tensors, f"{p}.weight_scale", (out, inn // GROUP_SIZE))
    if layout is Layout.MODELOPT:
        g_name, g_shape, i_name = f"{p}.weight_scale_2", (), f"{p}.input_scale"
    else:
        g_name, g_shape, i_name = f"{p}.weight_global_scale", (1,), f"{p}.input_global_scale"
    decode_form = layout is Layout.MODELOPT
    s_enc, s_dec = _scale_pair(tensors, g_name, g_shape, decode_form)
    _check_products(g_name, scales, s_enc, s_dec)
    used = {data_name, f"{p}.weight_scale", g_name}
    m.weight_data.copy_(data)
    m.weight_scales.copy_(scales)
    m.weight_tensor_scale.copy_(s_dec)
    m.weight_encode_scale.copy_(s_enc)
    if m.activations:
        a_enc, _ = _scale_pair(tensors, i_name, g_shape, decode_form)
        used.add(i_name)
        m.input_amax.copy_(amax_for_encode_scale(a_enc))
    if f"{p}.bias" in tensors:
        bias = _expect(tensors, f"{p}.bias", m.dtype, (out,))
        m.bias.copy_(bias)
        used.add(f"{p}.bias")
    m.refresh()
    return used


# ---------------------------------------------------------------------------------- loading
def _config_dtype(config: dict, tensors: dict, qnames: set[str]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    if name is None:
        return _model_dtype(tensors, qnames)
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"config.json: dtype {name!r} is not a floating torch dtype")
    return dtype


def _skeleton(config: dict, dtype: torch.dtype) -> nn.Module:
    """An (untrained) Hugging Face model of the architecture in config.json, in the checkpoint's dtype."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the hf extra
        raise RuntimeError("load_quantized without model= needs transformers (pip install fourbit[hf])") from e
    drop = ("quantization_config", "transformers_version", "dtype", "torch_dtype")
    cfg = {k: v for k, v in config.items() if k not in drop}
    if "model_type" not in cfg:
        raise CheckpointError("config.json has no model_type; pass model= (a module of the same architecture)")
    hf_config = transformers.AutoConfig.for_model(**cfg)
    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    model = transformers.AutoModelForCausalLM.from_config(hf_config) if cls is None else cls(hf_config)
    return model.to(dtype)


def _check_dtypes(rest: dict[str, torch.Tensor], dtype: torch.dtype, src: _Source) -> None:
    for k, v in rest.items():
        if v.is_floating_point() and v.dtype != dtype:
            raise CheckpointError(f"tensor {k!r} in {src.files[k]} has dtype {v.dtype}; the checkpoint's dtype is {dtype}")


def load_quantized(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model with ``QuantizedLinear`` layers from a ModelOpt or compressed-tensors NVFP4 checkpoint.

    ``model``: a module of the checkpoint's architecture (its Linears are replaced, its other tensors
    overwritten, its floating tensors cast to the checkpoint's dtype); by default a Hugging Face model
    built from ``config.json``. Sharded checkpoints are read through ``model.safetensors.index.json``.
    """
    path = Path(path)
    layout, activations, config = _read_layout(path)
    tensors, src = _read_tensors(path)
    prefixes = _quantized_prefixes(tensors, layout)
    if not prefixes:
        raise CheckpointError(f"{path}: no quantized layer found for layout {layout.value}")
    dtype = _config_dtype(config, tensors, set(prefixes))
    model = _skeleton(config, dtype) if model is None else model.to(dtype)
    modules = dict(model.named_modules())
    used: set[str] = set()
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
    state = model.state_dict()
    own = {k for k in state if k.rsplit(".", 1)[0] not in qnames}
    unexpected = sorted(set(rest) - own)
    if unexpected:
        raise CheckpointError(f"tensor {unexpected[0]!r} has no place in the model ({len(unexpected)} such)")
    _check_dtypes(rest, dtype, src)
    for k, v in rest.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise CheckpointError(f"tensor {k!r} in {src.files[k]} has shape {tuple(v.shape)}, the model {tuple(state[k].shape)}")
    model.load_state_dict(rest, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = sorted(k for k in own - set(rest) if not _is_tied(model, k, rest))
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]!r} ({len(missing)} missing)")
    return model.eval()


def _quantized_prefixes(tensors: dict, layout: Layout) -> list[str]:
    marker = "weight_scale_2" if layout is Layout.MODELOPT else "weight_packed"
    names = {k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] == marker}
    if layout is Layout.MODELOPT:  # a missing weight_scale_2 must not hide a layer: find uint8 weights too
        names |= {k.rsplit(".", 1)[0] for k, v in tensors.items() if k.endswith(".weight") and v.dtype == torch.uint8}
    return sorted(names)


def _is_tied(model: nn.Module, key: str, loaded: dict) -> bool:
    """Whether ``key`` shares storage with a tensor that was loaded (a tied weight stored once)."""
    state = model.state_dict()
    ptr = state[key].data_ptr()
    return any(state[k].data_ptr() == ptr for k in loaded if k in state and k != key)


make_callable(__name__)  # fourbit.export(...) calls export(...); fourbit.export.<name> still reads the module
