"""torch.compile of quantized models on CUDA: fullgraph, Inductor, and CUDA graphs through the compiler
(mode="reduce-overhead"). The quantize kernels and GEMMs run inside opaque custom ops, so a compiled
QuantLinear computes exactly what the eager one does; the SR keys come from the step in device memory,
so replays of a CUDA graph draw new bits."""

import copy

import pytest
import torch

from fourbit.nn import QuantLinear

RECIPES = ["nvfp4", "mxfp4", "fp8", "fp8-blockwise", "nvfp4-no-2d"]
# Inductor fuses the elementwise work around the quantized GEMMs (norms, activations, softmax) in other
# orders than eager: a last-bit change of an operand can flip an FP4 code and the runs drift apart. This
# bound passed on an H200 (2026-12-04) for both modes; the measured difference was not recorded (pytest-xdist
# swallows the print): run this file without -n to read it, then tighten the bound to a stated margin.
HARNESS_LOSS_TOL = 2e-2


def _step(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad.clone()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_compiled_quant_linear_equals_eager_on_cuda(recipe, mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = QuantLinear(512, 256, bias=False, recipe=recipe, layer_id=2).cuda().bfloat16()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, mode=mode)
    torch._dynamo.utils.counters.clear()
    for step in range(4):
        x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        eager.weight.grad = twin.weight.grad = None
        for name, e, c in zip(("y", "dx", "dW"), _step(eager, x, dy), _step(compiled, x, dy)):
            assert torch.equal(e, c), f"step {step}: {name} differs"
    assert eager.step == twin.step == 4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_harness_gpt_trains_like_eager_on_cuda(mode):
    from fourbit.harness.model import get_preset
    from fourbit.harness.train import build_model, make_optimizer, resolve_recipe, train_config, train_step

    torch._dynamo.reset()
    dev = torch.device("cuda")
    preset = get_preset("tiny", block_size=128)
    cfg = train_config("tiny", recipe="nvfp4")

    def losses(compiled: bool) -> list[float]:
        model = build_model(preset, resolve_recipe("nvfp4"), dev)
        opt = make_optimizer(model, cfg, dev)
        run = torch.compile(model, fullgraph=True, mode=mode) if compiled else model
        gen = torch.Generator(device="cuda").manual_seed(0)
        out = []
        for _ in range(20):
            x = torch.randint(0, preset.vocab_size, (8, preset.block_size), device=dev, generator=gen)
            loss, _ = train_step(run, opt, x, torch.roll(x, -1, 1), 1e-3, 1.0, dev)
            out.append(float(loss))
        return out

    e, c = losses(False), losses(True)
    worst = max(abs(a - b) for a, b in zip(e, c))
    print(f"compiled ({mode}) vs eager, 20 steps: max |loss difference| {worst:.2e}")
    assert worst <= HARNESS_LOSS_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4", "fp8", "fp8-blockwise"])
def test_opcheck_cuda_implementations(scheme):
    """torch.library.opcheck on the CUDA implementations (the kernels): schema, fake vs real, AOT dispatch."""
    from fourbit import ops
    from fourbit.nn.functional import recipe_key
    from fourbit.recipes import get_recipe
    from fourbit.schemes import resolve_scheme

    config = resolve_scheme(scheme)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.fourbit.quantize.default, (x, ops.scheme_key(config), True, 7, None, None, 0, 0, -1))
    qa, qb = ops.quantize(x, config), ops.quantize(torch.randn(32, 256, device="cuda"), config)
    torch.library.opcheck(torch.ops.fourbit.qmm.default, (*ops._flat(qa), *ops._flat(qb), torch.float32))
    if scheme == "nvfp4":
        torch.library.opcheck(torch.ops.fourbit.quantize_dequantized.default,
                              (x, ops.scheme_key(config), False, 0, None, None, 0, 0, -1))
        torch.library.opcheck(torch.ops.fourbit.quantize_wgrad.default,
                              (x, ops.scheme_key(config), True, 3, None, None, None, 0, 0, -1, True))
        torch.library.opcheck(torch.ops.fourbit.seed_keys.default, (torch.tensor([5], device="cuda"), 12345))
    w = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    key = recipe_key(get_recipe(scheme if scheme != "fp8-blockwise" else "fp8-blockwise"))
    torch.library.opcheck(torch.ops.fourbit.linear_forward.default,
                          (x.requires_grad_(), w, torch.tensor([2], device="cuda"), key, 0, 0, torch.bfloat16))


@pytest.mark.gpu
def test_harness_train_compiles_by_default_on_cuda_and_resumes(tmp_path):
    """``fourbit train`` on one GPU runs under torch.compile(mode="reduce-overhead") unless --no-compile:
    evaluation (another graph), the late BF16 switch and a resume from a checkpoint work inside it, and
    the losses follow the eager run's within HARNESS_LOSS_TOL."""
    import json

    from fourbit.harness import train as ht

    torch._dynamo.reset()
    base = dict(steps=12, batch_size=4, log_every=2, eval_every=4, eval_tokens=1024, ckpt_every=4, device="cuda")
    cfg = ht.train_config("tiny", recipe="nvfp4", **base)
    assert ht.compile_mode(cfg, torch.device("cuda")) == "reduce-overhead"

    def stop_at(step):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ht.train(cfg, tmp_path / "compiled", progress=False, callback=stop_at)
    ht.train(cfg, tmp_path / "compiled", resume=True, progress=False)
    ht.train(ht.train_config("tiny", recipe="nvfp4", compile=False, **base), tmp_path / "eager", progress=False)
    meta = json.loads((tmp_path / "compiled" / ht.RUN_META).read_text())
    assert meta["compile_mode"] == "reduce-overhead"
    c, e = (ht.read_metrics(tmp_path / d) for d in ("compiled", "eager"))
    assert [r["step"] for r in c] == [r["step"] for r in e]
    worst = max(abs(a[k] - b[k]) for a, b in zip(c, e) for k in ("train_loss", "val_loss") if a[k] is not None)
    print(f"fourbit train, compiled (reduce-overhead, resumed at step 8) vs eager: max |loss difference| {worst:.2e}")
    assert worst <= HARNESS_LOSS_TOL
