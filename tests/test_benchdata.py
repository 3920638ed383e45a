"""Offline tests of the benchmark builders (benchmarks/benchdata) on small embedded inputs."""

from __future__ import annotations

import bz2
import gzip
import json
import zipfile
from pathlib import Path

import pytest
from benchdata import (
    FilterConfig,
    Pair,
    build_all,
    clean_pairs,
    collect_files,
    debian_pairs,
    docstring_pairs,
    main,
    parse_deb822,
    parse_description,
    read_jsonl,
    split_by_group,
    split_docstring,
    split_sentences,
    strip_wiki_markup,
    wiki_pairs,
)
from benchdata import debian as deb
from benchdata import wiki as wk
from benchdata.common import looks_english, normalise_key, truncate_words
from benchdata.wiki import iter_pages

# --------------------------------------------------------------------------------------------------
# Debian

TRANSLATION = """\
Package: foo
Description-md5: 0123456789abcdef0123456789abcdef
Description-en: fast frobnicator for text files
 Foo frobnicates text files quickly and reliably, using a streaming
 algorithm that needs very little memory.
 .
 Features:
  * parallel processing of many
    input files
  * colour output
 .
 This package contains the command-line tool.

Package: libfoo1
Description-md5: 1123456789abcdef0123456789abcdef
Description-en: fast frobnicator for text files - shared library
 Foo frobnicates text files quickly and reliably, using a streaming
 algorithm that needs very little memory.
 .
 This package contains the shared library used by the foo tool.

Package: foo-dbgsym
Description-md5: 2123456789abcdef0123456789abcdef
Description-en: debug symbols for foo
 This package contains the debug symbols for foo, which are of no use to
 anyone who is not debugging foo itself in a debugger session.

Package: oldfoo
Description-md5: 3123456789abcdef0123456789abcdef
Description-en: fast frobnicator (transitional package)
 This is a transitional package to ease upgrades to the foo package. It can
 safely be removed once the upgrade has finished completely.

Package: bar
Description-md5: 4123456789abcdef0123456789abcdef
Description-en: bar
 Bar is a tiny tool with a one-word synopsis, so it is too short for the benchmark.
"""

PACKAGES = """\
Package: foo
Source: foo (1.0-1)
Section: utils

Package: libfoo1
Source: foo
Section: libs
Description-md5: 1123456789abcdef0123456789abcdef
"""


def test_parse_deb822_stanzas_and_continuations() -> None:
    stanzas = list(parse_deb822(TRANSLATION))
    assert [s["Package"] for s in stanzas] == ["foo", "libfoo1", "foo-dbgsym", "oldfoo", "bar"]
    desc = stanzas[0]["Description-en"]
    assert desc.split("\n")[0] == "fast frobnicator for text files"
    assert "\n .\n" in desc  # paragraph separator kept verbatim


def test_parse_description_paragraphs_and_bullets() -> None:
    synopsis, long = parse_description(next(parse_deb822(TRANSLATION))["Description-en"])
    assert synopsis == "fast frobnicator for text files"
    assert long == (
        "Foo frobnicates text files quickly and reliably, using a streaming algorithm that needs very little "
        "memory. Features: parallel processing of many input files. colour output. "
        "This package contains the command-line tool."
    )
    assert "*" not in long and " . " not in long and "\n" not in long


def test_debian_pairs_drops_debug_and_transitional_and_groups_by_source() -> None:
    pairs, stats = debian_pairs(TRANSLATION, PACKAGES)
    by_pkg = {p.uid.split(":")[1]: p for p in pairs}
    assert set(by_pkg) == {"foo", "libfoo1", "bar"}
    assert stats["drop_debug_package"] == 1 and stats["drop_transitional_dummy_debug"] == 1
    assert by_pkg["libfoo1"].group == "foo" == by_pkg["foo"].group  # Source: field
    assert by_pkg["bar"].group == "bar"
    kept, cstats = clean_pairs(pairs, FilterConfig())
    assert {p.uid.split(":")[1] for p in kept} == {"foo", "libfoo1"}  # "bar": summary too short
    assert cstats["drop_summary_short"] == 1


