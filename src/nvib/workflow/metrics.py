"""Text-generation metrics (ROUGE, BLEU, chrF), likelihood metrics (mean token NLL, perplexity), output
diversity, and a paired bootstrap test between two systems.

Every corpus metric is also available as a :class:`CorpusMetric`: per-example additive
statistics plus a function from summed statistics to the corpus score. The bootstrap then sums
resampled statistics instead of re-scoring text, which is exact and fast. The likelihood metrics take
``(summed NLL, token count)`` rows as their "predictions" (references are ignored).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

__all__ = [
    "LIKELIHOOD_METRICS",
    "LOWER_IS_BETTER",
    "METRICS",
    "NLL",
    "PERPLEXITY",
    "BootstrapResult",
    "CorpusMetric",
    "Diversity",
    "bleu",
    "chrf",
    "diversity",
    "get_metric",
    "paired_bootstrap",
    "rouge",
    "rouge_per_example",
]

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")


def _check_lengths(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError("no predictions to score")


# ----------------------------------------------------------------------------------------------
# ROUGE


@cache
def _rouge_scorer(types: tuple[str, ...]):
    from rouge_score import rouge_scorer  # here: scoring ROUGE is the only path that needs the package

    return rouge_scorer.RougeScorer(list(types), use_stemmer=True)


def rouge_per_example(
    preds: Sequence[str], refs: Sequence[str], types: Sequence[str] = ROUGE_TYPES
) -> dict[str, np.ndarray]:
    """Per-example ROUGE F1 (x100, stemmed) for each type in ``types``: ``{type: array[N]}``."""
    _check_lengths(preds, refs)
    scorer = _rouge_scorer(tuple(types))
    out = {t: np.empty(len(preds)) for t in types}
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        scores = scorer.score(r, p)  # rouge_score takes (target, prediction)
        for t in types:
            out[t][i] = 100.0 * scores[t].fmeasure
    return out


def rouge(preds: Sequence[str], refs: Sequence[str], types: Sequence[str] = ROUGE_TYPES) -> dict[str, float]:
    """Corpus ROUGE F1 (x100, stemmed): the mean of per-example scores, per type."""
    return {t: float(v.mean()) for t, v in rouge_per_example(preds, refs, types).items()}


# ----------------------------------------------------------------------------------------------
# sacrebleu


@cache
def _sacrebleu_metric(name: str):
    from sacrebleu.metrics import BLEU, CHRF  # here: only BLEU/chrF need sacrebleu

    return BLEU() if name == "bleu" else CHRF()


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, one reference per prediction)."""
    _check_lengths(preds, refs)
    return float(_sacrebleu_metric("bleu").corpus_score(list(preds), [list(refs)]).score)


def chrf(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults, one reference per prediction)."""
    _check_lengths(preds, refs)
    return float(_sacrebleu_metric("chrf").corpus_score(list(preds), [list(refs)]).score)


# ----------------------------------------------------------------------------------------------
# metrics as sufficient statistics


@dataclass(frozen=True)
class CorpusMetric:
    """A corpus metric decomposed into per-example additive statistics.

    ``stats(preds, refs)`` gives an array ``[N, K]``; ``score(stats.sum(0))`` gives the corpus
    score. Calling the object scores a corpus directly.
    """

    name: str
    stats: Callable[[Sequence[str], Sequence[str]], np.ndarray]
    score: Callable[[np.ndarray], float]

    def __call__(self, preds: Sequence[str], refs: Sequence[str]) -> float:
        return float(self.score(self.stats(preds, refs).sum(axis=0)))


def _rouge_metric(kind: str) -> CorpusMetric:
    def stats(preds: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        per = rouge_per_example(preds, refs, (kind,))[kind]
        return np.stack([per, np.ones_like(per)], axis=1)  # [sum of F1, count]

    return CorpusMetric(kind, stats, lambda s: float(s[0] / s[1]))


def _sacrebleu_corpus_metric(name: str) -> CorpusMetric:
    # sacrebleu's own significance tests use these two methods the same way.
    def stats(preds: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        _check_lengths(preds, refs)
        m = _sacrebleu_metric(name)
        return np.asarray(m._extract_corpus_statistics(list(preds), [list(refs)]), dtype=np.float64)

    def score(summed: np.ndarray) -> float:
        m = _sacrebleu_metric(name)
        # BLEU's stats are integer counts; chrF's are too. Cast back so sacrebleu sees ints.
        return float(m._compute_score_from_stats(np.rint(summed).astype(np.int64).tolist()).score)

    return CorpusMetric(name, stats, score)


def _likelihood_stats(outputs: Sequence[Any], _refs: Sequence[Any]) -> np.ndarray:
    try:
        stats = np.asarray(outputs, dtype=np.float64)
    except (TypeError, ValueError):
        stats = np.empty(0)
    if stats.ndim != 2 or stats.shape[1] != 2:
        first = repr(outputs[0])[:60] if len(outputs) else "nothing"
        raise ValueError(f"likelihood metrics take (summed NLL, token count) rows, got {first}")
    return stats


#: Mean negative log-likelihood per target token (nats), token-weighted over the corpus.
NLL = CorpusMetric("nll", _likelihood_stats, lambda s: float(s[0] / s[1]) if s[1] else math.nan)
#: exp(mean token NLL).
PERPLEXITY = CorpusMetric("perplexity", _likelihood_stats, lambda s: float(math.exp(s[0] / s[1])) if s[1] else math.nan)

METRICS: dict[str, CorpusMetric] = {
    "rouge1": _rouge_metric("rouge1"),
    "rouge2": _rouge_metric("rouge2"),
    "rougeL": _rouge_metric("rougeL"),
    "bleu": _sacrebleu_corpus_metric("bleu"),
    "chrf": _sacrebleu_corpus_metric("chrf"),
    "nll": NLL,
    "perplexity": PERPLEXITY,
}
#: Metrics computed from teacher-forced (summed NLL, token count) rows rather than generated text.
LIKELIHOOD_METRICS = frozenset({"nll", "perplexity"})
#: Metrics where lower is better (a search maximises their negative).
LOWER_IS_BETTER = frozenset({"nll", "perplexity"})


def get_metric(name: str) -> CorpusMetric:
    """Look up a corpus metric by name (``rouge1``, ``rouge2``, ``rougeL``, ``bleu``, ``chrf``, ``nll``,
    ``perplexity``)."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}") from None


