"""Model conversion: what convert swaps and keeps, its report, mismatches, recipes mid-run, QAT."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fourbit
from fourbit.nn import QATLinear, QuantLinear, convert, qat, report, set_progress, set_recipe
from fourbit.recipes import HighPrecision, get_recipe


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class TinyLM(nn.Module):
    """Embedding, a ModuleList of blocks, a tied LM head, and a non-block projection."""

    def __init__(self, d: int = 32, n_blocks: int = 4, vocab: int = 50) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.proj_in = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.proj_in(self.wte(idx))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


def all_blocks(recipe):
    """The recipe with every block quantized (no high-precision blocks)."""
    return replace(recipe, high_precision=HighPrecision.none())


def _kinds(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_convert_keeps_parameters_and_state_dict_keys():
    torch.manual_seed(0)
    model = TinyLM()
    before = model.state_dict()
    params = {n: p for n, p in model.named_parameters()}
    assert convert(model, "nvfp4") is model  # in place, and returned
    rep = report(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr() for k in before)
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    assert model.lm_head.weight is model.wte.weight
    assert len(rep) == 10 and len(rep.quantized) == 7  # HighPrecision(): only block 3 of 4 kept


def test_report_lists_every_linear_and_reason():
    model = TinyLM(n_blocks=8)  # high precision: the last max(1, round(1.2)) = 1 block -> {7}
    rep = report(convert(model, "nvfp4", skip=lambda name, m: name == "blocks.3.fc2"))
    rows = {r.name: r for r in rep.layers}
    assert set(rows) == set(_kinds(model))
    expected_kept = {"blocks.7.fc1", "blocks.7.fc2", "blocks.3.fc2", "lm_head"}
    assert set(rep.kept) == expected_kept
    assert {n for n, k in _kinds(model).items() if k == "QuantLinear"} == set(rep.quantized)
    assert "tied" in rows["lm_head"].reason and "skip" in rows["blocks.3.fc2"].reason
    assert "block 7 of 8" in rows["blocks.7.fc1"].reason
    text = str(rep)
    assert all(name in text for name in rows) and "14 of 18" in text
    # layer ids number all Linears in module order
    assert model.blocks[1].fc1.layer_id == 3 and model.proj_in.layer_id == 0


def test_untied_head_and_mha_stay_high_precision():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(64, 32)
            self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
            self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))
            self.out = nn.Linear(32, 64)  # outside the blocks, onto the vocabulary

    model = Net()
    rep = report(convert(model, all_blocks(get_recipe("nvfp4"))))
    assert set(rep.kept) == {"attn.out_proj", "out"}
    assert set(rep.quantized) == {"layers.0", "layers.1", "layers.2"}


def test_mismatch_raises_with_name_or_is_skipped():
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 32))
    recipe = get_recipe("nvfp4-none")
    with pytest.raises(ValueError, match=r"'2'.*out_features=40.*multiples of 16"):
        convert(model, all_blocks(recipe))
    assert all(type(m) is nn.Linear for m in model if isinstance(m, nn.Linear))  # nothing half-converted
    with pytest.warns(UserWarning, match="kept 2 in high precision"):  # 2 of 3 kept
        rep = report(convert(model, all_blocks(recipe), on_mismatch="skip"))
    assert set(rep.kept) == {"2", "4"} and "multiples of 16" in str(rep)
    assert isinstance(model[0], QuantLinear)
    with pytest.raises(ValueError, match="on_mismatch"):
        convert(model, recipe, on_mismatch="ignore")
    with pytest.raises(TypeError):
        convert("model", recipe)


def test_set_recipe_and_late_switch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    convert(model, all_blocks(get_recipe("nvfp4+late-bf16")))
    x = torch.randn(16, 64)
    set_progress(model, 0.5)
    lin = model[0]
    y_q = lin(x)
    set_progress(model, 0.95)  # past switch_to_bf16_at = 0.9: the forward GEMM is unquantized
    xg = x.clone().requires_grad_()
    y_hp = lin(xg)
    exact = x.double() @ lin.weight.double().T + lin.bias.double()
    assert (y_hp.double() - exact).abs().max() < 1e-4 < (y_q.double() - exact).abs().max()
    dy = torch.randn(16, 64)
    y_hp.backward(dy)
    assert (xg.grad.double() - dy.double() @ lin.weight.double()).abs().max() > 1e-3  # backward still 4-bit

    assert set_recipe(model, "bf16") == 2
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    with pytest.raises(ValueError, match="multiples of 128"):
        set_recipe(model, "fp8-blockwise")
    assert lin.recipe.name == "bf16"  # unchanged after the failed call
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError):
            set_progress(model, bad)


def test_hugging_face_llama_converts():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    keys = list(model.state_dict())
    idx = torch.randint(0, 96, (2, 16))
    rep = report(convert(model, "nvfp4"))
    assert list(model.state_dict()) == keys
    assert "lm_head" in rep.kept
    # 7 linears per decoder layer (q, k, v, o, gate, up, down); layer 3 kept
    assert len(rep.quantized) == 21 and not any(n.startswith("model.layers.3.") for n in rep.quantized)
    out = model(idx, labels=idx)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.model.layers[1].mlp.down_proj.weight.grad is not None


def test_qat_fake_quantizes_with_straight_through_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    keys = list(model.state_dict())
    assert qat(model, "nvfp4", activations=True) is model
    assert list(model.state_dict()) == keys and len(report(model).quantized) == 2
    layer = model[0]
    assert isinstance(layer, QATLinear)
    x = torch.randn(8, 64, requires_grad=True)
    y = layer(x)
    wq = fourbit.quantize(layer.weight.detach(), "nvfp4").dequantize()
    xq = fourbit.quantize(x.detach(), "nvfp4").dequantize()
    assert torch.equal(y, F.linear(xq, wq, layer.bias))
    dy = torch.randn(8, 32)
    y.backward(dy)
    assert torch.allclose(layer.weight.grad, dy.T @ xq, rtol=1e-6, atol=1e-6)  # STE: dW = dy^T Q(x)
    assert torch.allclose(x.grad, dy @ wq, rtol=1e-6, atol=1e-6)  # STE: dx = dy Q(W)

    with pytest.raises(ValueError, match="'0'"):
        qat(nn.Sequential(nn.Linear(40, 32)), "nvfp4")
    with pytest.raises(ValueError, match="unknown scheme"):
        qat(nn.Sequential(nn.Linear(32, 32)), "int4")


def test_qat_weight_only_leaves_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    qat(model, fourbit.NVFP4Config(block=(16, 16)))
    x = torch.randn(4, 64)
    wq = fourbit.quantize(model[0].weight.detach(), "nvfp4", block=(16, 16)).dequantize()
    assert torch.equal(model(x), F.linear(x, wq, model[0].bias))


def test_convert_again_starts_from_scratch():
    model = TinyLM(d=128)
    convert(model, "nvfp4")  # block 3 of 4 kept
    first = _kinds(model)
    convert(model, "fp8-blockwise")  # no high-precision blocks: all 8 block linears quantized
    assert sum(k == "QuantLinear" for k in _kinds(model).values()) == 9
    assert model.blocks[0].fc1.recipe.name == "fp8-blockwise"
    convert(model, "nvfp4")
    assert _kinds(model) == first and type(model.blocks[3].fc1) is nn.Linear
    assert model.lm_head.weight is model.wte.weight


def test_convert_and_qat_of_a_bare_linear_return_the_new_layer():
    """A bare Linear cannot be swapped in place: the new layer is returned, over the same Parameters, with
    the plain Linear's state_dict keys (the old convert set an attribute named '' and added '.weight')."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    q = convert(lin, all_blocks(get_recipe("nvfp4")))
    assert isinstance(q, QuantLinear) and q.weight is lin.weight and q.bias is lin.bias
    assert list(q.state_dict()) == ["weight", "bias"]
    assert report(q).quantized == ("(model)",)
    x = torch.randn(4, 32)
    assert not torch.equal(q(x), lin(x))  # it computes in 4 bits
    fq = qat(nn.Linear(32, 16), "nvfp4")
    assert isinstance(fq, QATLinear) and list(fq.state_dict()) == ["weight", "bias"]
    with pytest.raises(ValueError, match=r"'\(model\)'.*in_features=40"):
        convert(nn.Linear(40, 16), all_blocks(get_recipe("nvfp4")))


