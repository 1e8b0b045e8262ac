"""torch.compile of quantized models: QuantLinear traces whole (fullgraph), equals eager bit for bit in y, dx
and dW under every recipe (stochastic rounding across steps included), and does not recompile as the
step advances; only the late switch to BF16, whose GEMMs differ, compiles once more."""

import copy

import pytest
import torch

from fourbit.nn import QuantLinear, convert, set_progress
from fourbit.recipes import RECIPES, get_recipe

# every recipe whose layers work at these sizes (blocks up to 128x128)
RECIPE_NAMES = [name for name in RECIPES if "acc14" not in name]  # limited-accumulation models: slow, same path


def _step(layer, x, dy):
    """(y, dx, dW) of one training step, and the bias gradient apart: a sum over tokens, whose order Inductor
    chooses (it is outside the quantized GEMMs; compared to float32 summation accuracy)."""
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return (y.detach(), x.grad, layer.weight.grad.clone()), layer.bias.grad.clone()


def _assert_same(eager_out, compiled_out, what):
    (e, e_bias), (c, c_bias) = eager_out, compiled_out
    for name, a, b in zip(("y", "dx", "dW"), e, c):
        assert torch.equal(a, b), f"{what}: {name} differs"
    torch.testing.assert_close(e_bias, c_bias, rtol=1e-6, atol=1e-5)  # float32 sums of <= 64 terms


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_compiled_quant_linear_equals_eager_bit_for_bit(recipe):
    """Three training steps (SR seeds advance in the graph) with fullgraph=True under Inductor on CPU."""
    torch.manual_seed(0)
    eager = QuantLinear(256, 128, recipe=recipe, layer_id=3)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    for step in range(3):
        x, dy = torch.randn(48, 256), torch.randn(48, 128)
        eager.weight.grad = eager.bias.grad = twin.weight.grad = twin.bias.grad = None
        _assert_same(_step(eager, x, dy), _step(compiled, x, dy), f"step {step}")
    assert eager.step == twin.step == 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompilation as the step advances


def test_compiled_late_switch_recompiles_once_and_matches():
    torch.manual_seed(1)
    eager = QuantLinear(128, 64, recipe="nvfp4+late-bf16")
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    for step in range(6):
        progress = 0.8 + step * 0.04  # the switch is at 0.9: steps 0-2 quantize fprop, 3-5 run it in BF16
        for m in (eager, twin):
            m.progress = progress
        x, dy = torch.randn(32, 128), torch.randn(32, 64)
        eager.weight.grad = eager.bias.grad = twin.weight.grad = twin.bias.grad = None
        _assert_same(_step(eager, x, dy), _step(compiled, x, dy), f"step {step}")
    assert get_recipe("nvfp4+late-bf16").switch_to_bf16_at is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # before and after the switch


def test_compiled_under_autocast_equals_eager():
    torch.manual_seed(2)
    eager = QuantLinear(128, 64, recipe="nvfp4")
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)
    x, dy = torch.randn(32, 128), torch.randn(32, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e, c = _step(eager, x, dy), _step(compiled, x, dy)
    assert e[0][0].dtype == torch.bfloat16
    _assert_same(e, c, "autocast")


def test_converted_hf_style_model_compiles_whole():
    """A user's model converted with fourbit.nn.convert compiles with fullgraph=True and matches eager."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(128)
            self.up = torch.nn.Linear(128, 256)
            self.down = torch.nn.Linear(256, 128)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(self.norm(x))))

    torch.manual_seed(3)
    model = torch.nn.Sequential(*[Block() for _ in range(3)], torch.nn.Linear(128, 64))
    convert(model, "nvfp4")
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(2, 16, 128)
        le, lc = model(x).square().mean(), compiled(x).square().mean()
        le.backward()
        lc.backward()
        assert torch.equal(le, lc)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_compiled_harness_gpt_trains_like_eager():
    """The harness GPT under the NVFP4 recipe: 20 compiled training steps (fullgraph, AOT autograd without
    Inductor's elementwise rewrites) give the eager losses exactly; set_progress drives the late switch."""
    from fourbit.harness.model import get_preset
    from fourbit.harness.train import build_model, make_optimizer, resolve_recipe, train_config, train_step

    dev = torch.device("cpu")
    preset = get_preset("tiny", n_layer=2, block_size=32)
    cfg = train_config("tiny", recipe="nvfp4+late-bf16")

    def losses(compiled: bool) -> list[float]:
        model = build_model(preset, resolve_recipe("nvfp4+late-bf16"), dev)
        opt = make_optimizer(model, cfg, dev)
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        gen = torch.Generator().manual_seed(0)
        out = []
        for step in range(20):
            set_progress(model, step / 20)
            x = torch.randint(0, preset.vocab_size, (2, preset.block_size), generator=gen)
            loss, _ = train_step(run, opt, x, torch.roll(x, -1, 1), 1e-3, 1.0, dev)
            out.append(float(loss))
        return out

    assert losses(True) == losses(False)
