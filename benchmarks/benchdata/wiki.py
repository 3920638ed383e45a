"""Out-of-domain source: English Wikipedia articles (body -> lead sentence).

The articles are the small Wikipedia dumps that ship as test data inside the ``gensim`` wheel
(``gensim/test/test_data/``). The wheel is fetched once with ``pip download --no-deps`` into the cache and
read with :mod:`zipfile`; gensim itself is never installed (it would pull in scipy and more).

Two domains come out of it:

* ``wiki``: one pair per article: summary = first sentence of the lead, document = the rest of the article.
  The dumps hold only about a hundred real articles, so this domain has dev and test splits only.
* ``wikipara``: one pair per prose paragraph of at least three sentences: summary = the paragraph's first
  (topic) sentence, document = the rest of the paragraph. Bigger, but closer to topic-sentence prediction
  than to summarisation.
"""

from __future__ import annotations

import bz2
import html
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .common import Pair, normalise_ws, sha256_bytes, sha256_file

GENSIM_VERSION = "4.4.0"
WIKI_MEMBERS: tuple[str, ...] = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "gensim/test/test_data/enwiki-table-markup.xml.bz2",
)
LICENCE = (
    "Wikipedia text: CC BY-SA 3.0 (and GFDL), by the Wikipedia contributors "
    "(https://en.wikipedia.org/wiki/Wikipedia:Copyrights); redistributed in the gensim wheel (LGPL-2.1)."
)

# --------------------------------------------------------------------------------------------------
# fetching