# ----------------------------------------------------------------------------------------------
# output diversity


@dataclass(frozen=True)
class Diversity:
    """How varied a system's outputs are over a set of inputs.

    ``distinct``: distinct predictions / n; ``top_share``: share of the most frequent prediction;
    ``distinct_2``: distinct word bigrams / all word bigrams over the set (0 when no prediction has two
    words). Words are whitespace tokens; predictions are compared after stripping outer whitespace.
    """

    n: int
    distinct: float
    top_share: float
    distinct_2: float

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "distinct": self.distinct, "top_share": self.top_share, "distinct_2": self.distinct_2}

    def below(self, reference: Diversity, ratio: float = 0.5) -> str | None:
        """Why these outputs are less diverse than ``ratio`` × ``reference``'s (distinct or distinct-2),
        or None when they are not."""
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        reasons = [
            f"{name} {mine:.3f} < {ratio:g} × {ref:.3f}"
            for name, mine, ref in (
                ("distinct", self.distinct, reference.distinct),
                ("distinct-2", self.distinct_2, reference.distinct_2),
            )
            if mine < ratio * ref
        ]
        return "less diverse than the reference: " + "; ".join(reasons) if reasons else None


def diversity(predictions: Sequence[str]) -> Diversity:
    """:class:`Diversity` of ``predictions`` (one string per input)."""
    if not predictions:
        raise ValueError("no predictions to measure")
    texts = [p.strip() for p in predictions]
    counts = Counter(texts)
    bigrams = [tuple(w[i : i + 2]) for w in (t.split() for t in texts) for i in range(len(w) - 1)]
    n = len(texts)
    return Diversity(
        n=n,
        distinct=len(counts) / n,
        top_share=counts.most_common(1)[0][1] / n,
        distinct_2=len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
    )


# ----------------------------------------------------------------------------------------------
# paired bootstrap


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of ``metric(b) - metric(a)``.

    ``delta``: observed difference on the full set; ``mean``: mean over resamples;
    ``ci_low``/``ci_high``: percentile confidence interval; ``p_value``: two-sided, twice the
    smaller fraction of resamples on either side of zero (capped at 1).
    """

    delta: float
    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    confidence: float = 0.95


def paired_bootstrap(
    metric_fn: CorpusMetric | Callable[[Sequence[str], Sequence[str]], float],
    preds_a: Sequence[str],
    preds_b: Sequence[str],
    refs: Sequence[str],
    n: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Paired bootstrap resampling (Koehn, 2004) of the corpus-metric difference b - a.

    The same resampled example indices are used for both systems. A :class:`CorpusMetric` is
    resampled through its statistics (fast, exact); any other callable is re-run on resampled
    lists.
    """
    _check_lengths(preds_a, refs)
    _check_lengths(preds_b, refs)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    size = len(refs)
    idx = np.random.default_rng(seed).integers(0, size, size=(n, size))
    if isinstance(metric_fn, CorpusMetric):
        stats_a = metric_fn.stats(preds_a, refs)
        stats_b = metric_fn.stats(preds_b, refs)
        delta = metric_fn.score(stats_b.sum(0)) - metric_fn.score(stats_a.sum(0))
        sums_a = stats_a[idx].sum(axis=1)
        sums_b = stats_b[idx].sum(axis=1)
        deltas = np.array([metric_fn.score(sb) - metric_fn.score(sa) for sa, sb in zip(sums_a, sums_b, strict=True)])
    else:
        delta = metric_fn(preds_b, refs) - metric_fn(preds_a, refs)
        deltas = np.empty(n)
        for j, row in enumerate(idx):
            r = [refs[i] for i in row]
            deltas[j] = metric_fn([preds_b[i] for i in row], r) - metric_fn([preds_a[i] for i in row], r)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(deltas, [tail, 100 - tail])
    p = min(1.0, 2 * min(float(np.mean(deltas <= 0)), float(np.mean(deltas >= 0))))
    return BootstrapResult(float(delta), float(deltas.mean()), float(lo), float(hi), p, n, confidence)
