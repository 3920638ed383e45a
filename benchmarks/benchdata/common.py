"""Shared pieces of the benchmark builders: pairs, normalisation, filters, dedup, splits, JSONL output."""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

_WS_RE = re.compile(r"\s+")
_NON_WORD_RE = re.compile(r"[^\w\s]+")

# A small list of very frequent English function words, used to tell English prose from other languages
# (and from code) without any model or dictionary.
ENGLISH_STOPWORDS = frozenset(
    """a about above after again all also an and any are as at be been before being below between both but by
    can could did do does doing down during each either few for from further had has have having he her here
    hers him his how i if in into is it its itself just may might more most must my no nor not now of off on
    once only or other our out over own same she should so some such than that the their them then there these
    they this those through to too under until up upon very via was we were what when where whether which
    while who whom why will with within without would you your""".split()
)


@dataclass(frozen=True, order=True)
class Pair:
    """One (document, summary) example.

    ``group`` keeps related examples (same Debian source package, same Python file, same article) in the
    same split; ``uid`` is a stable identifier written to the JSONL as ``id``.
    """

    group: str
    uid: str
    document: str
    summary: str


@dataclass(frozen=True)
class FilterConfig:
    """Length limits, in whitespace-separated words."""

    max_doc_words: int = 200
    min_doc_words: int = 10
    min_summary_words: int = 3
    max_summary_words: int = 40


def normalise_ws(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return _WS_RE.sub(" ", text).strip()


def normalise_key(text: str) -> str:
    """Key used for deduplication: NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return normalise_ws(_NON_WORD_RE.sub(" ", text))


def n_words(text: str) -> int:
    return len(text.split())


def truncate_words(text: str, max_words: int) -> str:
    words = text.split()
    return " ".join(words[:max_words])


def ascii_ratio(text: str) -> float:
    if not text:
        return 0.0
    return sum(1 for ch in text if ord(ch) < 128) / len(text)


def stopword_ratio(text: str) -> float:
    """Fraction of alphabetic tokens that are common English function words."""
    tokens = [t for t in re.findall(r"[A-Za-z]+", text.lower())]
    if not tokens:
        return 0.0
    return sum(1 for t in tokens if t in ENGLISH_STOPWORDS) / len(tokens)


def looks_english(text: str, min_ascii: float = 0.97, min_stopwords: float = 0.12) -> bool:
    return ascii_ratio(text) >= min_ascii and stopword_ratio(text) >= min_stopwords


def clean_pairs(pairs: Iterable[Pair], cfg: FilterConfig) -> tuple[list[Pair], Counter]:
    """Normalise whitespace, cap document length, apply the length filters and deduplicate.

    Pairs are sorted first, so which of two duplicates survives does not depend on the input order.
    Deduplication is on the normalised (truncated) document and, separately, on the normalised summary.
    """
    stats: Counter = Counter()
    out: list[Pair] = []
    seen_docs: set[str] = set()
    seen_sums: set[str] = set()
    for p in sorted(set(pairs)):
        stats["input"] += 1
        summary = normalise_ws(p.summary)
        document = normalise_ws(p.document)
        ns = n_words(summary)
        if ns == 0:
            stats["drop_summary_empty"] += 1
            continue
        if ns < cfg.min_summary_words:
            stats["drop_summary_short"] += 1
            continue
        if ns > cfg.max_summary_words:
            stats["drop_summary_long"] += 1
            continue
        if n_words(document) < cfg.min_doc_words:
            stats["drop_document_short"] += 1
            continue
        if n_words(document) > cfg.max_doc_words:
            stats["truncated_document"] += 1
            document = truncate_words(document, cfg.max_doc_words)
        dkey, skey = normalise_key(document), normalise_key(summary)
        if dkey in seen_docs:
            stats["drop_duplicate_document"] += 1
            continue
        if skey in seen_sums:
            stats["drop_duplicate_summary"] += 1
            continue
        seen_docs.add(dkey)
        seen_sums.add(skey)
        out.append(Pair(p.group, p.uid, document, summary))
        stats["kept"] += 1
    return out, stats


def resolve_sizes(sizes: Sequence[tuple[str, float | int | None]], total: int) -> list[tuple[str, int | None]]:
    """Turn fractions (0 < x < 1) into counts of ``total``; ``None`` means "whatever is left"."""
    out: list[tuple[str, int | None]] = []
    for name, size in sizes:
        if size is None:
            out.append((name, None))
        elif isinstance(size, float) and 0 < size < 1:
            out.append((name, int(round(size * total))))
        else:
            out.append((name, int(size)))
    return out


def split_by_group(
    pairs: Sequence[Pair], sizes: Sequence[tuple[str, float | int | None]], seed: int
) -> dict[str, list[Pair]]:
    """Seeded, group-aware split.

    Groups are sorted, shuffled with ``random.Random(seed)`` and handed out in that order: a group goes to the
    first split (in ``sizes`` order) that still has room for all of it, otherwise to the split whose size is
    ``None`` (the remainder, normally ``train``). A group never straddles two splits. Within each split the
    examples are shuffled with the same generator, so files read in order are a random sample.
    """
    resolved = resolve_sizes(sizes, len(pairs))
    rest = [name for name, size in resolved if size is None]
    if len(rest) > 1:
        raise ValueError("at most one split may take the remainder (size None)")
    by_group: dict[str, list[Pair]] = {}
    for p in sorted(pairs):
        by_group.setdefault(p.group, []).append(p)
    groups = sorted(by_group)
    rng = random.Random(seed)
    rng.shuffle(groups)
    out: dict[str, list[Pair]] = {name: [] for name, _ in resolved}
    for g in groups:
        members = by_group[g]
        for name, size in resolved:
            if size is not None and len(out[name]) + len(members) <= size:
                out[name].extend(members)
                break
        else:
            if rest:
                out[rest[0]].extend(members)
    for name in out:
        out[name].sort()
        rng.shuffle(out[name])
    return out


def to_record(p: Pair) -> dict[str, str]:
    return {"id": p.uid, "document": p.document, "summary": p.summary}


def write_jsonl(path: Path, pairs: Iterable[Pair]) -> dict[str, object]:
    """Write pairs as JSONL (UTF-8, '\\n' line ends); return count, size and sha256 of the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    n = 0
    size = 0
    with open(path, "wb") as f:
        for p in pairs:
            line = (json.dumps(to_record(p), ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8")
            f.write(line)
            h.update(line)
            n += 1
            size += len(line)
    return {"count": n, "bytes": size, "sha256": h.hexdigest()}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def config_dict(cfg: FilterConfig) -> dict[str, int]:
    return asdict(cfg)
