"""fourbit.harness.corpus: .deb reading, SWORD and dictd decoding, markup cleaners, dedup, the held-out split,
the token cache and export. Everything runs on small in-memory fixtures (no network, no real packages);
``test_real_*`` read the pinned packages when ``~/.cache/fourbit/deb`` holds them and skip otherwise."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
import zlib

import pytest
import torch

from fourbit.harness import corpus as C
from fourbit.harness.data import ByteTokenizer, default_data_dir

# -- fixtures: a .deb, a SWORD module and a dictd database built in memory ------------------------------------


def make_deb(files: dict[str, bytes]) -> bytes:
    """A minimal Debian package: ar archive of debian-binary, control.tar.xz and data.tar.xz."""

    def tar_xz(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    out = C.AR_MAGIC
    for name, data in (("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"./control": b"Package: x\n"})),
                       ("data.tar.xz", tar_xz(files))):  # fmt: skip
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{644:<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def make_sword(blocks: list[list[str | None]]) -> dict[str, bytes]:
    """ot.bzs/bzv/bzz of a zText module: one zlib block per inner list, ``None`` an empty index entry."""
    bzs, bzv, bzz = b"", b"", b""
    for b, verses in enumerate(blocks):
        raw = b"".join(v.encode() for v in verses if v is not None)
        comp = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(comp), len(raw))
        bzz += comp
        off = 0
        for v in verses:
            size = len(v.encode()) if v is not None else 0
            bzv += struct.pack("<IIH", b if v is not None else 0, off if v is not None else 0, size)
            off += size
    root = "./usr/share/sword/modules/texts/ztext/test/ot."
    return {root + "bzs": bzs, root + "bzv": bzv, root + "bzz": bzz}


def dictd_b64(n: int) -> str:
    digits = ""
    while True:
        digits = C.DICTD_B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def make_dictd(entries: list[tuple[str, str]]) -> dict[str, bytes]:
    body, index = b"", []
    for head, text in entries:
        data = text.encode()
        index.append(f"{head}\t{dictd_b64(len(body))}\t{dictd_b64(len(data))}")
        body += data
    index.append(index[-1].replace(entries[-1][0], "alias", 1))  # a second headword for the last entry
    root = "./usr/share/dictd/test."
    return {root + "index": "\n".join(index).encode(), root + "dict.dz": gzip.compress(body, mtime=0)}


PROSE = "This sentence is long enough to be prose in a small test document, and it says something new "


def doc(doc_id: str, n: int = 6) -> C.Document:
    return C.Document(doc_id, "\n\n".join(f"{PROSE}({doc_id} paragraph {i})." for i in range(n)))


# -- reading packages -----------------------------------------------------------------------------------------


def test_read_deb_filters_members():
    deb = make_deb({"./usr/share/doc/a.txt": b"A", "./usr/share/doc/b.html": b"B", "./usr/share/doc/t/c.txt": b"C"})
    assert C.read_deb(deb, r"\.txt$") == {"./usr/share/doc/a.txt": b"A", "./usr/share/doc/t/c.txt": b"C"}
    assert C.read_deb(deb, r"\.txt$", r"/t/") == {"./usr/share/doc/a.txt": b"A"}
    with pytest.raises(ValueError, match="ar magic"):
        C.read_deb(b"not a deb", ".")


def test_read_sword_decodes_blocks_and_headings():
    files = make_sword([[None, "<w lemma='x'>In</w> the beginning.", "Second verse.", None, "Third, <note>a note</note>verse."],
                        ["Book two.", "Book two again."]])  # fmt: skip
    blocks = C.read_sword(files)
    assert [k for k, _ in blocks] == ["test/ot.000", "test/ot.001"]
    assert blocks[0][1] == ["<w lemma='x'>In</w> the beginning.", "Second verse.", "", "Third, <note>a note</note>verse."]
    src = C.DebSource("t", "1", "", C.Markup.SWORD, "")
    docs = C.source_documents(src, files)
    assert C.normalize(docs[0].text) == ["In the beginning. Second verse.", "Third, verse."]


def test_read_sword_skips_linked_verses():
    files = make_sword([["A comment on two verses."]])
    bzv = files["./usr/share/sword/modules/texts/ztext/test/ot.bzv"]
    files["./usr/share/sword/modules/texts/ztext/test/ot.bzv"] = bzv + bzv  # the second verse links to the first
    assert C.read_sword(files) == [("test/ot.000", ["A comment on two verses."])]


def test_read_dictd_entries_once_in_file_order():
    files = make_dictd([("00-database-info", "meta"), ("beta", "beta: the second letter"), ("alpha", "alpha: first")])
    assert C.read_dictd(files) == [("beta", "beta: the second letter"), ("alpha", "alpha: first")]
    docs = C.source_documents(C.DebSource("d", "1", "", C.Markup.DICTD, ""), files)
    assert [(d.id, d.text) for d in docs] == [("d/a", "alpha: first"), ("d/b", "beta: the second letter")]


# -- markup cleaners ------------------------------------------------------------------------------------------

RST = """\
.. SPDX-License-Identifier: GPL-2.0