def test_fetch_uses_cache_without_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_debian_cache(tmp_path)
    monkeypatch.setattr(deb.subprocess, "run", _no_subprocess)
    paths = deb.fetch_debian_indexes(tmp_path)
    translation, packages, info = deb.load_debian(paths)
    assert translation.startswith(TRANSLATION) and packages == PACKAGES
    assert len(info["translation_sha256"]) == 64
    with pytest.raises(FileNotFoundError):
        deb.fetch_debian_indexes(tmp_path / "empty", offline=True)


# --------------------------------------------------------------------------------------------------
# Wikipedia

WIKITEXT = (
    "{{Infobox thing|name=Frob|image=[[File:Frob.png|thumb|A [[frob]] at rest]]}}\n"
    "'''Frobnication''' ({{IPAc-en|f|r|ɒ|b}}; from [[Latin language|Latin]] "
    "''frobare'')<ref>{{cite web|url=http://x.org|title=X}}</ref> is the [[art]] of tweaking a "
    "[[Knob (device)|knob]] until something works, measuring about {{convert|3|km|mi}} in St. "
    'Louis.<ref name="a"/> It was first described by Dr. J. R. R. Smith in 1900.\n'
    "<!-- hidden comment -->\n"
    "== History ==\n"
    "[[File:Old frob.jpg|thumb|An old [[frob]].]]\n"
    "Early frobbers used [http://example.org wooden knobs]. Later ones used metal, and the "
    "practice spread widely. Today it is common.\n"
    '{| class="wikitable"\n'
    "|-\n"
    "! Year !! Event\n"
    "|-\n"
    "| 1900 || first frob\n"
    "|}\n"
    "* A list item about frobs.\n"
    "\n"
    "== See also ==\n"
    "* [[Tweaking]]\n"
    "\n"
    "[[Category:Frobs]]\n"
    "[[de:Frobnizieren]]\n"
    ""
)


def _page_xml(pages: list[tuple[str, str]]) -> bytes:
    from xml.sax.saxutils import escape

    body = "".join(
        f'<page><title>{escape(t)}</title><ns>0</ns><id>{i}</id><revision><text xml:space="preserve">'
        f"{escape(x)}</text></revision></page>"
        for i, (t, x) in enumerate(pages)
    )
    return (
        f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">{body}</mediawiki>'
    ).encode()


def test_strip_wiki_markup() -> None:
    paras = strip_wiki_markup(WIKITEXT)
    text = " ".join(paras)
    for junk in (
        "{{",
        "}}",
        "[[",
        "]]",
        "<ref",
        "'''",
        "File:",
        "Category",
        "Frobnizieren",
        "wikitable",
        "==",
        "http://",
        "hidden comment",
        "Tweaking",
        "first frob",
    ):
        assert junk not in text, junk
    assert paras[0].startswith("Frobnication (from Latin frobare) is the art of tweaking a knob until something")
    assert "about 3 km in St. Louis." in paras[0]
    assert "Early frobbers used wooden knobs." in text
    assert "A list item about frobs." in paras  # list items are their own paragraphs


def test_tidy_parens_keeps_signs() -> None:
    assert wk.tidy_parens("Albania (;), officially (; , ) X") == "Albania, officially X"
    assert wk.tidy_parens("Einstein (;; 14 March 1879) at ( -33 °C ) and (-COOH)") == (
        "Einstein (14 March 1879) at (-33 °C) and (-COOH)"
    )


def test_split_sentences_keeps_abbreviations_and_initials() -> None:
    s = "It lies in St. Louis. It was described by Dr. J. R. R. Smith in 1900. The U.S. Army (USA). Done!"
    assert split_sentences(s) == [
        "It lies in St. Louis.",
        "It was described by Dr. J. R. R. Smith in 1900.",
        "The U.S. Army (USA).",
        "Done!",
    ]


