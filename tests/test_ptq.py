"""fourbit.ptq on a tiny random LlamaForCausalLM: logits against an independent dequantize-then-matmul
reference, skip policy, calibration, and the export-exact amax."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fourbit import quantize
from fourbit.hadamard import RHT, rht
from fourbit.nvfp4 import global_encode_scale
from fourbit.ptq import (
    QuantizedLinear, amax_for_encode_scale, fused_groups, ptq, quantized_linears, stable_input_amax,
)  # fmt: skip

transformers = pytest.importorskip("transformers")

from hf_models import tiny_llama  # noqa: E402

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # OCP MX v1.0 table 5, codes 0..7
MAX_STABLE_ULPS = 64  # stable_input_amax moves the calibrated amax up by at most this many float32 ulps


def batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 24), generator=g) for _ in range(n)]


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Independent E2M1 decode: bit 3 is the sign, bits 0-2 index the value table."""
    mag = E2M1_VALUES[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -mag, mag)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def reference_weight(m: QuantizedLinear) -> torch.Tensor:
    """Dequantize a QuantizedLinear's buffers without fourbit's decoders."""
    name = m.config.name
    if name == "nvfp4":
        v = decode_e2m1(unpack(m.weight_data)).reshape(m.out_features, -1, 16)
        w = v * m.weight_scales.float()[:, :, None] * m.weight_tensor_scale
    elif name == "mxfp4":
        v = decode_e2m1(unpack(m.weight_data)).reshape(m.out_features, -1, 32)
        w = v * m.weight_scales.float()[:, :, None]  # torch's float8_e8m0fnu -> float32 is 2^(e - 127)
    else:  # fp8: torch's own float8_e4m3fn decode; per tensor or 128x128 blocks
        v = m.weight_data.view(torch.float8_e4m3fn).float()
        s = m.weight_scales
        if s.dim() == 2:
            s = s.repeat_interleave(128, 0).repeat_interleave(128, 1)
        w = v * s
    return w.reshape(w.shape[0], -1)[: m.out_features, : m.in_features]


def reference_model(original: nn.Module, quantized: nn.Module) -> nn.Module:
    """The original model with each quantized Linear's weight replaced by its independently decoded
    weight, and (with activations) its input quantized-dequantized by fourbit.quantize beforehand."""
    ref_modules = dict(original.named_modules())
    for name, q in quantized_linears(quantized).items():
        lin = ref_modules[name]
        with torch.no_grad():
            lin.weight.copy_(reference_weight(q))
        if q.activations:
            amax = q.input_amax if q.config.name == "nvfp4" else None
            cfg = q.act_config()
            lin.register_forward_pre_hook(lambda _m, a, c=cfg, am=amax: (quantize(a[0], c, amax=am, pad=True).dequantize(),))
    return original


SCHEMES = ["nvfp4", "mxfp4", "fp8"]


