"""Read user data from local files and turn it into model-ready batches.

Supported inputs (chosen by extension): JSON Lines (``.jsonl``/``.ndjson``), CSV (``.csv``),
TSV (``.tsv``), and a directory written by HF ``datasets``' ``save_to_disk``; and a dataset by name
(:class:`HubDataset`: ``datasets.load_dataset`` with a config, a split and a column mapping, which reads the hub
unless ``HF_DATASETS_OFFLINE`` is set, or a local folder of data files). Problems are reported as
:class:`DataError` naming the file (or dataset), the line or row, what is wrong and how to fix it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "AUTO_COLUMNS",
    "BatchKind",
    "DataError",
    "Example",
    "HubDataset",
    "batches",
    "load_dataset_examples",
    "load_examples",
    "pad_and_mask",
    "pad_id",
]

#: Column pairs tried, in order, when no column names are given. ``None`` target = no target.
AUTO_COLUMNS: tuple[tuple[str, str | None], ...] = (
    ("document", "summary"),
    ("source", "target"),
    ("text", None),
)

BatchKind = Literal["seq2seq", "lm", "encoder"]

_JSONL_EXT = {".jsonl", ".ndjson"}
_DELIMITERS = {".csv": ",", ".tsv": "\t"}


class DataError(ValueError):
    """A problem with the user's data file; the message says where, what and how to fix it."""


@dataclass(frozen=True)
class Example:
    """One example: ``source`` text and, for conditional tasks, a ``target`` text."""

    source: str
    target: str | None = None