def test_wiki_pairs_skip_redirects_and_disambiguation() -> None:
    xml = _page_xml(
        [
            ("Frobnication", WIKITEXT),
            ("Frob", "#REDIRECT [[Frobnication]]"),
            ("Frob (disambiguation)", "'''Frob''' may refer to: a thing. Another thing."),
        ]
    )
    pages = list(iter_pages(xml))
    assert [p.redirect for p in pages] == [False, True, False]
    articles, paras, stats = wiki_pairs(pages)
    assert [a.uid for a in articles] == ["wiki:Frobnication"]
    assert articles[0].summary.startswith("Frobnication (from Latin frobare) is the art")
    assert articles[0].document.startswith("It was first described by Dr. J. R. R. Smith in 1900. Early frobbers")
    assert [p.summary for p in paras] == ["Early frobbers used wooden knobs."]
    assert stats["skip_not_article"] == 2


# --------------------------------------------------------------------------------------------------
# docstrings

GOOD_MODULE = '''"""Utilities for frobnicating widgets.

This module offers a handful of helpers that make it easy to frobnicate the widgets of an
application without touching their internal state.
"""


def frob(x):
    """Frobnicate one widget in place.

    The widget is tweaked until it works, which may take a while for the larger widgets, and
    :func:`frob` returns the number of tweaks that were needed.

    >>> frob(1)
    3
    """


def twoline(x):
    """A summary that runs
    onto a second line, which the benchmark does not accept at all.

    Body text that is long enough to count as a real body of a docstring here.
    """


def doctesty(x):
    """Show examples of usage.

    >>> doctesty(1)
    1
    >>> doctesty(2)
    2
    >>> doctesty(3)
    3
    """


class Widget:
    """Ein Widget, das von der Anwendung benutzt wird.

    Dieses Widget wird von der Anwendung benutzt und ist nicht für den direkten Gebrauch durch den
    Benutzer gedacht, da es intern verwaltet wird.
    """

    def short(self):
        """Return self.

        Too short.
        """
'''

GENERATED_MODULE = '''# Generated by the protocol buffer compiler.  DO NOT EDIT!
"""Generated messages for the widget service.

This file describes the messages exchanged by the widget service and its clients over the wire.
"""
'''


def _source_tree(root: Path) -> Path:
    pkg = root / "widgets"
    (pkg / "tests").mkdir(parents=True)
    (pkg / "core.py").write_text(GOOD_MODULE, encoding="utf-8")
    (pkg / "widget_pb2.py").write_text(GENERATED_MODULE, encoding="utf-8")
    (pkg / "broken.py").write_text("def f(:\n    pass\n", encoding="utf-8")
    (pkg / "tests" / "test_core.py").write_text(GOOD_MODULE, encoding="utf-8")
    return pkg


def test_docstring_harvest_on_temp_tree(tmp_path: Path) -> None:
    pkg = _source_tree(tmp_path)
    files, info = collect_files(stdlib=False, packages=(), extra_roots=[pkg])
    assert [f.relpath for f in files] == ["broken.py", "core.py", "widget_pb2.py"]  # tests/ skipped, sorted
    pairs, stats = docstring_pairs(files)
    got = {p.uid.rsplit(":", 1)[-1]: p for p in pairs}
    assert set(got) == {"<module>", "frob"}
    assert got["frob"].summary == "Frobnicate one widget in place."
    assert got["frob"].document == (
        "The widget is tweaked until it works, which may take a while for the larger widgets, and frob "
        "returns the number of tweaks that were needed."
    )
    assert stats["file_generated"] == 1 and stats["file_syntax_error"] == 1
    assert stats["drop_summary_not_one_line"] == 1
    assert stats["drop_doctest_heavy"] == 1
    assert stats["drop_not_english"] == 1
    assert stats["drop_body_short"] == 1
    assert all(p.group == "widgets/core.py" for p in pairs)


def test_split_docstring_rejections() -> None:
    assert split_docstring("Only a summary.") == "no_body"
    assert split_docstring("foo(a, b) -> int\n\nReturns the thing that foo computes from a and b.") == "summary_is_code"
    summary, body = split_docstring("Summary here.\n\nParameters\n----------\nx : int\n    The ``x`` value.")
    assert summary == "Summary here." and body == "Parameters x : int The x value."


def test_looks_english() -> None:
    assert looks_english("This is a function that returns the value of the widget to the caller.")
    assert not looks_english("Dieses Widget wird von der Anwendung benutzt und ist nicht gedacht.")
    assert not looks_english("Функция возвращает значение виджета вызывающей стороне и ничего больше.")


