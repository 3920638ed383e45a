"""What the Gemma benchmark reports per system: ROUGE-L, target NLL, output diversity, Δ with intervals.

Target NLL is `nvib.workflow.metrics.NLL`: token-weighted, Σ summed NLL / Σ target tokens over per-example (nll, n)
rows, so that the paired bootstrap resamples examples. Diversity is `nvib.workflow.metrics.diversity` (issue 10):
distinct predictions / n, the share of the most frequent prediction, distinct-2 (distinct word bigrams / bigrams).
"""

from __future__ import annotations

from nvib.workflow.metrics import NLL, diversity, get_metric, paired_bootstrap

__all__ = ["NLL", "summarise"]


def summarise(system: dict, baseline: dict | None, refs: list[str], n_boot: int = 1000) -> dict:
    """ROUGE-L, NLL and diversity of one system (`{"preds", "nll"}`); Δ and 95% CI against `baseline`."""
    rouge_l = get_metric("rougeL")
    d = diversity(system["preds"])
    entry = {
        "rougeL": rouge_l(system["preds"], refs),
        "nll": NLL(system["nll"], refs),
        "distinct": d.distinct,
        "top_share": d.top_share,
        "distinct_2": d.distinct_2,
    }
    if baseline is not None:
        for name, metric, key in (("rougeL", rouge_l, "preds"), ("nll", NLL, "nll")):
            b = paired_bootstrap(metric, baseline[key], system[key], refs, n=n_boot)
            entry[f"delta_{name}"], entry[f"ci_{name}"] = b.delta, [b.ci_low, b.ci_high]
    return entry
