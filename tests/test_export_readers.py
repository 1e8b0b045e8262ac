"""fourbit's NVFP4 exports read by the real third-party readers, CPU only:

- compressed-tensors (pinned 0.20.1): its own NVFP4 preset objects serialize to exactly the
  ``quantization_config`` fourbit writes; transformers' default ``from_pretrained`` loads and runs the
  export in bf16; ``ModelCompressor.decompress_model`` gives weights within 1 bf16 ulp of fourbit's
  float32 dequantization (it decompresses to bf16); its activation fake-quantization with the file's
  ``input_global_scale`` is fourbit's within 1 float32 ulp; logits agree within the tolerances below.
- NVIDIA ModelOpt (pinned 0.47.0, which quantizes and exports on CPU): ``mtq.quantize`` +
  ``export_hf_checkpoint`` of the same tiny Llama gives the same tensor names, dtypes, shapes,
  ``hf_quant_config.json`` and config.json as fourbit's export, and the same codes and block scales in
  every layer whose tensor decode scale both compute to the same float32 (fused q/k/v and gate/up
  included: ModelOpt shares them too).
"""

import json
import warnings

import pytest
import torch

from fourbit.export import compressed_tensors_library_config, compressed_tensors_literal, export, load_quantized
from fourbit.ptq import fused_groups, ptq, quantized_linears

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from hf_models import tiny_llama  # noqa: E402

# W4A16: transformers runs the decompressed model in bf16, fourbit in float32 GEMMs with bf16 outputs:
# logits |< 2 here, so 2 bf16 ulps of [1, 2).
LOGIT_ATOL_W4A16 = 2.0**-6
# W4A4: both quantize every activation to 4 bits; a 1-ulp difference in an input (bf16 GEMM vs float32)
# moves an element across a rounding boundary now and then, and one flipped E2M1 code changes its
# product by up to a whole code step, which the next layers carry. Measured 0.055 on this model.
LOGIT_ATOL_W4A4 = 2.0**-3
ACTS = [False, True]
IDS = ["W4A16", "W4A4"]


def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, 24), generator=g) for _ in range(2)]


def tokens():
    return torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(5))


