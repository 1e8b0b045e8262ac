"""NVFP4 checkpoints in the ModelOpt and compressed-tensors layouts: names, dtypes, shapes and scale
conventions as vLLM's loaders expect them, fused groups, config files, bit-exact round trip, sharded
reading, and rejected bad files (each case fails on a loader without its check). The third-party
readers themselves (transformers, compressed-tensors, ModelOpt) are in test_export_readers.py."""

import json

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fourbit.export import CheckpointError, export, load_quantized
from fourbit.ptq import QuantizedLinear, fused_groups, ptq, quantized_linears

transformers = pytest.importorskip("transformers")

from hf_models import tiny_llama  # noqa: E402
safetensors_torch = pytest.importorskip("safetensors.torch")

LAYOUTS = ["modelopt", "compressed-tensors"]
SIX_TIMES_448 = 2688.0  # E2M1 max x E4M3 max
# ModelOpt's amax / 2688 is rounded once, fourbit's 1 / fp32(2688 / amax) twice: at most 1 ulp apart
SCALE_ULPS = 1
# compressed-tensors dequantizes as e2m1 * (s_b / s_enc), fourbit as (e2m1 * s_b) * fp32(1/s_enc):
# two or three float32 roundings apart, so relative 4 * 2^-24
CT_DEQUANT_RTOL = 4 * 2.0**-24
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, 24), generator=g) for _ in range(2)]


def quantized(activations: bool, tie: bool = True, dtype=torch.bfloat16, **kw) -> nn.Module:
    """The tiny Llama held in ``dtype`` (bf16: what export writes by default), then PTQ'd."""
    model = tiny_llama(tie, dtype=dtype)
    return ptq(model, "nvfp4", activations=activations, calibration=calib(), progress=False, **kw)


def ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.tensor(float("inf"))) - x


@pytest.fixture(scope="module", params=[(lay, act) for lay in LAYOUTS for act in (False, True)],
                ids=lambda p: f"{p[0]}-{'W4A4' if p[1] else 'W4A16'}")  # fmt: skip
def exported(request, tmp_path_factory):
    layout, act = request.param
    model = quantized(act)
    out = tmp_path_factory.mktemp(f"{layout}-{act}")
    export(model, out, layout)
    return layout, act, model, out


def test_round_trip_is_bit_exact(exported):
    """export then load_quantized: same codes, scales and logits (the model held in bf16, the default
    export dtype)."""
    layout, act, model, out = exported
    loaded = load_quantized(out)
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    a, b = quantized_linears(model), quantized_linears(loaded)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].weight_data, b[name].weight_data), name
        assert torch.equal(a[name].weight_scales.view(torch.uint8), b[name].weight_scales.view(torch.uint8)), name
        assert torch.equal(a[name].weight_tensor_scale, b[name].weight_tensor_scale), name
    # and a second export writes the same bytes
    again = out.parent / (out.name + "-again")
    export(loaded, again, layout)
    t1 = safetensors_torch.load_file(str(out / "model.safetensors"))
    t2 = safetensors_torch.load_file(str(again / "model.safetensors"))
    assert t1.keys() == t2.keys()
    for k in t1:
        assert t1[k].dtype == t2[k].dtype and torch.equal(t1[k].reshape(-1).view(torch.uint8), t2[k].reshape(-1).view(torch.uint8)), k