def load_examples(
    path: str | os.PathLike[str],
    source_column: str | None = None,
    target_column: str | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Read examples from a local JSONL/CSV/TSV file or a ``save_to_disk`` directory.

    With no column names, the first of :data:`AUTO_COLUMNS` whose columns are all present is
    used (``text`` alone gives examples without target, for language modelling). With
    ``source_column`` only, examples have no target. ``split`` picks a split of a saved
    ``DatasetDict``; ``limit`` keeps only the first ``limit`` examples.
    """
    p = Path(path)
    if target_column is not None and source_column is None:
        raise DataError(
            f"{p}: target_column={target_column!r} was given without source_column. "
            "Fix: give the source column name too."
        )
    if limit is not None and limit < 0:
        raise DataError(f"{p}: limit must be >= 0, got {limit}.")
    if not p.exists():
        raise DataError(f"{p}: file not found. Fix: check the path (it is read locally, never from a hub).")
    ext = p.suffix.lower()
    if p.is_dir():
        examples = _read_saved_dataset(p, source_column, target_column, split, limit)
    elif ext not in _JSONL_EXT and ext not in _DELIMITERS:
        raise DataError(
            f"{p}: unsupported file extension {ext or '(none)'!r}. Fix: use .jsonl, .csv or .tsv, "
            "or a directory written by datasets' save_to_disk."
        )
    else:
        try:
            if ext in _JSONL_EXT:
                examples = _read_jsonl(p, source_column, target_column, limit)
            else:
                examples = _read_delimited(p, _DELIMITERS[ext], source_column, target_column, limit)
        except UnicodeDecodeError as e:
            raise DataError(
                f"{p}: not valid UTF-8 (byte {e.start}: {e.reason}). Fix: re-save the file as UTF-8."
            ) from None
    if not examples and limit != 0:
        raise DataError(f"{p}: empty: no examples found. Fix: add at least one example (check the path).")
    return examples


# ----------------------------------------------------------------------------------------------
# column handling


def _resolve_columns(
    where: str, found: Sequence[str], source_column: str | None, target_column: str | None
) -> tuple[str, str | None]:
    """Pick the (source, target) columns from ``found``; raise a DataError naming what is missing."""
    found_list = ", ".join(repr(c) for c in found) or "(none)"
    if source_column is not None:
        wanted = [source_column] + ([target_column] if target_column is not None else [])
        missing = [c for c in wanted if c not in found]
        if missing:
            raise DataError(
                f"{where}: missing column {', '.join(repr(c) for c in missing)}; "
                f"columns found: {found_list}. Fix: pass the right source/target column names."
            )
        return source_column, target_column
    for src, tgt in AUTO_COLUMNS:
        if src in found and (tgt is None or tgt in found):
            return src, tgt
    tried = "; ".join(f"{s!r}+{t!r}" if t else f"{s!r} alone" for s, t in AUTO_COLUMNS)
    raise DataError(
        f"{where}: cannot find source/target columns; columns found: {found_list} (tried {tried}). "
        "Fix: name the columns with source_column/target_column."
    )


def _text_value(where: str, column: str, value: Any) -> str:
    if value is None:
        raise DataError(f"{where}: column {column!r} has no value. Fix: give a non-empty string.")
    if not isinstance(value, str):
        raise DataError(
            f"{where}: column {column!r} must be a string, got {type(value).__name__} ({value!r:.60}). "
            "Fix: store the text as a JSON string."
        )
    if not value.strip():
        raise DataError(f"{where}: column {column!r} is empty. Fix: remove the example or give it text.")
    return value


def _make_example(where: str, row: Mapping[str, Any], src: str, tgt: str | None) -> Example:
    source = _text_value(where, src, row.get(src))
    target = _text_value(where, tgt, row.get(tgt)) if tgt is not None else None
    return Example(source, target)


# ----------------------------------------------------------------------------------------------
# readers


def _read_jsonl(p: Path, source_column: str | None, target_column: str | None, limit: int | None) -> list[Example]:
    examples: list[Example] = []
    columns: tuple[str, str | None] | None = None
    with p.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{p}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: malformed JSON ({e.msg} at column {e.colno}). "
                    'Fix: each line must be one JSON object, e.g. {"source": "...", "target": "..."}.'
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{where}: expected a JSON object, got {type(row).__name__}. "
                    'Fix: each line must be one JSON object, e.g. {"source": "...", "target": "..."}.'
                )
            if columns is None:
                columns = _resolve_columns(where, list(row), source_column, target_column)
            else:
                # Later lines must carry the same columns; report which is missing here.
                _resolve_columns(where, list(row), *columns)
            examples.append(_make_example(where, row, *columns))
    return examples


def _read_delimited(
    p: Path, delimiter: str, source_column: str | None, target_column: str | None, limit: int | None
) -> list[Example]:
    csv.field_size_limit(2**31 - 1)
    examples: list[Example] = []
    with p.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames
        if not header:
            raise DataError(f"{p}: empty file (no header row). Fix: the first line must name the columns.")
        src, tgt = _resolve_columns(f"{p}, line 1 (header)", header, source_column, target_column)
        for row in reader:
            if limit is not None and len(examples) >= limit:
                break
            where = f"{p}, line {reader.line_num}"
            if None in row:
                raise DataError(
                    f"{where}: row has {len(header) + len(row[None])} fields but the header has "
                    f"{len(header)}. Fix: quote fields that contain the delimiter."
                )
            examples.append(_make_example(where, row, src, tgt))
    return examples


def _read_saved_dataset(
    p: Path, source_column: str | None, target_column: str | None, split: str | None, limit: int | None
) -> list[Example]:
    import datasets  # here: the datasets package (pyarrow, pandas) is slow to import and only saved datasets need it

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as e:
        raise DataError(
            f"{p}: not a dataset directory ({e}). Fix: pass a .jsonl/.csv/.tsv file or a directory "
            "written by datasets' save_to_disk."
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None:
            if len(splits) != 1:
                raise DataError(
                    f"{p}: the dataset has splits {', '.join(map(repr, splits))}. Fix: choose one with split=..."
                )
            split = splits[0]
        if split not in ds:
            raise DataError(f"{p}: no split {split!r}; splits found: {', '.join(map(repr, splits))}.")
        ds = ds[split]
    elif split is not None:
        raise DataError(f"{p}: split={split!r} given but the directory holds a single dataset without splits.")
    src, tgt = _resolve_columns(str(p), ds.column_names, source_column, target_column)
    n = len(ds) if limit is None else min(limit, len(ds))
    cols = [src] + ([tgt] if tgt is not None else [])
    rows = ds.select_columns(cols).select(range(n)).to_dict()
    return [
        _make_example(f"{p}, row {i}", {c: rows[c][i] for c in cols}, src, tgt)
        for i in range(n)  # rows are 0-based, as datasets indexes them
    ]


@dataclass(frozen=True)
class HubDataset:
    """A dataset by name for ``datasets.load_dataset(name, config, split=split)``: a hub id such as
    ``EdinburghNLP/xsum``, or a local folder of data files. Columns: ``source``/``target``, or ``translation``
    = (source language, target language) for a ``translation`` column of {language: text} rows (the OPUS layout)."""

    name: str
    split: str
    config: str | None = None
    source: str | None = None
    target: str | None = None
    translation: tuple[str, str] | None = None

    def __str__(self) -> str:
        return f"{self.name}" + (f" ({self.config})" if self.config else "") + f" [{self.split}]"


def load_dataset_examples(spec: HubDataset, *, limit: int | None = None) -> list[Example]:
    """The examples of a named dataset (:class:`HubDataset`), the first ``limit`` of its split."""
    import datasets

    try:
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split, trust_remote_code=False)
    except Exception as e:  # offline, unknown name, missing config or split: one line naming the fix
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"dataset {spec}: could not be loaded ({type(e).__name__}: {reason[:300]}). Fix: check the name, config "
            "and split on its dataset card; without hub access set HF_DATASETS_OFFLINE=1 to use a cached copy, or "
            "give a local copy (a folder of data files, a save_to_disk directory or a .jsonl file) instead"
        ) from None
    n = len(ds) if limit is None else min(limit, len(ds))
    ds = ds.select(range(n))
    if spec.translation is not None:
        if "translation" not in ds.column_names:
            raise DataError(
                f"dataset {spec}: no 'translation' column; columns: {', '.join(ds.column_names)}. Fix: name the "
                "columns with source/target instead of translation"
            )
        pairs = ds["translation"]
        src, tgt = spec.translation
        rows = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, Mapping) or src not in pair or tgt not in pair:
                keys = ", ".join(map(repr, pair)) if isinstance(pair, Mapping) else type(pair).__name__
                raise DataError(
                    f"dataset {spec}, row {i}: the translation has no {src!r}/{tgt!r} (languages: {keys}). Fix: "
                    "give translation: [source language, target language] as the dataset names them"
                )
            rows.append(_make_example(f"dataset {spec}, row {i}", pair, src, tgt))
        return rows
    src, tgt = _resolve_columns(f"dataset {spec}", ds.column_names, spec.source, spec.target)
    cols = [src] + ([tgt] if tgt is not None else [])
    data = ds.select_columns(cols).to_dict()
    return [_make_example(f"dataset {spec}, row {i}", {c: data[c][i] for c in cols}, src, tgt) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# batching


def _chunks(examples: Iterable[Example], size: int) -> Iterator[list[Example]]:
    chunk: list[Example] = []
    for ex in examples:
        chunk.append(ex)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def _mask(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    return _pad([[1] * len(s) for s in seqs], 0)


def pad_and_mask(seqs: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] ids and their [B, T] 0/1 attention mask."""
    return _pad(seqs, value), _mask(seqs)


def pad_id(tokenizer: Any) -> int:
    """The id padding is written with: pad, else EOS, else UNK, else 0 (always masked out)."""
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0  # masked out by attention_mask and -100 labels anyway


def batches(
    examples: Iterable[Example],
    tokenizer: Any,
    batch_size: int,
    max_source_len: int,
    max_target_len: int,
    kind: BatchKind,
    *,
    lm_separator: str = "\n",
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield tokenised batches, in input order, as a HF model's ``forward`` takes them.

    - ``seq2seq``: ``input_ids``, ``attention_mask`` from the source, ``labels`` from the target
      (``text_target``), padding in labels set to -100.
    - ``lm`` (decoder-only): ``input_ids`` = source + ``lm_separator`` + target + EOS; ``labels``
      are -100 on the prompt and padding so the loss covers the target only. Without a target,
      the source alone is the text and every real token is a label.
    - ``encoder``: ``input_ids``, ``attention_mask`` from the source.

    Sequences are right-padded; sources are truncated to ``max_source_len`` tokens and targets
    to ``max_target_len`` tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if kind not in ("seq2seq", "lm", "encoder"):
        raise ValueError(f"kind must be 'seq2seq', 'lm' or 'encoder', got {kind!r}")
    pad = pad_id(tokenizer)
    for chunk in _chunks(examples, batch_size):
        sources = [ex.source for ex in chunk]
        if kind == "encoder":
            ids = tokenizer(sources, truncation=True, max_length=max_source_len)["input_ids"]
            yield {"input_ids": _pad(ids, pad), "attention_mask": _mask(ids)}
        elif kind == "seq2seq":
            targets = _targets(chunk, kind)
            ids = tokenizer(sources, truncation=True, max_length=max_source_len)["input_ids"]
            labels = tokenizer(text_target=targets, truncation=True, max_length=max_target_len)["input_ids"]
            yield {"input_ids": _pad(ids, pad), "attention_mask": _mask(ids), "labels": _pad(labels, -100)}
        else:
            yield _lm_batch(chunk, tokenizer, max_source_len, max_target_len, lm_separator, pad)


def _targets(chunk: Sequence[Example], kind: str) -> list[str]:
    targets = [ex.target for ex in chunk]
    if any(t is None for t in targets):
        raise DataError(
            f"kind={kind!r} needs a target for every example, but some have none. "
            "Fix: load the data with a target column."
        )
    return targets  # type: ignore[return-value]


def _lm_batch(
    chunk: Sequence[Example], tokenizer: Any, max_source_len: int, max_target_len: int, sep: str, pad: int
) -> dict[str, torch.Tensor]:
    has_target = [ex.target is not None for ex in chunk]
    if any(has_target) and not all(has_target):
        raise DataError("kind='lm': either every example has a target or none has. Fix: check the data.")
    if not all(has_target):
        ids = tokenizer([ex.source for ex in chunk], truncation=True, max_length=max_source_len)["input_ids"]
        return {"input_ids": _pad(ids, pad), "attention_mask": _mask(ids), "labels": _pad(ids, -100)}
    prompts = tokenizer([ex.source + sep for ex in chunk], truncation=True, max_length=max_source_len)
    answers = tokenizer([ex.target for ex in chunk], add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    seqs: list[list[int]] = []
    labels: list[list[int]] = []
    for prompt, answer in zip(prompts["input_ids"], answers, strict=True):
        answer = list(answer)
        if eos is not None and (not answer or answer[-1] != eos):
            answer.append(int(eos))
        answer = answer[:max_target_len]
        seqs.append(list(prompt) + answer)
        labels.append([-100] * len(prompt) + answer)
    return {"input_ids": _pad(seqs, pad), "attention_mask": _mask(seqs), "labels": _pad(labels, -100)}


def fingerprint(examples: Sequence[Example]) -> str:
    """SHA-256 (first 16 hex digits) of the examples' texts, in order: equal iff the same data."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.source, ex.target], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]