.. _label:

=========
The Title
=========

Use :func:`os.path.join` and :ref:`the guide <guide-target>`, see ``code`` and `Python <https://python.org>`_.

Example::

    x = 1
    print(x)

After the literal block.

.. code-block:: c

   int main(void);

.. note::

   A note's prose stays.

.. function:: spam(eggs)

   Return spam with **bold** and *emphasis*.

   :param eggs: the eggs

>>> 1 + 1
2

+-----+-----+
| a   | b   |
+-----+-----+
"""


def test_rst_to_text():
    assert C.normalize(C.rst_to_text(RST)) == [
        "The Title",
        "Use os.path.join and the guide, see code and Python.",
        "Example:",
        "After the literal block.",
        "A note's prose stays.",
        "Return spam with bold and emphasis.",
        "the eggs",
        "a b",
    ]


POD = """\
=head1 NAME

perlfoo - a C<small> example with L<perlfunc/"open"> and L<the docs|perldoc> E<lt>hereE<gt>X<index>

    my $x = 1;   # verbatim: code

=over 4

=item * B<bold> item

=back

=begin html

<p>dropped</p>

=end html

=cut
"""


def test_pod_to_text():
    assert C.normalize(C.pod_to_text(POD)) == [
        "NAME", "perlfoo - a small example with perlfunc open and the docs <here>", "bold item",
    ]  # fmt: skip


def test_html_to_text():
    src = ("<html><head><title>T</title><style>p {}</style></head><body><div class='navheader'>Prev Next</div>"
           "<h1>Heading</h1><p>Some <b>bold</b>&amp;plain text.</p><pre>code()</pre><ul><li>one</li><li>two</li></ul>"
           "<script>var x;</script></body></html>")  # fmt: skip
    assert C.normalize(C.html_to_text(src)) == ["Heading", "Some bold&plain text.", "one", "two"]


def test_asciidoc_to_text():
    src = ("git-foo(1)\n==========\n\nNAME\n----\ngit-foo - do foo\n\n[verse]\n'git foo' [--bar]\n\n"
           "See linkgit:git-bar[1] and link:x.html[the page].\n\n------------\n$ git foo\n------------\n\n"
           "    indented literal\n\n:attr: value\nLast `word`.\n")  # fmt: skip
    assert C.normalize(C.asciidoc_to_text(src)) == [
        "git-foo(1)", "NAME", "git-foo - do foo", "git foo [--bar]", "See git-bar and the page.", "Last word.",
    ]  # fmt: skip


def test_osis_to_text():
    src = '<w lemma="strong:H0776">earth</w> <transChange type="added">was</transChange> void<note n="a">x</note>.'
    assert C.osis_to_text(src) == "earth was void ."


# -- split, dedup, determinism --------------------------------------------------------------------------------


def test_split_is_a_pure_function_of_the_id():
    ids = [f"src/doc{i}" for i in range(4000)]
    val = [i for i in ids if C.is_val(i)]
    assert val == [i for i in ids if C.is_val(i)]
    assert abs(len(val) / len(ids) - C.VAL_PER_MILLE / 1000) < 0.01


def synthetic_docs() -> list[C.Document]:
    docs = [doc(f"src/doc{i:03d}") for i in range(200)]
    val_id = next(d.id for d in docs if C.is_val(d.id))
    shared = f"{PROSE}(shared with a validation document)."
    docs = [C.Document(d.id, d.text + "\n\n" + shared) if d.id in (val_id, "src/doc199") else d for d in docs]
    docs.append(C.Document("src/copy", docs[5].text))  # an exact duplicate of another document
    docs.append(C.Document("src/stub", "Too short."))
    return docs


def test_prepare_dedups_and_holds_out():
    train, val = C.prepare(synthetic_docs())
    assert val and train
    assert all(C.is_val(d.id) for d in val) and not any(C.is_val(d.id) for d in train)
    ids = [d.id for d in train + val]
    assert "src/stub" not in ids and len(ids) == len(set(ids))
    assert ("src/copy" in ids) != ("src/doc005" in ids)  # the duplicate document is dropped
    paragraphs = [p for d in train + val for p in C.normalize(d.text)]
    assert len(paragraphs) == len(set(paragraphs))  # every paragraph once in the corpus
    val_paragraphs = {p for d in val for p in C.normalize(d.text)}
    assert any("shared with a validation" in p for p in val_paragraphs)
    assert not any(p in val_paragraphs for d in train for p in C.normalize(d.text))


def test_prepare_is_deterministic_and_order_free():
    docs = synthetic_docs()
    assert C.prepare(docs) == C.prepare(docs) == C.prepare(list(reversed(docs)))
    with pytest.raises(ValueError, match="not unique"):
        C.prepare(docs + docs[:1])


def test_val_text_never_in_train_stream():
    train, val = C.prepare(synthetic_docs())
    tok = ByteTokenizer()
    ids, offsets = C.encode_corpus(train, tok.encode, tok.eot)
    assert offsets[0] == 0 and offsets[-1] == ids.numel() and len(offsets) == len(train) + 1
    assert (ids[offsets[1:] - 1] == tok.eot).all()
    stream = bytes(i for i in ids.tolist() if i < 256)
    for p in {p for d in val for p in C.normalize(d.text)}:
        assert p.encode() not in stream


# -- the cache and export, on a corpus of one synthetic package -------------------------------------------------


@pytest.fixture
def tiny_corpus(tmp_path, monkeypatch):
    rst = {f"./usr/share/doc/x/html/_sources/d{i:03d}.rst.txt": doc(f"d{i}", 4).text.encode() for i in range(200)}
    deb = make_deb(rst)
    src = C.DebSource("tiny-doc", "1:1.0-1", hashlib.sha256(deb).hexdigest(), C.Markup.RST, r"/_sources/")
    (tmp_path / "deb").mkdir()
    (tmp_path / "deb" / src.filename).write_bytes(deb)
    monkeypatch.setattr(C, "DEB_SOURCES", (src,))
    monkeypatch.setitem(C.CORPORA, "tiny", (src.package,))
    return tmp_path


def test_load_corpus_caches_and_is_deterministic(tiny_corpus):
    data = C.load_corpus("tiny", "bytes", tiny_corpus, fetch=False)
    cache = tiny_corpus / "tokens" / f"tiny-bytes-v{C.CACHE_VERSION}.pt"
    assert cache.exists()
    again = C.load_corpus("tiny", "bytes", tiny_corpus, fetch=False)
    assert torch.equal(data.train, again.train) and torch.equal(data.val, again.val)
    cache.unlink()
    rebuilt = C.load_corpus("tiny", "bytes", tiny_corpus, fetch=False)
    assert torch.equal(data.train, rebuilt.train) and data.train_works == rebuilt.train_works
    assert data.val_works and not set(data.val_works) & set(data.train_works)
    assert data.vocab[data.eot] == ByteTokenizer.eot
    assert data.decode(data.train[:200]).startswith(PROSE + "(d")
    assert "tiny-doc" in C.stats(torch.load(cache, weights_only=True))


def test_load_corpus_checks_the_pinned_package(tiny_corpus, monkeypatch):
    (src,) = C.DEB_SOURCES
    monkeypatch.setattr(C, "DEB_SOURCES", (C.DebSource(src.package, src.version, "0" * 64, src.markup, src.include),))
    with pytest.raises(ValueError, match="sha256"):
        C.load_corpus("tiny", "bytes", tiny_corpus, fetch=False)
    monkeypatch.setattr(C, "DEB_SOURCES", (C.DebSource("absent", "1", "", src.markup, src.include),))
    monkeypatch.setitem(C.CORPORA, "tiny", ("absent",))
    with pytest.raises(FileNotFoundError, match="apt-get download absent=1"):
        C.load_corpus("tiny", "bytes", tiny_corpus, fetch=False)
    with pytest.raises(ValueError, match="unknown corpus"):
        C.load_corpus("nope", "bytes", tiny_corpus)


@pytest.mark.parametrize("max_train", [None, 100], ids=["all", "slice"])
def test_export_roundtrip(tiny_corpus, tmp_path, max_train):
    data = C.load_corpus("tiny", "bytes", tiny_corpus, fetch=False)
    path = C.export_tokens(data, tmp_path / "tokens.pt", max_train_tokens=max_train)
    assert torch.load(path, weights_only=True)["tokens"].dtype == torch.uint16
    back = C.load_exported(path)
    assert torch.equal(back.train, data.train[:max_train]) and torch.equal(back.val, data.val)
    assert torch.equal(back.vocab, data.vocab) and back.eot == data.eot and back.val_works == data.val_works
    with pytest.raises(ValueError, match="not a fourbit-tokens"):
        torch.save({"format": "other"}, tmp_path / "bad.pt")
        C.load_exported(tmp_path / "bad.pt")


def test_build_command_prints_stats(tiny_corpus, tmp_path, capsys):
    C.main(["build", "--name", "tiny", "--tokenizer", "bytes", "--data-dir", str(tiny_corpus), "--no-fetch",
            "--out", str(tmp_path / "out.pt")])  # fmt: skip
    out = capsys.readouterr().out
    assert "tiny-doc" in out and "total" in out and "exported:" in out and (tmp_path / "out.pt").exists()


def test_train_config_takes_a_corpus():
    from fourbit.harness.train import TrainConfig

    assert TrainConfig().corpus == "shakespeare"
    assert TrainConfig(corpus="debian-en").corpus == "debian-en"
    with pytest.raises(ValueError, match="unknown corpus"):
        TrainConfig(corpus="wikipedia")


# -- the real packages, when present ----------------------------------------------------------------------------

DEB_DIR = default_data_dir() / "deb"


def _real(package: str) -> C.DebSource:
    src = next(s for s in C.DEB_SOURCES if s.package == package)
    if not (DEB_DIR / src.filename).exists():
        pytest.skip(f"{src.filename} not in {DEB_DIR}")
    return src


def test_real_kjv_genesis():
    src = _real("sword-text-kjv")
    files = C.read_deb(C._deb(src, DEB_DIR.parent, False), src.include, src.exclude)
    docs = {d.id: d for d in C.source_documents(src, files)}
    genesis = C.normalize(docs["sword-text-kjv/engKJV2006eb/ot.001"].text)
    assert genesis[0] == "The First Book of Moses, called Genesis"
    assert genesis[1].startswith("In the beginning God created the heaven and the earth. And the earth was without form")


def test_real_python_docs_are_prose():
    src = _real("python3.11-doc")
    files = C.read_deb(C._deb(src, DEB_DIR.parent, False), src.include + r"|/_sources/tutorial/", src.exclude)
    tutorial = [C.rst_to_text(v.decode()) for k, v in files.items() if k.endswith("tutorial/controlflow.rst.txt")]
    paragraphs = C.normalize(tutorial[0])
    assert "Perhaps the most well-known statement type is the if statement" in " ".join(paragraphs)
    assert not any(p.startswith((">>>", ".. ")) or ":ref:" in p for p in paragraphs)