def expected_layer_tensors(layout, act, out_f, in_f):
    if layout == "modelopt":
        spec = {
            "weight": (torch.uint8, (out_f, in_f // 2)),
            "weight_scale": (torch.float8_e4m3fn, (out_f, in_f // 16)),
            "weight_scale_2": (torch.float32, ()),
        }
        if act:
            spec["input_scale"] = (torch.float32, ())
    else:
        spec = {
            "weight_packed": (torch.uint8, (out_f, in_f // 2)),
            "weight_scale": (torch.float8_e4m3fn, (out_f, in_f // 16)),
            "weight_global_scale": (torch.float32, (1,)),
        }
        if act:
            spec["input_global_scale"] = (torch.float32, (1,))
    return spec


def test_tensor_names_dtypes_shapes(exported):
    layout, act, model, out = exported
    tensors = safetensors_torch.load_file(str(out / "model.safetensors"))
    expected = {}
    for name, m in quantized_linears(model).items():
        for k, (dtype, shape) in expected_layer_tensors(layout, act, m.out_features, m.in_features).items():
            expected[f"{name}.{k}"] = (dtype, shape)
    for name, p in model.named_parameters():  # everything else, in its own dtype; tied lm_head once
        if name != "lm_head.weight":
            expected[name] = (p.dtype, tuple(p.shape))
    got = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    assert got == expected


def test_scale_conventions(exported):
    layout, act, model, out = exported
    tensors = safetensors_torch.load_file(str(out / "model.safetensors"))
    base = dict(tiny_llama(dtype=torch.bfloat16).named_modules())
    groups = {n: g for g in fused_groups(model, quantized_linears(model)) for n in g}
    for name, m in quantized_linears(model).items():
        amax = max(base[n].weight.detach().abs().max().double() for n in groups.get(name, (name,)))
        if layout == "modelopt":
            ws2 = tensors[f"{name}.weight_scale_2"]
            assert torch.equal(ws2, m.weight_tensor_scale)  # the decode scale the codes were made for
            modelopt = (amax / SIX_TIMES_448).float()  # ModelOpt: amax / (6 * 448), one rounding
            assert abs(float(ws2) - float(modelopt)) <= SCALE_ULPS * float(ulp(modelopt))
        else:
            wgs = tensors[f"{name}.weight_global_scale"]
            # an ENCODE scale: float32 division is correctly rounded, so this is fp32(2688 / amax)
            assert float(wgs) == float((SIX_TIMES_448 / amax).float())
        if act:
            a = m.input_amax.double()
            if layout == "modelopt":
                s = tensors[f"{name}.input_scale"]
                modelopt = (a / SIX_TIMES_448).float()  # ModelOpt's form, one rounding
                assert abs(float(s) - float(modelopt)) <= SCALE_ULPS * float(ulp(modelopt))
            else:
                assert float(tensors[f"{name}.input_global_scale"]) == float((SIX_TIMES_448 / a).float())


def test_file_dequantizes_like_the_layer(exported):
    """Decode the file with the layout's own formula, no fourbit code involved."""
    layout, act, model, out = exported
    tensors = safetensors_torch.load_file(str(out / "model.safetensors"))
    for name, m in quantized_linears(model).items():
        packed = tensors[f"{name}.weight" if layout == "modelopt" else f"{name}.weight_packed"]
        codes = torch.stack((packed & 0xF, packed >> 4), -1).reshape(packed.shape[0], -1)
        mag = E2M1_VALUES[(codes & 7).long()]
        v = torch.where((codes & 8) != 0, -mag, mag).reshape(m.out_features, -1, 16)
        sb = tensors[f"{name}.weight_scale"].float()[:, :, None]
        layer_w = m.dequantized_weight()
        if layout == "modelopt":
            w = (v * sb * tensors[f"{name}.weight_scale_2"]).reshape(layer_w.shape)
            assert torch.equal(w, layer_w), name
        else:
            w = (v * (sb / tensors[f"{name}.weight_global_scale"])).reshape(layer_w.shape)
            torch.testing.assert_close(w, layer_w, rtol=CT_DEQUANT_RTOL, atol=0)


def test_configs(exported):
    layout, act, model, out = exported
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["model_type"] == "llama"
    # as transformers' save_pretrained writes them (issue 20: these were null for a model built from a config)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert config["transformers_version"] == transformers.__version__
    gen = transformers.GenerationConfig.from_pretrained(str(out))
    assert gen.to_diff_dict() == {**model.generation_config.to_diff_dict(), "transformers_version": transformers.__version__}
    if layout == "modelopt":
        hq = json.loads((out / "hf_quant_config.json").read_text())
        algo = "NVFP4" if act else "W4A16_NVFP4"
        assert set(hq) == {"producer", "quantization"}
        exclude = ["lm_head", "model.embed_tokens"]  # what ModelOpt lists: unquantized Linears and Embeddings
        assert hq["quantization"] == {
            "quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": exclude,
        }  # fmt: skip
        assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == algo and qc["ignore"] == exclude
        group = qc["config_groups"]["group_0"]
        assert group["targets"] == ["Linear"]
        assert group["weights"] == {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        assert ("input_activations" in group) == act
    else:
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "nvfp4-pack-quantized"
        assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
        group = qc["config_groups"]["group_0"]
        w = group["weights"]
        assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"], w["dynamic"]) == (
            4, "float", "tensor_group", 16, True, False,
        )  # fmt: skip
        assert w["scale_dtype"] == "torch.float8_e4m3fn"
        if act:
            assert group["input_activations"]["dynamic"] == "local"
            assert group["input_activations"]["scale_dtype"] == "torch.float8_e4m3fn"
        else:
            assert group["input_activations"] is None


# ---------------------------------------------------------------------------------- bad files
def corrupt(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    tensors = safetensors_torch.load_file(str(dst / "model.safetensors"))
    edit(tensors)
    safetensors_torch.save_file(tensors, str(dst / "model.safetensors"))
    return dst


LAYER = "model.layers.1.mlp.down_proj"


def _set(name, value):
    def edit(t):
        t[name] = value(t[name]) if callable(value) else value

    return edit


def _nan_block(t):
    s = t[f"{LAYER}.weight_scale"].clone()
    s.view(torch.uint8)[3, 1] = 0x7F  # E4M3 NaN
    t[f"{LAYER}.weight_scale"] = s


BAD = {
    "modelopt": [
        ("missing-scale", lambda t: t.pop(f"{LAYER}.weight_scale"), f"{LAYER}.weight_scale"),
        ("missing-scale2", lambda t: t.pop(f"{LAYER}.weight_scale_2"), f"{LAYER}.weight_scale_2"),
        ("shape", _set(f"{LAYER}.weight_scale", lambda s: s[:, :-1].contiguous()), f"{LAYER}.weight_scale"),
        ("dtype", _set(f"{LAYER}.weight_scale", lambda s: s.float()), f"{LAYER}.weight_scale"),
        ("zero-global", _set(f"{LAYER}.weight_scale_2", torch.tensor(0.0)), f"{LAYER}.weight_scale_2"),
        ("nan-global", _set(f"{LAYER}.weight_scale_2", torch.tensor(float("nan"))), f"{LAYER}.weight_scale_2"),
        ("inf-global", _set(f"{LAYER}.weight_scale_2", torch.tensor(float("inf"))), f"{LAYER}.weight_scale_2"),
        ("nan-block", _nan_block, f"{LAYER}.weight_scale"),
        ("zero-input", _set(f"{LAYER}.input_scale", torch.tensor(0.0)), f"{LAYER}.input_scale"),
        ("missing-input", lambda t: t.pop(f"{LAYER}.input_scale"), f"{LAYER}.input_scale"),
    ],
    "compressed-tensors": [
        ("missing-global", lambda t: t.pop(f"{LAYER}.weight_global_scale"), f"{LAYER}.weight_global_scale"),
        ("shape-global", _set(f"{LAYER}.weight_global_scale", lambda s: s.reshape(())), f"{LAYER}.weight_global_scale"),
        ("zero-global", _set(f"{LAYER}.weight_global_scale", torch.zeros(1)), f"{LAYER}.weight_global_scale"),
        ("inf-global", _set(f"{LAYER}.weight_global_scale", torch.full((1,), float("inf"))), f"{LAYER}.weight_global_scale"),
        ("nan-input", _set(f"{LAYER}.input_global_scale", torch.full((1,), float("nan"))), f"{LAYER}.input_global_scale"),
        ("nan-block", _nan_block, f"{LAYER}.weight_scale"),
        ("packed-shape", _set(f"{LAYER}.weight_packed", lambda p: p[:-1].contiguous()), f"{LAYER}.weight_packed"),
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def w4a4_dirs(tmp_path_factory):
    dirs = {}
    model = quantized(True)
    for layout in LAYOUTS:
        dirs[layout] = export(model, tmp_path_factory.mktemp(f"good-{layout}"), layout)
    return dirs


@pytest.mark.parametrize(
    "layout, edit, tensor",
    [(lay, e, t) for lay, cases in BAD.items() for _, e, t in cases],
    ids=[f"{lay}-{case}" for lay, cases in BAD.items() for case, _, _ in cases],
)
def test_bad_checkpoint_rejected_naming_the_tensor(w4a4_dirs, tmp_path, layout, edit, tensor):
    bad = corrupt(w4a4_dirs[layout], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=repr(tensor).replace(".", r"\.")):
        load_quantized(bad)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_block_scale_is_legal(w4a4_dirs, tmp_path, layout):
    def zero_block(t):
        s = t[f"{LAYER}.weight_scale"].clone()
        s.view(torch.uint8)[0, :] = 0
        t[f"{LAYER}.weight_scale"] = s

    model = load_quantized(corrupt(w4a4_dirs[layout], tmp_path / "zero", zero_block))
    w = dict(model.named_modules())[LAYER].dequantized_weight()
    assert torch.equal(w[0], torch.zeros_like(w[0]))
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(16)[None]).logits).all()


def test_bad_config_rejected(w4a4_dirs, tmp_path):
    import shutil

    bad = tmp_path / "cfg"
    shutil.copytree(w4a4_dirs["modelopt"], bad)
    hq = json.loads((bad / "hf_quant_config.json").read_text())
    del hq["quantization"]["group_size"]
    (bad / "hf_quant_config.json").write_text(json.dumps(hq))
    with pytest.raises(CheckpointError, match="group_size"):
        load_quantized(bad)


def test_export_refuses_what_the_layouts_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="nvfp4 1x16 only"):
        export(ptq(tiny_llama(), "mxfp4", progress=False), tmp_path / "mx")
    with pytest.raises(ValueError, match="RHT"):
        export(ptq(tiny_llama(), "nvfp4", rht=True, progress=False), tmp_path / "rht")
    with pytest.raises(ValueError, match="no QuantizedLinear"):
        export(tiny_llama(), tmp_path / "none")
    with pytest.raises(ValueError, match=r"weight_scales is torch.bfloat16.*Cast it before ptq"):
        export(ptq(tiny_llama(), "nvfp4", progress=False).to(torch.bfloat16), tmp_path / "cast")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plain_module_round_trip(tmp_path, layout):
    """Any nn.Module: load_quantized(dir, model=skeleton) for models without a Hugging Face config."""

    def net():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48, bias=False), nn.LayerNorm(48))

    model = ptq(net(), "nvfp4", activations=True, calibration=[torch.randn(8, 32)], skip=[], progress=False)
    export(model, tmp_path, layout, dtype=None)  # float32 kept: the round trip is bit-exact
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    loaded = load_quantized(tmp_path, model=net())
    assert isinstance(loaded[0], QuantizedLinear) and loaded[0].bias is not None
    x = torch.randn(4, 32)
    assert torch.equal(model(x), loaded(x))
    # the default bf16 export: biases and the norm in bf16, the skeleton cast to bf16 on load
    export(model, tmp_path / "bf16", layout)
    t = safetensors_torch.load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert t["0.bias"].dtype == t["3.weight"].dtype == torch.bfloat16
    loaded = load_quantized(tmp_path / "bf16", model=net())
    assert loaded[3].weight.dtype == torch.bfloat16 and torch.equal(loaded[3].weight, model[3].weight.bfloat16())


def test_float32_model_export_dtypes(tmp_path):
    """dtype=None keeps float32 (bit-exact round trip of a float32 model); the default writes bf16."""
    model = quantized(True, dtype=torch.float32)
    export(model, tmp_path / "f32", "modelopt", dtype=None)
    loaded = load_quantized(tmp_path / "f32")
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    export(model, tmp_path / "bf16", "compressed-tensors")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    t = safetensors_torch.load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {v.dtype for k, v in t.items() if "norm" in k or "embed" in k} == {torch.bfloat16}
    assert load_quantized(tmp_path / "bf16").model.norm.weight.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        export(model, tmp_path / "int", dtype=torch.int8)


# ---------------------------------------------------------------------------------- fused groups
GLOBAL = {"modelopt": ("weight_scale_2", "input_scale"), "compressed-tensors": ("weight_global_scale", "input_global_scale")}
MAX_DECODE = {  # vLLM keeps the max per-tensor DECODE scale of a fused group; compressed-tensors stores encode
    "modelopt": lambda vals: torch.stack(vals).amax(),
    "compressed-tensors": lambda vals: torch.stack(vals).amin(),
}


def vllm_fuse(src, dst, layout, groups):
    """Copy a checkpoint, replacing each fused group's global weight and input scales by the one vLLM's
    QKV / MergedColumn loader keeps (block scales untouched), as ``process_weights_after_loading`` does."""

    def edit(t):
        for g in groups:
            for kind in GLOBAL[layout]:
                names = [f"{n}.{kind}" for n in g if f"{n}.{kind}" in t]
                if names:
                    fused = MAX_DECODE[layout]([t[n] for n in names])
                    for n in names:
                        t[n] = fused.reshape(t[n].shape).clone()

    return corrupt(src, dst, edit)


def test_fused_groups_in_the_file(exported):
    layout, act, model, out = exported
    tensors = safetensors_torch.load_file(str(out / "model.safetensors"))
    groups = fused_groups(model, quantized_linears(model))
    assert sorted(len(g) for g in groups) == [2, 2, 3, 3]  # q/k/v and gate/up of both layers
    for g in groups:
        for kind in GLOBAL[layout][: 2 if act else 1]:
            vals = [tensors[f"{n}.{kind}"] for n in g]
            assert all(torch.equal(v, vals[0]) for v in vals), (g, kind)


def test_vllm_fused_loading_leaves_logits_unchanged(exported, tmp_path):
    layout, act, model, out = exported
    fused = vllm_fuse(out, tmp_path / "fused", layout, fused_groups(model, quantized_linears(model)))
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(model(x).logits, load_quantized(fused)(x).logits)


def test_unfused_export_is_refused_and_would_decode_wrongly_in_vllm(tmp_path):
    model = quantized(True, fuse=[])
    with pytest.raises(ValueError, match="fused by serving engines"):
        export(model, tmp_path / "refused", "modelopt")
    out = export(model, tmp_path / "unfused", "modelopt", unfused_ok=True)
    fused = vllm_fuse(out, tmp_path / "fused", "modelopt", fused_groups(model, quantized_linears(model)))
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(model(x).logits, load_quantized(out)(x).logits)
        assert not torch.equal(model(x).logits, load_quantized(fused)(x).logits)  # what issue 20 saw


# ---------------------------------------------------------------------------------- folders
def test_reexport_into_a_folder_replaces_the_other_layout(w4a4_dirs, tmp_path):
    model = quantized(True)
    out = export(model, tmp_path / "both", "modelopt")
    assert (out / "hf_quant_config.json").exists()
    export(model, out, "compressed-tensors")
    assert not (out / "hf_quant_config.json").exists()
    assert sorted(f.name for f in out.glob("*.safetensors")) == ["model.safetensors"]
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(x).logits, load_quantized(out)(x).logits)
    safetensors_torch.save_file({"x": torch.zeros(1)}, str(out / "adapter.safetensors"))
    with pytest.raises(ValueError, match="adapter.safetensors"):
        export(model, out, "modelopt")


def shard(src, dst, n=2):
    """Split a one-file checkpoint into n shards plus model.safetensors.index.json, as HF names them."""
    import shutil

    shutil.copytree(src, dst)
    tensors = safetensors_torch.load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for i in range(n):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::n]}
        safetensors_torch.save_file(part, str(dst / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_checkpoint_reads_through_the_index(w4a4_dirs, tmp_path, layout):
    from fourbit.export import read_checkpoint_tensors

    sharded = shard(w4a4_dirs[layout], tmp_path / "sharded")
    one = read_checkpoint_tensors(w4a4_dirs[layout])
    many = read_checkpoint_tensors(sharded)
    assert one.keys() == many.keys()
    for k in one:
        assert one[k].dtype == many[k].dtype and torch.equal(one[k].reshape(-1).view(torch.uint8), many[k].reshape(-1).view(torch.uint8)), k
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_quantized(w4a4_dirs[layout])(x).logits, load_quantized(sharded)(x).logits)


# ---------------------------------------------------------------------------------- issue 22: files that decoded to garbage
def _extra_file(d):  # a leftover file whose tensor silently overrode the real one
    safetensors_torch.save_file({"model.norm.weight": torch.zeros(64, dtype=torch.bfloat16)}, str(d / "extra.safetensors"))


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _bad_json(name):
    def edit(d):
        (d / name).write_text((d / name).read_text()[:-20])

    return edit


def _disagree(d):
    hq = json.loads((d / "hf_quant_config.json").read_text())
    hq["quantization"]["quant_algo"] = "W4A16_NVFP4"  # config.json says NVFP4
    (d / "hf_quant_config.json").write_text(json.dumps(hq))


def _stale_modelopt(d):  # compressed-tensors folder with a ModelOpt config left from an earlier export
    (d / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))


def _stray_shard(d):
    sharded = shard(d, d.parent / "tmp-sharded")
    for f in d.glob("*"):
        f.unlink()
    for f in sharded.glob("*"):
        f.rename(d / f.name)
    safetensors_torch.save_file({"model.norm.weight": torch.zeros(64, dtype=torch.bfloat16)}, str(d / "model.safetensors"))


def _negative_block(t):
    s = t[f"{LAYER}.weight_scale"].clone()
    s.view(torch.uint8)[2, 0] |= 0x80  # sign bit: a negative block scale flips the block's weights
    t[f"{LAYER}.weight_scale"] = s


def _tensor_edit(edit):
    def on_dir(d):
        tensors = safetensors_torch.load_file(str(d / "model.safetensors"))
        edit(tensors)
        safetensors_torch.save_file(tensors, str(d / "model.safetensors"))

    return on_dir


ISSUE_22 = [
    # (case, layout, edit of the folder, regex the CheckpointError must match)
    ("ct-global-reciprocal-overflows", "compressed-tensors",
     _tensor_edit(_set(f"{LAYER}.weight_global_scale", torch.full((1,), 2.5e-39))), f"{LAYER}.weight_global_scale"),
    ("modelopt-global-product-overflows", "modelopt",
     _tensor_edit(_set(f"{LAYER}.weight_scale_2", torch.tensor(3e38))), f"{LAYER}.weight_scale_2"),
    ("modelopt-input-product-overflows", "modelopt",
     _tensor_edit(_set(f"{LAYER}.input_scale", torch.tensor(1e37))), f"{LAYER}.input_scale"),
    ("ct-negative-global", "compressed-tensors",
     _tensor_edit(_set(f"{LAYER}.weight_global_scale", torch.full((1,), -3.0e4))), f"{LAYER}.weight_global_scale"),
    ("modelopt-negative-block", "modelopt", _tensor_edit(_negative_block), f"{LAYER}.weight_scale"),
    ("ct-negative-block", "compressed-tensors", _tensor_edit(_negative_block), f"{LAYER}.weight_scale"),
    ("float64-norm", "modelopt",
     _tensor_edit(_set("model.norm.weight", lambda w: w.double())), "model.norm.weight"),
    ("float32-bias-free-embed", "compressed-tensors",
     _tensor_edit(_set("model.embed_tokens.weight", lambda w: w.float())), "model.embed_tokens.weight"),
    ("extra-safetensors-duplicates", "modelopt", _extra_file, "extra.safetensors"),
    ("stray-file-beside-index", "compressed-tensors", _stray_shard, "model.safetensors"),
    ("truncated-safetensors", "modelopt", _truncate, "model.safetensors"),
    ("invalid-config-json", "compressed-tensors", _bad_json("config.json"), "config.json"),
    ("invalid-hf-quant-config", "modelopt", _bad_json("hf_quant_config.json"), "hf_quant_config.json"),
    ("configs-disagree", "modelopt", _disagree, "quant_algo"),
    ("stale-modelopt-config", "compressed-tensors", _stale_modelopt, "hf_quant_config.json"),
]  # fmt: skip


@pytest.mark.parametrize("case, layout, edit, match", ISSUE_22, ids=[c[0] for c in ISSUE_22])
def test_issue22_files_are_rejected_naming_the_culprit(w4a4_dirs, tmp_path, case, layout, edit, match):
    import re
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(w4a4_dirs[layout], bad)
    edit(bad)
    with pytest.raises(CheckpointError, match=re.escape(match)):
        load_quantized(bad)


# ---------------------------------------------------------------------------------- fuzzing the loader's scale checks
def _fuzz_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16, bias=False))


@pytest.fixture(scope="module")
def fuzz_ckpts(tmp_path_factory):
    """A small W4A4 plain-module checkpoint per layout (loaded with model=, no transformers skeleton)."""
    model = ptq(_fuzz_net(), "nvfp4", activations=True, calibration=[torch.randn(8, 32)], skip=[], progress=False)
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    for layout in LAYOUTS:
        d = export(model, root / layout, layout, dtype=None)
        out[layout] = (d, safetensors_torch.load_file(str(d / "model.safetensors")))
    return out


SAFE_DECODE = (2.0**-100, 2.0**100)  # decode scales in here (and their encode reciprocals) must always load


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layout=st.sampled_from(LAYOUTS),
    which=st.sampled_from(["weight", "input"]),
    layer=st.sampled_from(["0", "2"]),
    value=st.one_of(
        st.floats(width=32),  # NaN, +-Inf, zeros, subnormals, negatives, huge and tiny
        st.sampled_from([2.5e-39, 2.9e-39, 1.1754942e-38, 3e38, 3.4028235e38, 1e-45, -0.0]),
        st.floats(min_value=SAFE_DECODE[0], max_value=SAFE_DECODE[1], width=32),
    ),
    block_byte=st.one_of(st.none(), st.integers(0, 255)),
)
def test_fuzz_scales_load_only_into_finite_numbers(fuzz_ckpts, tmp_path, layout, which, layer, value, block_byte):
    """Any global scale value (and any one block-scale byte): load_quantized either raises CheckpointError
    naming the tensor, or every layer decodes to finite weights and finite quantized activations. Decode
    scales in [2^-100, 2^100] (encode scales their reciprocals) with ordinary block scales always load."""
    import shutil
    import uuid

    src, tensors = fuzz_ckpts[layout]
    name = f"{layer}.{GLOBAL[layout][0 if which == 'weight' else 1]}"
    t = dict(tensors)
    t[name] = torch.tensor(value, dtype=torch.float32).reshape(t[name].shape)
    if block_byte is not None:
        s = t[f"{layer}.weight_scale"].clone()
        s.view(torch.uint8)[0, 0] = block_byte
        t[f"{layer}.weight_scale"] = s
    d = tmp_path / uuid.uuid4().hex
    shutil.copytree(src, d)
    safetensors_torch.save_file(t, str(d / "model.safetensors"))
    try:
        model = load_quantized(d, model=_fuzz_net())
    except CheckpointError as e:
        assert repr(name) in str(e) or repr(f"{layer}.weight_scale") in str(e), str(e)
        stored_decode = value if layout == "modelopt" else (1 / value if value else float("inf"))
        block = None if block_byte is None else float(torch.tensor([block_byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())
        safe_block = block is None or (block >= 0 and block == block)  # not negative, not NaN
        assert not (SAFE_DECODE[0] <= stored_decode <= SAFE_DECODE[1] and safe_block), f"{value} wrongly rejected: {e}"
        return
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    for m in quantized_linears(model).values():
        assert torch.isfinite(m.dequantized_weight()).all()
        assert torch.isfinite(m.quantize_input(torch.randn(4, m.in_features))).all()
    with torch.no_grad():
        model[0](x)  # runs