# --------------------------------------------------------------------------------------------------
# filters, dedup, splits


def _p(uid: str, doc: str, summ: str, group: str | None = None) -> Pair:
    return Pair(group=group or uid, uid=uid, document=doc, summary=summ)


DOC = "one two three four five six seven eight nine ten eleven"


def test_clean_pairs_filters_and_dedup() -> None:
    cfg = FilterConfig(max_doc_words=12, min_doc_words=10, min_summary_words=3, max_summary_words=5)
    pairs = [
        _p("a", DOC, "a good summary"),
        _p("b", DOC.upper() + "!", "another good summary"),  # same normalised document as "a"
        _p("c", "a different document " + DOC, "A  GOOD summary."),  # same normalised summary as "a"
        _p("d", "short document here", "fine summary here"),
        _p("e", DOC + " x", "  "),
        _p("f", DOC + " y", "too short"),
        _p("g", DOC + " z", "this summary has far too many words"),
        _p("h", " ".join(["w"] * 30) + " end", "a truncated document"),
    ]
    kept, stats = clean_pairs(list(reversed(pairs)), cfg)  # input order must not matter
    assert [p.uid for p in kept] == ["a", "h"]
    assert kept[1].document == " ".join(["w"] * 12)
    assert stats["drop_duplicate_document"] == 1 and stats["drop_duplicate_summary"] == 1
    assert stats["drop_document_short"] == 1 and stats["drop_summary_empty"] == 1
    assert stats["drop_summary_short"] == 1 and stats["drop_summary_long"] == 1
    assert stats["truncated_document"] == 2  # "c" (then dropped as a duplicate summary) and "h"
    assert normalise_key("Hello,  World!") == "hello world"
    assert truncate_words(" a  b c ", 2) == "a b"


def test_split_by_group_sizes_groups_and_seed() -> None:
    pairs = [_p(f"u{i}", DOC, f"summary {i} x", group=f"g{i // 3}") for i in range(60)]
    sizes = [("test", 12), ("dev", 6), ("train", None)]
    a = split_by_group(pairs, sizes, seed=0)
    b = split_by_group(list(reversed(pairs)), sizes, seed=0)
    assert a == b
    assert (len(a["test"]), len(a["dev"]), len(a["train"])) == (12, 6, 42)
    groups = {name: {p.group for p in ps} for name, ps in a.items()}
    assert not (groups["test"] & groups["dev"]) and not (groups["test"] & groups["train"])
    assert not (groups["dev"] & groups["train"])
    c = split_by_group(pairs, sizes, seed=1)
    assert {p.uid for p in c["test"]} != {p.uid for p in a["test"]}
    pairs = [_p(f"u{i}", DOC, f"summary {i} x", group=f"g{i // 2}") for i in range(60)]
    frac = split_by_group(pairs, [("dev", 1 / 3), ("test", None)], seed=0)
    assert len(frac["dev"]) == 20 and len(frac["test"]) == 40


# --------------------------------------------------------------------------------------------------
# end to end, offline


def _no_subprocess(*args, **kwargs):  # pragma: no cover - only called on a bug
    raise AssertionError(f"unexpected subprocess call {args}")


def _fake_debian_cache(cache: Path) -> None:
    paths = deb.cache_paths(cache)
    paths["base"].mkdir(parents=True, exist_ok=True)
    many = "".join(
        f"\nPackage: pkg{i}\nDescription-md5: {i:032x}\nDescription-en: tool number {i} for the test suite\n"
        f" Tool {i} does thing {i} well, in a way that is described with enough words to keep it.\n"
        for i in range(40)
    )
    deb._write_gz(paths["translation"], (TRANSLATION + many).encode())
    deb._write_gz(paths["packages"], PACKAGES.encode())
    paths["info"].write_text(json.dumps({"suite": "bookworm"}))