def ulps_apart(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|a - b| in units of the ulp (of ``dtype``) at max(|a|, |b|)."""
    m = torch.maximum(a.abs(), b.abs()).to(dtype)
    ulp = (torch.nextafter(m.float(), torch.tensor(float("inf"))) - m.float()) if dtype == torch.float32 else (
        torch.nextafter(m, torch.tensor(float("inf"), dtype=dtype)).float() - m.float()
    )  # fmt: skip
    return (a.float() - b.float()).abs() / ulp.clamp_min(torch.finfo(torch.float32).tiny)


# ---------------------------------------------------------------------------------- compressed-tensors
@pytest.mark.parametrize("act", ACTS, ids=IDS)
def test_ct_config_literal_equals_the_library_objects(act):
    ct = pytest.importorskip("compressed_tensors")
    lib = compressed_tensors_library_config(act, ["lm_head"])
    lit = compressed_tensors_literal(act, ["lm_head"])
    assert lib["version"] == ct.__version__
    assert {**lit, "version": ct.__version__} == lib


@pytest.fixture(scope="module", params=ACTS, ids=IDS)
def ct_export(request, tmp_path_factory):
    pytest.importorskip("compressed_tensors")
    model = ptq(tiny_llama(dtype=torch.bfloat16), "nvfp4", activations=request.param, calibration=calib(), progress=False)
    out = export(model, tmp_path_factory.mktemp("ct"), "compressed-tensors")
    return request.param, model, out


def hf_decompressed(out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    hf.hf_quantizer.compressor.decompress_model(hf)  # compressed_tensors ModelCompressor
    return hf


def test_ct_transformers_loads_runs_and_matches_fourbit(ct_export):
    act, model, out = ct_export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out))  # transformers' default path
    assert hf.dtype == torch.bfloat16
    x = tokens()
    with torch.no_grad():
        theirs = hf(x).logits.float()
        ours = load_quantized(out)(x).logits.float()
    assert torch.isfinite(theirs).all()
    tol = LOGIT_ATOL_W4A4 if act else LOGIT_ATOL_W4A16
    assert float((theirs - ours).abs().max()) <= tol


def test_ct_decompressed_weights_within_one_bf16_ulp(ct_export):
    act, model, out = ct_export
    hf = hf_decompressed(out)
    mods = dict(hf.named_modules())
    for name, q in quantized_linears(load_quantized(out)).items():
        w = mods[name].weight.detach()
        assert w.dtype == torch.bfloat16, name  # compressed-tensors decompresses NVFP4 to bf16
        assert float(ulps_apart(w.float(), q.dequantized_weight(), torch.bfloat16).max()) <= 1, name


@pytest.mark.parametrize("ct_export", [True], ids=["W4A4"], indirect=True)
def test_ct_activation_quantization_honours_the_input_scale(ct_export):
    act, model, out = ct_export
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    hf = hf_decompressed(out)
    torch.nn.Module.float(hf)  # their fake quantization in float32, like fourbit's
    mods = dict(hf.named_modules())
    g = torch.Generator().manual_seed(2)
    for name, q in quantized_linears(load_quantized(out)).items():
        m = mods[name]
        x = torch.randn(4, q.in_features, generator=g) * 0.3
        theirs = forward_quantize(m, x.clone(), "input", m.quantization_scheme.input_activations)
        ours = q.quantize_input(x)
        assert float(ulps_apart(theirs, ours, torch.float32).max()) <= 1, name
        # and the scale matters: another input scale gives other values
        assert not torch.equal(theirs, q.quantize_input(x * 4) / 4), name


def test_float32_model_default_export_loads_in_transformers(tmp_path):
    """Issue 20: a float32 export failed in transformers' compressed-tensors load (bf16 decompressed
    weights, float32 activations). The default export is bf16 whatever the model's dtype."""
    pytest.importorskip("compressed_tensors")
    model = ptq(tiny_llama(), "nvfp4", progress=False)  # float32
    out = export(model, tmp_path, "compressed-tensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        assert torch.isfinite(hf(tokens()).logits).all()


# ---------------------------------------------------------------------------------- ModelOpt
def modelopt_export(act: bool, out):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_hf_checkpoint

    model = tiny_llama(dtype=torch.bfloat16)
    model.config.architectures = ["LlamaForCausalLM"]  # ModelOpt 0.47 iterates it (None for a config-built model)

    def forward_loop(m):
        for b in calib():
            m(b)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG if act else mtq.W4A16_NVFP4_CFG, forward_loop)
        export_hf_checkpoint(model, export_dir=str(out))
    return out


@pytest.fixture(scope="module", params=ACTS, ids=IDS)
def both_exports(request, tmp_path_factory):
    act = request.param
    theirs = modelopt_export(act, tmp_path_factory.mktemp("modelopt"))
    model = ptq(tiny_llama(dtype=torch.bfloat16), "nvfp4", activations=act, calibration=calib(), progress=False)
    ours = export(model, tmp_path_factory.mktemp("fourbit"), "modelopt")
    return act, model, ours, theirs


def load(d):
    return safetensors_torch.load_file(str(d / "model.safetensors"))


def test_modelopt_same_files_names_dtypes_shapes(both_exports):
    act, model, ours, theirs = both_exports
    assert sorted(f.name for f in ours.iterdir()) == sorted(f.name for f in theirs.iterdir())
    a, b = load(ours), load(theirs)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in a.items()} == {k: (v.dtype, tuple(v.shape)) for k, v in b.items()}


def test_modelopt_same_configs(both_exports):
    act, model, ours, theirs = both_exports

    def read(d, name):
        data = json.loads((d / name).read_text())
        block = data.get("quantization_config", data)
        assert block.pop("producer")["name"] in ("fourbit", "modelopt")
        return data

    assert read(ours, "hf_quant_config.json") == read(theirs, "hf_quant_config.json")
    assert read(ours, "config.json") == read(theirs, "config.json")
    assert json.loads((ours / "generation_config.json").read_text()) == json.loads((theirs / "generation_config.json").read_text())


E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
MIDPOINT_RTOL = 2.0**-20  # a few float32 roundings


