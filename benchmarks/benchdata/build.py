"""``build_all``: write every domain's splits and the manifest; ``main``: the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import debian, docstrings, wiki
from .common import FilterConfig, Pair, clean_pairs, config_dict, split_by_group, write_jsonl

DOMAINS: tuple[str, ...] = ("debian", "docstrings", "wiki", "wikipara")
DEFAULT_CACHE = Path(".cache") / "benchdata"
MANIFEST_VERSION = 1

DESCRIPTIONS = {
    "debian": "Debian package descriptions: long description -> one-line synopsis (in domain)",
    "docstrings": "Python docstrings: body -> first summary line (out of domain)",
    "wiki": "Wikipedia articles: article minus its first sentence -> lead sentence (out of domain)",
    "wikipara": "Wikipedia paragraphs: paragraph minus its first sentence -> that sentence (out of domain)",
}


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _write_domain(
    out_dir: Path,
    domain: str,
    pairs: list[Pair],
    sizes: Sequence[tuple[str, float | int | None]],
    cfg: FilterConfig,
    seed: int,
) -> dict[str, Any]:
    kept, stats = clean_pairs(pairs, cfg)
    splits = split_by_group(kept, sizes, seed)
    entry: dict[str, Any] = {
        "description": DESCRIPTIONS[domain],
        "splits": {},
        "filter_stats": dict(sorted(stats.items())),
    }
    for name in ("train", "dev", "test"):
        if name not in splits:
            continue
        rel = f"{domain}/{name}.jsonl"
        info = write_jsonl(out_dir / rel, splits[name])
        entry["splits"][name] = {"path": rel, **info}
    entry["groups"] = len({p.group for p in kept})
    return entry


def build_all(
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    domains: Sequence[str] = DOMAINS,
    seed: int = 0,
    max_doc_words: int = 200,
    min_doc_words: int = 10,
    min_summary_words: int = 3,
    max_summary_words: int = 40,
    dev_size: int = 500,
    test_size: int = 1000,
    wiki_dev_fraction: float = 1 / 3,
    debian_suite: str = debian.DEFAULT_SUITE,
    debian_mirror: str = debian.DEFAULT_MIRROR,
    gensim_version: str = wiki.GENSIM_VERSION,
    python_packages: Sequence[str] = docstrings.DEFAULT_PACKAGES,
    include_stdlib: bool = True,
    extra_source_roots: Sequence[str | Path] = (),
    refresh: bool = False,
    offline: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Build the benchmark under ``out_dir`` and return the manifest (also written as ``manifest.json``).

    Writes ``out_dir/<domain>/{train,dev,test}.jsonl`` (one ``{"id", "document", "summary"}`` object a line)
    for each of ``domains``:

    * ``debian`` (in domain): test ``test_size``, dev ``dev_size``, the rest train; split by source package.
    * ``docstrings``: test/dev as above, the rest train; split by Python file.
    * ``wiki``: dev gets ``wiki_dev_fraction`` of the articles, test the rest (no train).
    * ``wikipara``: test/dev as above (capped by what exists), the rest train; split by article.

    Inputs are fetched into ``cache_dir`` when missing (Debian indexes through a private ``apt-get update``,
    the gensim wheel through ``pip download``); with the cache present nothing touches the network.
    ``offline=True`` fails instead of fetching. The outputs depend only on the cached inputs, the installed
    Python/distributions (for ``docstrings``) and the arguments: the same inputs give byte-identical files.
    """
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    unknown = set(domains) - set(DOMAINS)
    if unknown:
        raise ValueError(f"unknown domains {sorted(unknown)}; choose from {DOMAINS}")
    cfg = FilterConfig(max_doc_words, min_doc_words, min_summary_words, max_summary_words)
    std_sizes = [("test", test_size), ("dev", dev_size), ("train", None)]
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "seed": seed,
        "filters": config_dict(cfg),
        "split_sizes": {"dev": dev_size, "test": test_size, "wiki_dev_fraction": round(wiki_dev_fraction, 6)},
        "format": "JSON Lines, UTF-8; each line {'id': str, 'document': str, 'summary': str}",
        "domains": {},
    }
    timings: dict[str, float] = {}

    if "debian" in domains:
        t0 = time.perf_counter()
        _log(f"[debian] indexes of {debian_suite} (cache {cache})", quiet)
        paths = debian.fetch_debian_indexes(cache, debian_suite, debian_mirror, refresh=refresh, offline=offline)
        translation, packages, info = debian.load_debian(paths)
        pairs, stats = debian.debian_pairs(translation, packages)
        _log(f"[debian] {stats['stanzas']} descriptions, {len(pairs)} candidate pairs", quiet)
        entry = _write_domain(out, "debian", pairs, std_sizes, cfg, seed)
        entry["source_stats"] = dict(sorted(stats.items()))
        entry["source"] = {"kind": "Debian Translation-en (apt)", **info}
        entry["licence"] = debian.LICENCE
        manifest["domains"]["debian"] = entry
        timings["debian"] = time.perf_counter() - t0

    if "docstrings" in domains:
        t0 = time.perf_counter()
        files, info = docstrings.collect_files(include_stdlib, python_packages, [Path(r) for r in extra_source_roots])
        _log(f"[docstrings] {len(files)} source files", quiet)
        pairs, stats = docstrings.docstring_pairs(files, min_body_words=min_doc_words, progress=not quiet)
        entry = _write_domain(out, "docstrings", pairs, std_sizes, cfg, seed)
        entry["source_stats"] = dict(sorted(stats.items()))
        entry["source"] = {"kind": "Python docstrings (ast)", **info}
        entry["licence"] = (
            "Python standard library: PSF-2.0; each distribution's docstrings: that distribution's licence "
            "(see source.packages[*].licence)."
        )
        manifest["domains"]["docstrings"] = entry
        timings["docstrings"] = time.perf_counter() - t0

    if "wiki" in domains or "wikipara" in domains:
        t0 = time.perf_counter()
        wheel = wiki.fetch_gensim_wheel(cache, gensim_version, refresh=refresh, offline=offline)
        pages, info = wiki.load_wiki(wheel)
        articles, paras, stats = wiki.wiki_pairs(pages)
        _log(f"[wiki] {len(pages)} pages, {len(articles)} articles, {len(paras)} paragraphs", quiet)
        source = {"kind": f"Wikipedia dumps in the gensim {gensim_version} wheel (test data)", **info}
        if "wiki" in domains:
            entry = _write_domain(out, "wiki", articles, [("dev", wiki_dev_fraction), ("test", None)], cfg, seed)
            entry.update(source_stats=dict(sorted(stats.items())), source=source, licence=wiki.LICENCE)
            manifest["domains"]["wiki"] = entry
        if "wikipara" in domains:
            entry = _write_domain(out, "wikipara", paras, std_sizes, cfg, seed)
            entry.update(source_stats=dict(sorted(stats.items())), source=source, licence=wiki.LICENCE)
            manifest["domains"]["wikipara"] = entry
        timings["wiki"] = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    if not quiet:
        _print_summary(manifest, timings)
    return manifest


