"""Deterministic builders of the summarisation benchmark.

In domain: Debian package descriptions; out of domain: Python docstrings and Wikipedia.
``build_all(out_dir, cache_dir)`` writes ``out_dir/<domain>/{train,dev,test}.jsonl`` and
``out_dir/manifest.json``; ``PYTHONPATH=benchmarks python -m benchdata build --out DIR [--cache DIR]`` does the
same from the command line.
One function per source turns raw input into candidate pairs: :func:`debian_pairs`, :func:`docstring_pairs`,
:func:`wiki_pairs`; :func:`clean_pairs` and :func:`split_by_group` then filter, deduplicate and split them.
"""

from .build import DOMAINS, build_all, main
from .common import FilterConfig, Pair, clean_pairs, read_jsonl, split_by_group, write_jsonl
from .debian import debian_pairs, fetch_debian_indexes, parse_deb822, parse_description
from .docstrings import collect_files, docstring_pairs, split_docstring
from .wiki import fetch_gensim_wheel, split_sentences, strip_wiki_markup, wiki_pairs

__all__ = [
    "DOMAINS",
    "FilterConfig",
    "Pair",
    "build_all",
    "clean_pairs",
    "collect_files",
    "debian_pairs",
    "docstring_pairs",
    "fetch_debian_indexes",
    "fetch_gensim_wheel",
    "main",
    "parse_deb822",
    "parse_description",
    "read_jsonl",
    "split_by_group",
    "split_docstring",
    "split_sentences",
    "strip_wiki_markup",
    "wiki_pairs",
    "write_jsonl",
]