def _fake_wheel(cache: Path) -> None:
    (cache / "wiki").mkdir(parents=True, exist_ok=True)
    pages = [("Frobnication", WIKITEXT)] + [
        (
            f"Topic {i}",
            f"'''Topic {i}''' is a [[subject]] that people study in school number {i}. "
            f"It has many parts and a long history in the region. Scholars disagree about part {i}. "
            f"Most agree it matters a great deal.\n\n"
            f"The study of topic {i} began early in the history of the field. It grew quickly. "
            f"It is still growing today in many places.",
        )
        for i in range(12)
    ]
    with zipfile.ZipFile(cache / "wiki" / f"gensim-{wk.GENSIM_VERSION}-py3-none-any.whl", "w") as z:
        z.writestr(wk.WIKI_MEMBERS[0], bz2.compress(_page_xml(pages)))


def _build(out: Path, cache: Path, src: Path, **kw) -> dict:
    return build_all(
        out,
        cache,
        include_stdlib=False,
        python_packages=(),
        extra_source_roots=[src],
        dev_size=4,
        test_size=6,
        offline=True,
        quiet=True,
        **kw,
    )


def test_build_all_is_deterministic_and_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    _fake_debian_cache(cache)
    _fake_wheel(cache)
    src = _source_tree(tmp_path / "src")
    monkeypatch.setattr(deb.subprocess, "run", _no_subprocess)
    monkeypatch.setattr(wk.subprocess, "run", _no_subprocess)
    m1 = _build(tmp_path / "out1", cache, src)
    m2 = _build(tmp_path / "out2", cache, src)
    files1 = sorted(p.relative_to(tmp_path / "out1") for p in (tmp_path / "out1").rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(tmp_path / "out2") for p in (tmp_path / "out2").rglob("*") if p.is_file())
    assert files1 == files2
    assert Path("manifest.json") in files1 and Path("debian/train.jsonl") in files1
    for rel in files1:
        assert (tmp_path / "out1" / rel).read_bytes() == (tmp_path / "out2" / rel).read_bytes(), rel
    assert m1 == m2 == json.loads((tmp_path / "out1" / "manifest.json").read_text())

    deb_splits = m1["domains"]["debian"]["splits"]
    assert (deb_splits["test"]["count"], deb_splits["dev"]["count"]) == (6, 4)
    assert deb_splits["train"]["count"] == 42 - 10  # foo, libfoo1 and pkg0..39 kept
    assert set(m1["domains"]["wiki"]["splits"]) == {"dev", "test"}
    assert sum(s["count"] for s in m1["domains"]["wiki"]["splits"].values()) == 13
    assert sum(s["count"] for s in m1["domains"]["docstrings"]["splits"].values()) == 2
    for entry in m1["domains"].values():
        for split in entry["splits"].values():
            rows = read_jsonl(tmp_path / "out1" / split["path"])
            assert len(rows) == split["count"]
            assert all(set(r) == {"id", "document", "summary"} for r in rows)
            import hashlib

            data = (tmp_path / "out1" / split["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == split["sha256"] and len(data) == split["bytes"]

    # Another seed changes which examples are held out, not what survives the filters.
    m3 = _build(tmp_path / "out3", cache, src, seed=1)
    assert m3["domains"]["debian"]["filter_stats"] == m1["domains"]["debian"]["filter_stats"]
    assert m3["domains"]["debian"]["splits"]["test"]["sha256"] != deb_splits["test"]["sha256"]


def test_main_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    _fake_debian_cache(cache)
    _fake_wheel(cache)
    monkeypatch.setattr(deb.subprocess, "run", _no_subprocess)
    out = tmp_path / "out"
    argv = [
        "build",
        "--out",
        str(out),
        "--cache",
        str(cache),
        "--domains",
        "debian,wiki",
        "--offline",
        "--quiet",
    ]
    argv += ["--dev-size", "3", "--test-size", "5", "--max-doc-words", "12"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["domains"]) == {"debian", "wiki"}
    assert manifest["filters"]["max_doc_words"] == 12
    rows = read_jsonl(out / "debian" / "test.jsonl")
    assert len(rows) == 5 and all(len(r["document"].split()) <= 12 for r in rows)
    assert gzip.decompress((cache / "debian" / "bookworm" / "Translation-en.gz").read_bytes()).startswith(b"Package")