@pytest.mark.parametrize("activations", [False, True], ids=["W", "W+A"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_logits_equal_dequantize_then_matmul(scheme, activations):
    calib = batches()
    q = ptq(tiny_llama(), scheme, activations=activations, calibration=calib, progress=False)
    ref = reference_model(tiny_llama(), q)
    x = batches(1, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(q(x).logits, ref(x).logits)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stored_weight_is_the_core_quantization(scheme):
    base = tiny_llama()
    q = ptq(tiny_llama(), scheme, fuse=[], progress=False)
    for name, m in quantized_linears(q).items():
        w = dict(base.named_modules())[name].weight.detach()
        expect = quantize(w, m.config, pad=True).dequantize()
        assert torch.equal(reference_weight(m), expect), name


FUSED = [("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))]


@pytest.mark.parametrize("activations", [False, True], ids=["W", "W+A"])
def test_fused_groups_share_the_max_amax(activations):
    """q/k/v and gate/up: one tensor scale from the group's max weight amax, one input amax; each weight
    then quantized against it (the core quantizer given that amax), block scales after."""
    base = tiny_llama()
    q = ptq(tiny_llama(), "nvfp4", activations=activations, calibration=batches(), progress=False)
    mods, qmods = dict(base.named_modules()), quantized_linears(q)
    for layer in range(2):
        for parent, children in FUSED:
            names = [f"model.layers.{layer}.{parent}.{c}" for c in children]
            group_amax = max(float(mods[n].weight.detach().abs().max()) for n in names)
            own = {float(mods[n].weight.detach().abs().max()) for n in names}
            assert len(own) == len(names), "members must differ for the test to mean anything"
            for n in names:
                m = qmods[n]
                assert torch.equal(m.weight_tensor_scale, qmods[names[0]].weight_tensor_scale), n
                expect = quantize(mods[n].weight.detach(), "nvfp4", amax=group_amax)
                assert torch.equal(reference_weight(m), expect.dequantize()), n
                if activations:
                    assert torch.equal(m.input_amax, qmods[names[0]].input_amax), n
    # o_proj and down_proj stand alone
    alone = quantize(mods["model.layers.0.mlp.down_proj"].weight.detach(), "nvfp4").dequantize()
    assert torch.equal(reference_weight(qmods["model.layers.0.mlp.down_proj"]), alone)


def test_fused_group_detection_by_names_and_shapes():
    """Sibling names of the HF conventions, all being quantized, one in_features; nothing else."""

    def block(**children):
        m = nn.Module()
        for name, (i, o) in children.items():
            setattr(m, name, nn.Linear(i, o))
        return m

    root = nn.Module()
    root.attn = block(q_proj=(32, 32), k_proj=(32, 16), v_proj=(32, 16), o_proj=(32, 32))
    root.bert = block(query=(32, 32), key=(32, 32), value=(32, 32))
    root.mlp = block(gate_proj=(32, 64), up_proj=(48, 64), down_proj=(64, 32))  # widths differ: no group
    root.mla = block(q_a_proj=(32, 16), kv_a_proj_with_mqa=(32, 24), kv_b_proj=(24, 32))
    root.moe = nn.Module()
    root.moe.experts = nn.ModuleList([block(w1=(32, 64), w2=(64, 32), w3=(32, 64)) for _ in range(2)])
    root.part = block(q_proj=(32, 32), k_proj=(32, 32), v_proj=(32, 32))
    names = [n for n, m in root.named_modules() if isinstance(m, nn.Linear) and n != "part.v_proj"]
    assert fused_groups(root, names) == [
        ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
        ("bert.query", "bert.key", "bert.value"),
        ("mla.q_a_proj", "mla.kv_a_proj_with_mqa"),
        ("moe.experts.0.w1", "moe.experts.0.w3"),
        ("moe.experts.1.w1", "moe.experts.1.w3"),
    ]  # part.* lacks v_proj (skipped), so it is not a group
    assert fused_groups(root, names, fuse=[]) == []


def test_user_fuse_groups_and_errors():
    q = ptq(tiny_llama(), "nvfp4", fuse=[["model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj"]],
            progress=False)  # fmt: skip
    qm = quantized_linears(q)
    assert torch.equal(qm["model.layers.0.self_attn.o_proj"].weight_tensor_scale,
                       qm["model.layers.0.self_attn.q_proj"].weight_tensor_scale)  # fmt: skip
    assert not torch.equal(qm["model.layers.0.self_attn.q_proj"].weight_tensor_scale,
                           qm["model.layers.0.self_attn.k_proj"].weight_tensor_scale)  # fmt: skip
    with pytest.raises(ValueError, match="in_features"):
        ptq(tiny_llama(), "nvfp4", fuse=[["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]])
    with pytest.raises(ValueError, match="'lm_head' is not a Linear being quantized"):
        ptq(tiny_llama(), "nvfp4", fuse=[["lm_head", "model.layers.0.mlp.up_proj"]])
    with pytest.raises(ValueError, match="two groups"):
        ptq(tiny_llama(), "nvfp4", fuse=[["model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj"],
                                         ["model.layers.0.mlp.up_proj"]])  # fmt: skip
    with pytest.raises(TypeError, match="string"):
        ptq(tiny_llama(), "nvfp4", fuse=["model.layers.0.mlp.up_proj"])


def test_fp8_blockwise_pads_partial_blocks():
    """128x128 weight blocks on 64-wide layers: zero padding, cropped on dequantize."""
    q = ptq(tiny_llama(), "fp8-blockwise", activations=True, progress=False)
    m = q.model.layers[0].mlp.down_proj  # 64 x 128
    assert m.weight_data.shape == (128, 128) and m.weight_scales.shape == (1, 1)
    ref = reference_model(tiny_llama(), q)
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(q(x).logits, ref(x).logits)


def test_lm_head_and_tied_embedding_stay_high_precision():
    q = ptq(tiny_llama(tie=True), "nvfp4", progress=False)
    assert isinstance(q.lm_head, nn.Linear) and isinstance(q.model.embed_tokens, nn.Embedding)
    assert q.lm_head.weight.data_ptr() == q.model.embed_tokens.weight.data_ptr()
    assert len(quantized_linears(q)) == 2 * 7  # q k v o gate up down per layer


def test_tied_linear_skipped_even_when_not_named_lm_head():
    m = tiny_llama(tie=True)
    q = ptq(m, "nvfp4", skip=[], progress=False)  # no name patterns: the tie alone keeps it
    assert isinstance(q.lm_head, nn.Linear)


def test_skip_patterns_and_callable():
    q = ptq(tiny_llama(tie=False), "mxfp4", skip=["lm_head", "*.mlp.*"], progress=False)
    names = set(quantized_linears(q))
    assert names and all(".self_attn." in n for n in names)
    q = ptq(tiny_llama(tie=False), "mxfp4", skip=lambda name, m: m.out_features != 64, progress=False)
    assert all(m.out_features == 64 for m in quantized_linears(q).values())
    assert not isinstance(q.lm_head, QuantizedLinear)  # out_features 128


def test_calibrated_amax_is_max_abs_input_moved_up_a_few_ulps():
    calib = batches(3)
    base = tiny_llama()
    seen = {}
    hooks = [
        lin.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, max(seen.get(n, 0.0), float(a[0].abs().max()))))
        for n, lin in base.named_modules() if isinstance(lin, nn.Linear) and n != "lm_head"
    ]  # fmt: skip
    with torch.no_grad():
        for b in calib:
            base(b)
    for h in hooks:
        h.remove()
    q = ptq(tiny_llama(), "nvfp4", activations=True, calibration=calib, progress=False)
    for name, m in quantized_linears(q).items():
        raw = torch.tensor(seen[name], dtype=torch.float32)
        got = m.input_amax
        assert got >= raw, name
        ulp = torch.nextafter(raw, torch.tensor(float("inf"))) - raw
        assert float(got - raw) <= MAX_STABLE_ULPS * float(ulp) * 2, name  # ulp may double across a binade


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=2.0**-100, max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32))
def test_stable_amax_survives_both_checkpoint_forms(amax):
    a = stable_input_amax(amax)
    s_enc = global_encode_scale(a)
    one = torch.tensor(1.0)
    assert torch.equal(one / (one / s_enc), s_enc)  # ModelOpt's decode scale gives s_enc back
    assert torch.equal(global_encode_scale(amax_for_encode_scale(s_enc)), s_enc)  # and an amax for it


def test_nvfp4_activations_need_calibration():
    with pytest.raises(ValueError, match="calibration"):
        ptq(tiny_llama(), "nvfp4", activations=True)


def test_dict_batches_and_unreached_layers():
    calib = [{"input_ids": b} for b in batches(2)]
    q = ptq(tiny_llama(), "nvfp4", activations=True, calibration=calib, progress=False)
    assert all(float(m.input_amax) > 0 for m in quantized_linears(q).values())
    with pytest.raises(ValueError, match="never reached"):
        ptq(tiny_llama(), "nvfp4", activations=True, calibration=[], progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheme": "int4"}, "unknown scheme"),
        ({"scheme": "mxfp4", "four_over_six": True}, "four_over_six"),
        ({"scheme": "nvfp4", "skip": "lm_head"}, "single string"),
    ],
    ids=["unknown", "4over6-mx", "skip-str"],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ptq(tiny_llama(), **kwargs)


def test_rht_layer_is_rotated_dequantize_then_matmul():
    lin = nn.Linear(64, 32, bias=True)
    transform = RHT(seed=11)
    m = QuantizedLinear.from_linear(lin, quantize(torch.zeros(1, 16), "nvfp4").config, rht=transform)
    x = torch.randn(5, 64)
    w_hat = quantize(rht(lin.weight.detach(), -1, transform=transform), "nvfp4").dequantize()
    expect = F.linear(rht(x, -1, transform=transform), w_hat, lin.bias.detach())
    assert torch.equal(m(x), expect)
    # the rotation is orthogonal: without quantization it would leave the product unchanged
    exact = F.linear(rht(x, -1, transform=transform), rht(lin.weight.detach(), -1, transform=transform))
    torch.testing.assert_close(exact, F.linear(x, lin.weight.detach()), atol=1e-5, rtol=1e-5)


def test_four_over_six_lowers_weight_error():
    base = tiny_llama()
    plain = ptq(tiny_llama(), "nvfp4", progress=False)
    fos = ptq(tiny_llama(), "nvfp4", four_over_six=True, progress=False)
    err = lambda q: sum(  # noqa: E731
        float((reference_weight(m) - dict(base.named_modules())[n].weight.detach()).square().sum())
        for n, m in quantized_linears(q).items()
    )
    assert err(fos) < err(plain)
