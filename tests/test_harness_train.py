"""The harness's model and training loop: causal attention against a hand-written reference, learning
real structure (val loss well below the data's unigram entropy, computed here from token counts),
bit-exact resume after a simulated Ctrl-C (with and without stochastic rounding), compare's table
against a recomputation from the metrics files, and one-line errors for bad input."""

import json
import math
import os
import signal

import pytest
import torch

from fourbit.cli import main as cli_main
from fourbit.harness import compare as hc
from fourbit.harness import data as hd
from fourbit.harness import model as hm
from fourbit.harness import train as ht

TIMING = ("tokens_per_s", "elapsed_s")  # wall-clock fields: never reproducible
LEARN_MARGIN = 0.3  # nats below the unigram entropy (3.33 nats/byte): ~9%, far beyond seed noise (~0.02)
ATTN_ATOL = 1e-5  # SDPA vs explicit softmax attention in fp32: different summation order only


def tiny_cfg(**kw) -> ht.TrainConfig:
    base = dict(steps=8, batch_size=2, log_every=2, eval_every=4, eval_tokens=512, ckpt_every=100)
    return ht.train_config("tiny", **{**base, **kw})


def reference_attention(q, k, v):
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return att.softmax(-1) @ v


def test_attention_matches_explicit_causal_softmax():
    torch.manual_seed(0)
    cfg = hm.GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32, mlp_hidden=64)
    attn = hm.CausalSelfAttention(cfg)
    x = torch.randn(3, 16, 32)
    q, k, v = attn.c_attn(x).split(32, dim=2)
    q, k, v = (t.view(3, 16, 2, 16).transpose(1, 2) for t in (q, k, v))
    cos, sin = hm.rope_tables(16, 16, cfg.rope_base)
    q, k = hm.apply_rope(q, cos, sin), hm.apply_rope(k, cos, sin)
    want = attn.c_proj(reference_attention(q, k, v).transpose(1, 2).reshape(3, 16, 32))
    torch.testing.assert_close(attn(x, (cos, sin)), want, atol=ATTN_ATOL, rtol=0)


def test_rope_rotates_pairs_by_position_angle():
    x = torch.zeros(1, 1, 3, 4)
    x[..., 0] = 1.0  # first channel pair = (1, 0)
    cos, sin = hm.rope_tables(3, 4, 10000.0)
    y = hm.apply_rope(x, cos, sin)
    for pos in range(3):  # pair 0 has frequency base**0 = 1: angle = pos radians
        torch.testing.assert_close(y[0, 0, pos, :2], torch.tensor([math.cos(pos), math.sin(pos)]))


@pytest.mark.parametrize("positions,mlp", [("rope", "swiglu"), ("learned", "gelu")], ids=["rope-swiglu", "learned-gelu"])
def test_model_is_causal(positions, mlp):
    torch.manual_seed(0)
    cfg = hm.GPTConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=16, mlp_hidden=32,
                       positions=positions, mlp=mlp)
    model = hm.GPT(cfg)
    a = torch.randint(0, 40, (2, 12))
    b = a.clone()
    b[:, 7:] = (b[:, 7:] + 1) % 40  # change the future only
    la, lb = model(a)[0], model(b)[0]
    assert torch.equal(la[:, :7], lb[:, :7])
    assert not torch.allclose(la[:, 7:], lb[:, 7:])


def test_presets_and_layout():
    for name, cfg in hm.PRESETS.items():
        with torch.device("meta"):  # shapes only: no 100M-parameter init on the CPU
            model = hm.GPT(cfg)
        assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == cfg.n_layer
        assert model.lm_head.weight is model.wte.weight
        for lin in (m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)):
            assert lin.in_features % 128 == 0 and lin.out_features % 128 == 0, name  # fp8-blockwise tiles
        if name == "gpu":
            assert 80e6 < model.num_params(non_embedding=False) < 120e6


def test_convert_keeps_embedding_and_head_plain():
    fnn = pytest.importorskip("fourbit.nn")
    model = ht.build_model(hm.PRESETS["tiny"], ht.resolve_recipe("nvfp4"), torch.device("cpu"))
    assert type(model.lm_head) is torch.nn.Linear and type(model.wte) is torch.nn.Embedding
    assert isinstance(model.blocks[1].mlp.c_fc, fnn.QuantLinear)