def decode_e2m1(packed: torch.Tensor) -> torch.Tensor:
    codes = torch.stack((packed & 0xF, packed >> 4), -1).reshape(packed.shape[0], -1)
    mag = E2M1_VALUES[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def assert_codes_agree_off_midpoints(name, a, b, w):
    """Same E2M1 codes, except elements whose scaled value x / (s_b * s_dec) lies on a midpoint between
    two E2M1 values (to float32 rounding): ModelOpt divides by the scale, fourbit (Transformer Engine's
    order) multiplies by fp32(1 / (s_b * s_dec)); ties and near-ties can round to the other neighbour."""
    va, vb = decode_e2m1(a[f"{name}.weight"]), decode_e2m1(b[f"{name}.weight"])
    diff = va != vb
    if not diff.any():
        return
    scale = a[f"{name}.weight_scale"].double().repeat_interleave(16, 1) * a[f"{name}.weight_scale_2"].double()
    scaled = (w.double() / scale)[diff]
    mid = (va[diff].double() + vb[diff].double()) / 2
    steps = torch.searchsorted(E2M1_VALUES, torch.maximum(va[diff].abs(), vb[diff].abs())) - torch.searchsorted(
        E2M1_VALUES, torch.minimum(va[diff].abs(), vb[diff].abs())
    )  # fmt: skip
    assert (steps == 1).all(), f"{name}: codes more than one E2M1 step apart"
    assert ((scaled - mid).abs() <= MIDPOINT_RTOL * mid.abs()).all(), f"{name}: a differing code off a midpoint"
    assert int(diff.sum()) <= diff.numel() // 100, f"{name}: {int(diff.sum())} of {diff.numel()} codes differ"


def test_modelopt_same_codes_and_scales_where_the_amax_agrees(both_exports):
    act, model, ours, theirs = both_exports
    a, b = load(ours), load(theirs)
    qlins = quantized_linears(model)
    base = dict(tiny_llama(dtype=torch.bfloat16).named_modules())
    compared = 0
    for name in qlins:
        if not torch.equal(a[f"{name}.weight_scale_2"], b[f"{name}.weight_scale_2"]):
            # amax/(6*448) rounded once (ModelOpt) vs 1/fp32(6*448/amax) twice (fourbit): 1 ulp apart
            sa, sb = a[f"{name}.weight_scale_2"], b[f"{name}.weight_scale_2"]
            assert float(ulps_apart(sa, sb, torch.float32)) <= 1, name
            continue
        compared += 1
        assert torch.equal(a[f"{name}.weight_scale"].view(torch.uint8), b[f"{name}.weight_scale"].view(torch.uint8)), name
        assert_codes_agree_off_midpoints(name, a, b, base[name].weight.detach())
        if act:  # fourbit moves the calibrated amax up a few ulps so both file forms round-trip
            assert float(ulps_apart(a[f"{name}.input_scale"], b[f"{name}.input_scale"], torch.float32)) <= 64, name
    assert compared >= len(qlins) // 2, f"only {compared} of {len(qlins)} layers had equal decode scales"
    for g in fused_groups(model, qlins):  # ModelOpt shares them too (preprocess_linear_fusion)
        assert len({float(b[f"{n}.weight_scale_2"]) for n in g}) == 1, g


def test_load_quantized_reads_modelopts_own_export(both_exports):
    """The other direction: ModelOpt's checkpoint loads in fourbit; each layer decodes to ModelOpt's
    formula q * s_b * weight_scale_2 exactly, and the logits are close to fourbit's own export's."""
    act, model, ours, theirs = both_exports
    loaded = load_quantized(theirs)
    b = load(theirs)
    for name, q in quantized_linears(loaded).items():
        v = decode_e2m1(b[f"{name}.weight"]).reshape(q.out_features, -1, 16)
        w = (v * b[f"{name}.weight_scale"].float()[:, :, None] * b[f"{name}.weight_scale_2"]).reshape(q.out_features, -1)
        assert torch.equal(q.dequantized_weight(), w), name
    x = tokens()
    with torch.no_grad():
        diff = (loaded(x).logits.float() - load_quantized(ours)(x).logits.float()).abs().max()
    assert float(diff) <= (LOGIT_ATOL_W4A4 if act else LOGIT_ATOL_W4A16 * 4)