def fetch_gensim_wheel(
    cache_dir: Path, version: str = GENSIM_VERSION, refresh: bool = False, offline: bool = False
) -> Path:
    """Path of a cached gensim wheel (any platform tag), downloaded with pip if absent."""
    wdir = Path(cache_dir) / "wiki"
    wheels = sorted(wdir.glob(f"gensim-{version}-*.whl")) if wdir.exists() else []
    if wheels and not refresh:
        return wheels[0]
    if offline:
        raise FileNotFoundError(f"no cached gensim-{version} wheel under {wdir} and offline=True")
    wdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(wdir), f"gensim=={version}"]
    subprocess.run(cmd, check=True)
    wheels = sorted(wdir.glob(f"gensim-{version}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download produced no gensim-{version} wheel in {wdir}")
    return wheels[0]


def read_wheel_members(wheel: Path, members: Sequence[str] = WIKI_MEMBERS) -> dict[str, bytes]:
    """Decompressed XML of each dump in the wheel."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        return {m: bz2.decompress(z.read(m)) for m in members if m in names}


# --------------------------------------------------------------------------------------------------
# XML


@dataclass(frozen=True)
class Page:
    title: str
    ns: str
    text: str
    redirect: bool


def iter_pages(xml: bytes) -> Iterator[Page]:
    """Pages of a MediaWiki XML export (any schema version)."""
    root = ET.fromstring(xml)

    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    for page in root.iter():
        if local(page.tag) != "page":
            continue
        title, ns, text, redirect = "", "0", "", False
        for el in page.iter():
            name = local(el.tag)
            if name == "title":
                title = el.text or ""
            elif name == "ns":
                ns = (el.text or "").strip()
            elif name == "redirect":
                redirect = True
            elif name == "text":
                text = el.text or ""
        yield Page(title, ns, text, redirect or text.lstrip().upper().startswith("#REDIRECT"))


# --------------------------------------------------------------------------------------------------
# markup

_COMMENT_RE = re.compile(r"<!--.*?-->", re.S)
_REF_RE = re.compile(r"<ref\b[^>/]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_DROP_TAGS_RE = re.compile(
    r"<(math|gallery|timeline|syntaxhighlight|source|score|imagemap|chem|hiero|graph|templatedata|pre|code)"
    r"\b[^>]*>.*?</\1\s*>",
    re.S | re.I,
)
_TAG_RE = re.compile(r"</?[a-zA-Z][^>]*?/?>")
_INNER_TEMPLATE_RE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.S)
_INNER_TABLE_RE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
_EXT_LINK_RE = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*(?:\s+([^\]]*))?\]")
_BOLD_ITALIC_RE = re.compile(r"'{2,}")
_HEADING_RE = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_MAGIC_RE = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS_RE = re.compile(r"\s*\(\s*\)")
_PAREN_INNER_SPACE_RE = re.compile(r"\(\s+|\s+\)")
_PAREN_OPEN_PUNCT_RE = re.compile(r"\(\s*(?:[,;:]\s*)+")
_PAREN_CLOSE_PUNCT_RE = re.compile(r"(?:\s*[,;:])+\s*\)")


def tidy_parens(text: str) -> str:
    """Drop the punctuation and empty parentheses that removed templates leave: "X (; , )" -> "X"."""
    while True:
        new = _PAREN_OPEN_PUNCT_RE.sub("(", text)
        new = _PAREN_CLOSE_PUNCT_RE.sub(")", new)
        new = _EMPTY_PARENS_RE.sub("", new)
        new = _PAREN_INNER_SPACE_RE.sub(lambda m: m.group(0).strip(), new)
        if new == text:
            return new
        text = new


_SPACE_PUNCT_RE = re.compile(r"\s+([,.;:!?])")
_DROP_LINK_NS = (
    "file",
    "image",
    "category",
    "media",
    "wikipedia",
    "wp",
    "template",
    "help",
    "portal",
    "special",
    "user",
    "talk",
    "wikt",
    "wiktionary",
    "s",
    "q",
    "commons",
)
# Sections that hold no article prose.
STOP_SECTIONS = frozenset(
    {
        "see also",
        "references",
        "notes",
        "footnotes",
        "external links",
        "further reading",
        "bibliography",
        "sources",
        "citations",
        "notes and references",
        "references and notes",
        "works cited",
        "external sources",
    }
)


# Inline templates whose text belongs in the sentence; every other template is dropped.
_KEEP_FIRST = frozenset({"nowrap", "nobr", "small", "smaller", "big", "nowiki", "abbr", "sic", "mvar", "math"})
_KEEP_LAST = frozenset({"lang", "transl", "lang-rtl"})
_CONVERT = frozenset({"convert", "cvt"})


def _render_template(m: re.Match[str]) -> str:
    parts = [p.strip() for p in m.group(0)[2:-2].split("|")]
    name = parts[0].lower().replace("_", " ")
    args = [p for p in parts[1:] if "=" not in p]
    if name in _CONVERT and len(args) >= 2:
        return f"{args[0]} {args[1]}" if args[1] not in ("-", "to", "and", "–") else f"{args[0]}–{args[2]}"
    if name in _KEEP_FIRST and args:
        return args[0]
    if name in _KEEP_LAST and args:
        return args[-1]
    return ""


def _remove_nested(pattern: re.Pattern[str], text: str, repl=None) -> str:
    while True:
        new = pattern.sub(repl or "", text)
        if new == text:
            return new
        text = new


def _replace_links(text: str) -> str:
    """Resolve ``[[target|label]]`` links (nesting allowed); drop files, categories and interwiki links."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        j = text.find("[[", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        depth, k = 0, j
        while k < n:
            if text.startswith("[[", k):
                depth += 1
                k += 2
            elif text.startswith("]]", k):
                depth -= 1
                k += 2
                if depth == 0:
                    break
            else:
                k += 1
        inner = text[j + 2 : k - 2] if depth == 0 else text[j + 2 :]
        target, _, label = inner.partition("|")
        prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
        is_lang = bool(re.fullmatch(r"[a-z]{2,3}(?:-[a-z]+)?", prefix)) and prefix not in ("s", "q")
        if prefix and (prefix in _DROP_LINK_NS or is_lang):
            pass  # file, category, interlanguage... link: drop it and its caption
        else:
            shown = label if label else target.lstrip(":")
            if "|" in shown:  # [[a|b|c]]: keep the last part
                shown = shown.rsplit("|", 1)[-1]
            out.append(_replace_links(shown))
        i = k if depth == 0 else n
    return "".join(out)


def strip_wiki_markup(text: str) -> list[str]:
    """Plain-text paragraphs of an article's wikitext, up to the first reference-like section.

    Removes comments, references, templates, tables, files/categories/interwiki links, external link URLs,
    HTML tags, bold/italic quotes and list/indent markers; resolves internal links to their labels;
    unescapes HTML entities. Headings end a paragraph and are not kept.
    """
    text = _COMMENT_RE.sub("", text)
    text = _REF_RE.sub("", text)
    text = _DROP_TAGS_RE.sub("", text)
    text = _remove_nested(_INNER_TEMPLATE_RE, text, _render_template)
    text = _remove_nested(_INNER_TABLE_RE, text)
    text = _replace_links(text)
    text = _EXT_LINK_RE.sub(lambda m: m.group(1) or "", text)
    text = _TAG_RE.sub("", text)
    text = _MAGIC_RE.sub("", text)
    text = _BOLD_ITALIC_RE.sub("", text)
    text = html.unescape(text).replace("\u00a0", " ")
    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            para = normalise_ws(" ".join(current))
            para = tidy_parens(para)
            para = _SPACE_PUNCT_RE.sub(r"\1", normalise_ws(para))
            if para:
                paragraphs.append(para)
            current.clear()

    for line in text.split("\n"):
        m = _HEADING_RE.match(line)
        if m:
            flush()
            if m.group(2).strip().lower() in STOP_SECTIONS:
                break
            continue
        stripped = line.strip()
        if not stripped:
            flush()
            continue
        if stripped[0] in "|!{}" or stripped.startswith(("----", "#REDIRECT")):
            continue  # table remains, rules
        if stripped[0] in "*#:;":
            flush()  # a list item is its own paragraph
            current.append(stripped.lstrip("*#:; "))
            flush()
            continue
        current.append(stripped)
    flush()
    return paragraphs


# --------------------------------------------------------------------------------------------------
# sentences

_ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof st jr sr vs etc e.g i.e cf c ca no nos vol fig approx est dept gen col lt sgt capt
    gov sen rep rev fr jan feb mar apr jun jul aug sep sept oct nov dec mt ft u.s u.k inc ltd co corp al
    op ed eds pp p b d fl""".split()
)
_BOUNDARY_RE = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence split that skips common abbreviations and initials ("J. R. R.", "U.S.")."""
    sentences: list[str] = []
    start = 0
    for m in _BOUNDARY_RE.finditer(text):
        before = text[start : m.start() + 1].split()
        last = before[-1] if before else ""
        if last.endswith(".") and not last.endswith((").", '".', "'.", "].")):
            word = last.rstrip(".").lstrip("\"'([").lower()
            if word in _ABBREVIATIONS or len(word) == 1 or re.fullmatch(r"(\w\.)+\w", word):
                continue
        sentences.append(text[start : m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


# --------------------------------------------------------------------------------------------------
# pairs

_SKIP_TITLE_RE = re.compile(r"\(disambiguation\)$|^List of |^Lists of |^Index of ", re.I)


def article_paragraphs(page: Page) -> list[str] | None:
    """Clean paragraphs of a real article, or ``None`` for redirects, non-articles, lists, disambiguations."""
    if page.redirect or page.ns != "0" or _SKIP_TITLE_RE.search(page.title):
        return None
    if re.search(r"\{\{\s*(?:disambig|dab|hndis|geodis)", page.text, re.I):
        return None
    paragraphs = strip_wiki_markup(page.text)
    # Keep prose: paragraphs that look like sentences (drop one-line list items without a full stop).
    return [p for p in paragraphs if len(p.split()) >= 5 and p[-1] in ".!?\"')"]


def wiki_pairs(pages: Sequence[Page]) -> tuple[list[Pair], list[Pair], Counter]:
    """(article-level pairs, paragraph-level pairs, stats) from dump pages."""
    stats: Counter = Counter()
    articles: list[Pair] = []
    paras: list[Pair] = []
    for page in pages:
        stats["pages"] += 1
        paragraphs = article_paragraphs(page)
        if not paragraphs:
            stats["skip_not_article"] += 1
            continue
        stats["articles"] += 1
        lead = split_sentences(paragraphs[0])
        rest = " ".join([" ".join(lead[1:])] + paragraphs[1:]).strip()
        title = page.title
        articles.append(Pair(group=title, uid=f"wiki:{title}", document=rest, summary=lead[0]))
        for i, para in enumerate(paragraphs):
            sents = split_sentences(para)
            if len(sents) < 3:
                continue
            paras.append(Pair(group=title, uid=f"wikipara:{title}:{i}", document=" ".join(sents[1:]), summary=sents[0]))
    return articles, paras, stats


def load_wiki(wheel: Path, members: Sequence[str] = WIKI_MEMBERS) -> tuple[list[Page], dict[str, object]]:
    """Pages of the dumps in the wheel, in file order, plus provenance (wheel and member hashes)."""
    data = read_wheel_members(wheel, members)
    pages: list[Page] = []
    for name in members:
        if name in data:
            pages.extend(iter_pages(data[name]))
    info = {
        "wheel": wheel.name,
        "wheel_sha256": sha256_file(wheel),
        "members": {name: sha256_bytes(data[name]) for name in members if name in data},
        "missing_members": [name for name in members if name not in data],
    }
    return pages, info