def test_bf16_learns_below_unigram_entropy():
    """A 2-layer model on the real bytes of the plays, 100 steps: the val loss must fall clearly below the
    entropy of the byte unigram distribution (the best loss without using context)."""
    data = hd.load_tokens("bytes")
    counts = torch.bincount(data.train, minlength=data.vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * p.log()).sum())
    dev = torch.device("cpu")
    cfg = ht.train_config("tiny", steps=100, batch_size=16, lr=1e-2, warmup=10, tokenizer="bytes")
    mcfg = hm.GPTConfig(vocab_size=data.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64, mlp_hidden=128)
    model = ht.build_model(mcfg, None, dev)
    opt = ht.make_optimizer(model, cfg, dev)
    sampler = hd.BatchSampler(data.train, cfg.batch_size, 64)
    xv, yv = hd.val_windows(data.val, 64, 8192)
    before = ht.evaluate(model, xv, yv, 64, dev)
    for step in range(cfg.steps):
        ht.train_step(model, opt, *sampler.batch(step), ht.lr_at(step, cfg), cfg.grad_clip, dev)
    after = ht.evaluate(model, xv, yv, 64, dev)
    assert before > unigram  # an untrained model is worse than the unigram distribution
    assert after < unigram - LEARN_MARGIN


def _losses(run_dir):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in ht.read_metrics(run_dir)]


def _train_interrupted_at_3(cfg, out):
    """Train into ``out`` with a Ctrl-C (SIGINT) sent after step 3: the run saves and raises."""

    def ctrl_c_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        ht.train(cfg, out, progress=False, callback=ctrl_c_at_3)


