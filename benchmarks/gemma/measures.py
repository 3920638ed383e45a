"""What the Gemma benchmark reports per system: ROUGE-L, target NLL, output diversity, Δ with intervals.

Target NLL is token-weighted: Σ summed NLL / Σ target tokens, as a `CorpusMetric` over per-example
(nll, n) rows so that the paired bootstrap resamples examples. Diversity follows issue 10: distinct
predictions / n, the share of the most frequent prediction, distinct-2 (distinct word bigrams / bigrams).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from nvib.metrics import CorpusMetric, get_metric, paired_bootstrap

NLL = CorpusMetric(
    "nll", lambda rows, _refs: np.asarray(rows, dtype=np.float64).reshape(len(rows), 2), lambda s: float(s[0] / s[1])
)


def diversity(preds: Sequence[str]) -> dict[str, float]:
    """distinct (distinct predictions / n), top_share (most frequent prediction / n), distinct2; predictions are
    compared after stripping outer whitespace, words are whitespace tokens (as nvib.metrics.diversity on `obj`)."""
    texts = [p.strip() for p in preds]
    counts = Counter(texts)
    bigrams = [tuple(w[i : i + 2]) for w in (t.split() for t in texts) for i in range(len(w) - 1)]
    return {
        "distinct": len(counts) / len(preds),
        "top_share": max(counts.values()) / len(preds),
        "distinct2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
    }


def summarise(system: dict, baseline: dict | None, refs: list[str], n_boot: int = 1000) -> dict:
    """ROUGE-L, NLL and diversity of one system (`{"preds", "nll"}`); Δ and 95% CI against `baseline`."""
    rouge_l = get_metric("rougeL")
    entry = {"rougeL": rouge_l(system["preds"], refs), "nll": NLL(system["nll"], refs), **diversity(system["preds"])}
    if baseline is not None:
        for name, metric, key in (("rougeL", rouge_l, "preds"), ("nll", NLL, "nll")):
            b = paired_bootstrap(metric, baseline[key], system[key], refs, n=n_boot)
            entry[f"delta_{name}"], entry[f"ci_{name}"] = b.delta, [b.ci_low, b.ci_high]
    return entry