def _print_summary(manifest: dict[str, Any], timings: dict[str, float]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(json.dumps({d: {s: v["count"] for s, v in e["splits"].items()} for d, e in manifest["domains"].items()}))
        return
    table = Table(title="benchmark data")
    for col in ("domain", "train", "dev", "test"):
        table.add_column(col, justify="right" if col != "domain" else "left")
    for domain, entry in manifest["domains"].items():
        cells = [str(entry["splits"][s]["count"]) if s in entry["splits"] else "-" for s in ("train", "dev", "test")]
        table.add_row(domain, *cells)
    console = Console(stderr=True)
    console.print(table)
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nvib.benchdata", description="Build the summarisation benchmark.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="fetch (or reuse cached) sources and write the JSONL splits")
    b.add_argument("--out", required=True, type=Path, help="output directory")
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"input cache (default {DEFAULT_CACHE})")
    b.add_argument("--domains", default=",".join(DOMAINS), help=f"comma-separated subset of {','.join(DOMAINS)}")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-doc-words", type=int, default=200)
    b.add_argument("--min-doc-words", type=int, default=10)
    b.add_argument("--min-summary-words", type=int, default=3)
    b.add_argument("--max-summary-words", type=int, default=40)
    b.add_argument("--dev-size", type=int, default=500)
    b.add_argument("--test-size", type=int, default=1000)
    b.add_argument("--wiki-dev-fraction", type=float, default=1 / 3)
    b.add_argument("--debian-suite", default=debian.DEFAULT_SUITE)
    b.add_argument("--debian-mirror", default=debian.DEFAULT_MIRROR)
    b.add_argument("--gensim-version", default=wiki.GENSIM_VERSION)
    b.add_argument(
        "--python-packages",
        default=",".join(docstrings.DEFAULT_PACKAGES),
        help="comma-separated distributions whose docstrings are harvested (besides the stdlib)",
    )
    b.add_argument("--no-stdlib", action="store_true", help="do not harvest the standard library's docstrings")
    b.add_argument(
        "--extra-source-root",
        action="append",
        default=[],
        type=Path,
        help="another tree of .py files (repeatable)",
    )
    b.add_argument("--refresh", action="store_true", help="re-fetch inputs even if cached")
    b.add_argument("--offline", action="store_true", help="never fetch; fail if an input is not cached")
    b.add_argument("--quiet", action="store_true")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command == "build":
        t0 = time.perf_counter()
        build_all(
            args.out,
            args.cache,
            domains=[d.strip() for d in args.domains.split(",") if d.strip()],
            seed=args.seed,
            max_doc_words=args.max_doc_words,
            min_doc_words=args.min_doc_words,
            min_summary_words=args.min_summary_words,
            max_summary_words=args.max_summary_words,
            dev_size=args.dev_size,
            test_size=args.test_size,
            wiki_dev_fraction=args.wiki_dev_fraction,
            debian_suite=args.debian_suite,
            debian_mirror=args.debian_mirror,
            gensim_version=args.gensim_version,
            python_packages=[p.strip() for p in args.python_packages.split(",") if p.strip()],
            include_stdlib=not args.no_stdlib,
            extra_source_roots=args.extra_source_root,
            refresh=args.refresh,
            offline=args.offline,
            quiet=args.quiet,
        )
        if not args.quiet:
            print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0