@pytest.mark.parametrize("recipe", ["bf16", "nvfp4"], ids=["bf16", "nvfp4-sr-rht"])
def test_ctrl_c_then_resume_reproduces_uninterrupted_run(recipe, tmp_path):
    if recipe != "bf16":
        pytest.importorskip("fourbit.nn")
    cfg = tiny_cfg(recipe=recipe)
    whole = ht.train(cfg, tmp_path / "whole", progress=False)
    _train_interrupted_at_3(cfg, tmp_path / "cut")
    ck = torch.load(tmp_path / "cut" / ht.CHECKPOINT, weights_only=True)
    assert ck["step"] == 3  # stopped at the step boundary after the signal
    assert [m["step"] for m in ht.read_metrics(tmp_path / "cut")] == [0, 2]
    ht.train(cfg, tmp_path / "cut", resume=True, progress=False)

    assert _losses(tmp_path / "cut") == _losses(whole)  # bit-exact: floats compared with ==
    a = torch.load(tmp_path / "cut" / ht.CHECKPOINT, weights_only=True)["model"]
    b = torch.load(whole / ht.CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert ht.read_metrics(whole)[-1]["val_loss"] < ht.read_metrics(whole)[0]["val_loss"]


def test_resume_with_another_config_is_refused(tmp_path):
    ht.train(tiny_cfg(steps=2, eval_every=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr"):
        ht.train(tiny_cfg(steps=2, eval_every=2, lr=1e-4), tmp_path, resume=True, progress=False)


def test_compare_table_matches_metrics(tmp_path):
    recipes = ["bf16", "fp8"] if _has_recipes() else ["bf16"]
    summary = hc.compare(recipes, 1, "tiny", tmp_path, jobs=1, progress=False, steps=2, batch_size=2,
                         log_every=1, eval_every=1, eval_tokens=256)
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    md = (tmp_path / "summary.md").read_text()
    base = ht.read_metrics(tmp_path / "bf16" / "seed0")[-1]["val_loss"]
    for row in summary["rows"]:
        final = ht.read_metrics(tmp_path / row["recipe"] / "seed0")[-1]["val_loss"]
        assert row["val_loss"] == final
        assert row["gap_pct"] == pytest.approx(100 * (final - base) / base, abs=1e-12)
        assert f"| {row['recipe']} | {final:.4f} |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["recipes"] == recipes


def _has_recipes():
    try:
        import fourbit.nn  # noqa: F401
        import fourbit.recipes  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--recipe", "nvfp5"], "nvfp5"),
        (["train", "--preset", "huge"], "huge"),
        (["compare", "--recipes", "bf16,fp9", "--steps", "1"], "fp9"),
        (["compare", "--preset", "huge"], "huge"),
        (["train", "--tokenizer", "wordpiece"], "wordpiece"),
    ],
    ids=["train-recipe", "train-preset", "compare-recipe", "compare-preset", "tokenizer"],
)
def test_bad_input_is_one_line(argv, needle, tmp_path, capsys):
    assert cli_main(argv + ["--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err and err.startswith("fourbit ")


def test_unwritable_out_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli_main(["train", "--steps", "1", "--out", str(blocker / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not writable" in err


@pytest.mark.gpu
def test_gpu_path_runs_under_bf16_autocast(tmp_path):
    cfg = tiny_cfg(steps=4, device="cuda", recipe="nvfp4" if _has_recipes() else "bf16")
    ht.train(cfg, tmp_path, progress=False)
    rows = ht.read_metrics(tmp_path)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert json.loads((tmp_path / ht.RUN_META).read_text())["device"].startswith("cuda")


def test_a_run_directory_is_trained_by_one_process_at_a_time(tmp_path):
    (tmp_path / ".lock").write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(ValueError, match="in use by process"):
        ht.train(tiny_cfg(steps=2, eval_every=2), tmp_path, progress=False)
    (tmp_path / ".lock").write_text("999999999")  # stale: no such process
    ht.train(tiny_cfg(steps=2, eval_every=2), tmp_path, progress=False)
    assert not (tmp_path / ".lock").exists()


def test_compare_workers_spread_over_gpus(monkeypatch):
    """With several GPUs, worker runs go round-robin to cuda:0..n-1; an explicit device is left alone."""
    from dataclasses import replace

    cfgs = [(ht.train_config("tiny", recipe=r), f"/x/{r}") for r in ("bf16", "nvfp4", "mxfp4")]
    assert hc._spread_over_gpus(cfgs) == cfgs or torch.cuda.device_count() > 1  # CPU: unchanged
    monkeypatch.setattr(hc, "_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    spread = hc._spread_over_gpus(cfgs)
    assert [c.device for c, _ in spread] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [p for _, p in spread] == [p for _, p in cfgs] and [c.recipe for c, _ in spread] == ["bf16", "nvfp4", "mxfp4"]
    pinned = [(replace(c, device="cuda:1"), p) for c, p in cfgs]
    assert hc._spread_over_gpus(pinned) == pinned


def test_summary_refuses_an_incomplete_run(tmp_path):
    """A run cut before its last step must not be summarized as if its last evaluation were final."""
    out = tmp_path / "cmp"
    cfg = tiny_cfg(steps=4, eval_every=2, log_every=2)
    hc.compare(["bf16"], 1, "tiny", out, jobs=1, progress=False, **{k: getattr(cfg, k) for k in ("steps", "batch_size", "log_every", "eval_every", "eval_tokens")})
    metrics = out / "bf16" / "seed0" / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join(rows[:-1]) + "\n")  # drop the step-4 record
    with pytest.raises(ValueError, match="incomplete"):
        hc.summarize(out, ["bf16"], 1)


def _fake_run(out, recipe, seed, vals, steps_per_eval=10):
    """A finished run's metrics.jsonl and run.json with the validation curve ``vals`` (steps 0, 10, ...)."""
    d = hc.run_dir(out, recipe, seed)
    d.mkdir(parents=True)
    steps = steps_per_eval * (len(vals) - 1)
    rows = [{"step": i * steps_per_eval, "tokens": i, "train_loss": None if i == 0 else 3.0, "val_loss": v,
             "tokens_per_s": None if i == 0 else 100.0} for i, v in enumerate(vals)]  # fmt: skip
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"config": {"steps": steps, "preset": "tiny", "tokenizer": "gpt2-4k"}, "params": 1e6, "tokens_per_step": 1,
            "model": {"n_layer": 1, "n_embd": 8, "vocab_size": 10}, "device": "cpu", "torch": "x", "val_works": ["hamlet"]}  # fmt: skip
    (d / "run.json").write_text(json.dumps(meta))


def test_summary_reports_the_lowest_val_loss_and_overfitting(tmp_path):
    """Runs whose validation loss rises after a minimum: the table gives each recipe's lowest val loss (mean
    over seeds) and its step (median over seeds), and the summary says the runs overfit; curves that keep
    falling get no such line."""
    rising = tmp_path / "rising"
    _fake_run(rising, "bf16", 0, [9.0, 5.0, 4.0, 4.2])  # lowest 4.0 at step 20, final 5% higher
    _fake_run(rising, "bf16", 1, [9.0, 5.0, 4.1, 4.3])
    _fake_run(rising, "fp8", 0, [9.0, 4.5, 4.4, 4.41])  # lowest 4.4 at step 20, final 0.2% higher
    _fake_run(rising, "fp8", 1, [9.0, 4.6, 4.5, 4.3])  # still falling: lowest = final, at step 30
    s = hc.summarize(rising, ["bf16", "fp8"], 2)
    bf16, fp8 = s["rows"]
    assert bf16["best_val_loss"] == pytest.approx(4.05) and bf16["best_step"] == 20
    assert fp8["best_val_loss"] == pytest.approx((4.4 + 4.3) / 2) and fp8["best_step"] == 25
    md = hc.summary_markdown(s)
    assert "| bf16 | 4.2500 ± 0.0707 |" in md and "4.0500 (20)" in md
    assert "rose after its lowest point in 1 of 2 recipes" in md and "bf16: 4.0500 at step 20" in md

    falling = tmp_path / "falling"
    for seed in (0, 1):
        _fake_run(falling, "bf16", seed, [9.0, 5.0, 4.0 - seed / 10])
    assert "overfit" not in hc.summary_markdown(hc.summarize(falling, ["bf16"], 2))


def test_compile_mode_defaults_to_cuda_graphs_on_one_gpu_and_eager_elsewhere():
    """The harness compiles by default on one CUDA device (reduce-overhead), never silently on CPU or under
    data parallelism, and --no-compile / --cuda-graph always run eager."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert ht.compile_mode(tiny_cfg(), cuda) == "reduce-overhead"
    assert ht.compile_mode(tiny_cfg(), cpu) is None
    assert ht.compile_mode(tiny_cfg(), cuda, world_size=2) is None
    assert ht.compile_mode(tiny_cfg(compile=True), cuda) == "reduce-overhead"
    assert ht.compile_mode(tiny_cfg(compile=True), cuda, world_size=2) == "default"
    assert ht.compile_mode(tiny_cfg(compile=True), cpu) == "default"
    assert ht.compile_mode(tiny_cfg(compile=False), cuda) is None
    assert ht.compile_mode(tiny_cfg(cuda_graph=True), cuda) is None
    with pytest.raises(ValueError, match="compile must be"):
        tiny_cfg(compile="yes")
    from fourbit.cli import build_parser

    args = build_parser().parse_args(["train", "--no-compile"])
    assert args.compile is False and build_parser().parse_args(["train"]).compile is None


def test_cuda_graph_options_are_checked_up_front(tmp_path):
    """``cuda_graph`` runs one process on CUDA, eagerly captured: other combinations fail before any work."""
    with pytest.raises(ValueError, match="one process"):
        tiny_cfg(cuda_graph=True, parallel="ddp")
    with pytest.raises(ValueError, match="exclusive"):
        tiny_cfg(cuda_graph=True, compile=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ht.train(tiny_cfg(cuda_graph=True, device="cpu"), tmp_path, progress=False)
    assert not (tmp_path / ht.METRICS).exists()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ht.make_optimizer(torch.nn.Linear(4, 4), tiny_cfg(cuda_graph=True), torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["bf16", "nvfp4", "nvfp4+late-bf16"], ids=["bf16", "nvfp4-sr-rht", "late-switch"])
def test_cuda_graph_run_matches_eager_run_and_resumes(recipe, tmp_path):
    """``--cuda-graph`` end to end: 2 eager steps, a capture, replays. Its losses equal the eager run's
    (the capturable AdamW reads the same float32 LR the fused eager one rounds to; the SR seeds come from
    device counters that give the host's keys), and a Ctrl-C + resume reproduces the uninterrupted graphed
    run bit for bit (the device counters are saved through rng_state). The late switch (at step 18 of 20)
    makes the graphed run capture a second graph, with the BF16 forward. Math attention: deterministic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    steps = 20 if "late" in recipe else 8  # the switch at step 18: one eager step, then a second capture
    with sdpa_kernel(SDPBackend.MATH):
        eager = ht.train(tiny_cfg(recipe=recipe, device="cuda", steps=steps, compile=False), tmp_path / "eager",
                         progress=False)  # fmt: skip
        cfg = tiny_cfg(recipe=recipe, device="cuda", cuda_graph=True, steps=steps)
        whole = ht.train(cfg, tmp_path / "whole", progress=False)
        _train_interrupted_at_3(cfg, tmp_path / "cut")
        ht.train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert _losses(tmp_path / "cut") == _losses(whole)
    graphed, plain = _losses(whole), _losses(eager)
    for g, e in zip(graphed, plain, strict=True):
        for k in ("train_loss", "val_loss", "grad_norm"):
            assert (g[k] is None) == (e[k] is None)
            if g[k] is not None:
                assert g[k] == pytest.approx(e[k], rel=1e-6, abs=0), (k, g, e)
    a = torch.load(tmp_path / "cut" / ht.CHECKPOINT, weights_only=True)
    assert a["fourbit_rng"] is None or all(s["step"] == steps for s in a["fourbit_rng"].values())