def test_a_conversion_that_quantizes_nothing_warns_with_the_reason():
    """A 2-block model whose recipe keeps the first and last block quantizes 0 of its Linears: it says so."""
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    recipe = dataclasses.replace(get_recipe("nvfp4"), high_precision=HighPrecision(first_blocks=1))
    with pytest.warns(UserWarning, match=r"quantized none.*high-precision block 0 of 2.*HighPrecision.none\(\)"):
        convert(model, recipe)
    assert report(model).quantized == ()
    with pytest.warns(UserWarning, match="no nn.Linear"):
        convert(nn.Sequential(nn.ReLU()), "nvfp4")
    with pytest.warns(UserWarning, match="quantized none.*skip"):
        qat(nn.Sequential(nn.Linear(32, 32)), "nvfp4", skip=lambda n, m: True)


def test_a_normal_conversion_is_logged_not_warned(caplog, recwarn):
    with caplog.at_level("INFO", logger="fourbit"):
        convert(TinyLM(), "nvfp4")  # 6 of 8 block Linears quantized (the last block kept), the tied head always kept
    assert "7 of 10 linear layers quantized" in caplog.text
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_report_of_a_model_never_converted_is_an_error():
    with pytest.raises(ValueError, match="not converted"):
        report(TinyLM())


def test_one_swap_walk_plans_before_it_changes_anything():
    """plan_linears decides every Linear without touching the model; never_quantized also catches a head
    tied to the embedding through a second Parameter over the same storage (as some loaders produce)."""
    from fourbit.nn import never_quantized, plan_linears, swap_linears

    model = TinyLM(n_blocks=2)
    model.lm_head.weight = nn.Parameter(model.wte.weight.data)  # same storage, another Parameter
    assert never_quantized(model) == {"lm_head": "weight tied to an embedding"}
    plan = plan_linears(model, keep=lambda n, m: "mine" if n == "proj_in" else None)
    assert [(p.name, p.reason) for p in plan if p.reason] == [("proj_in", "mine"), ("lm_head", "weight tied to an embedding")]
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    model, rep = swap_linears(model, plan, lambda p: QATLinear.from_linear(p.module, "mxfp4"), "custom")
    assert type(model.blocks[1].fc2) is QATLinear and rep.kept == ("proj_in", "lm_head") and report(model) is rep
