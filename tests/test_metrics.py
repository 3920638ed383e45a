"""Tests for nvib.workflow.metrics."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from nvib.workflow.metrics import (
    LOWER_IS_BETTER,
    METRICS,
    NLL,
    BootstrapResult,
    Diversity,
    bleu,
    chrf,
    diversity,
    get_metric,
    paired_bootstrap,
    rouge,
    rouge_per_example,
)

REFS = [
    "the cat sat on the mat",
    "a dog was barking loudly at the postman",
    "stocks fell sharply on monday",
    "the weather will be sunny tomorrow",
    "she plays the violin every evening",
    "the committee approved the new budget",
]
PREDS_A = [
    "a cat is on a mat",
    "the dog barked",
    "stocks rose on tuesday",
    "rain expected tomorrow",
    "she played violin",
    "the budget was rejected",
]
PREDS_B = [
    "the cat sat on a mat",
    "a dog was barking at the postman",
    "stocks fell on monday",
    "the weather will be sunny",
    "she plays the violin every day",
    "the committee approved the budget",
]


def test_rouge_matches_rouge_score_with_stemming() -> None:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {
        t: 100 * np.mean([scorer.score(r, p)[t].fmeasure for p, r in zip(PREDS_A, REFS, strict=True)])
        for t in ("rouge1", "rouge2", "rougeL")
    }
    got = rouge(PREDS_A, REFS)
    assert got.keys() == expected.keys()
    for t in expected:
        assert got[t] == pytest.approx(expected[t])
    # Stemming: "played" vs "plays" match after stemming.
    assert rouge(["she played"], ["she plays"])["rouge1"] == pytest.approx(100.0)
    assert rouge(REFS, REFS)["rouge2"] == pytest.approx(100.0)


def test_bleu_chrf_match_sacrebleu() -> None:
    assert bleu(PREDS_A, REFS) == pytest.approx(sacrebleu.corpus_bleu(PREDS_A, [REFS]).score)
    assert chrf(PREDS_B, REFS) == pytest.approx(sacrebleu.corpus_chrf(PREDS_B, [REFS]).score)
    assert bleu(REFS, REFS) == pytest.approx(100.0)
    assert bleu(PREDS_B, REFS) > bleu(PREDS_A, REFS)


@pytest.mark.parametrize("name", [m for m in METRICS if m not in LOWER_IS_BETTER])  # text metrics
def test_sufficient_statistics_reproduce_corpus_score(name: str) -> None:
    direct = {
        "rouge1": lambda p, r: rouge(p, r)["rouge1"],
        "rouge2": lambda p, r: rouge(p, r)["rouge2"],
        "rougeL": lambda p, r: rouge(p, r)["rougeL"],
        "bleu": bleu,
        "chrf": chrf,
    }[name]
    m = get_metric(name)
    assert m(PREDS_B, REFS) == pytest.approx(direct(PREDS_B, REFS))
    # Also on a resample with repeats, via summed statistics.
    idx = [0, 0, 3, 5, 5, 5, 2]
    stats = m.stats(PREDS_A, REFS)
    resampled = m.score(stats[idx].sum(0))
    assert resampled == pytest.approx(direct([PREDS_A[i] for i in idx], [REFS[i] for i in idx]))


def test_get_metric_unknown() -> None:
    with pytest.raises(ValueError, match="unknown metric 'meteor'"):
        get_metric("meteor")


def test_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        bleu([], [])


@pytest.mark.parametrize("metric", [METRICS["rouge1"], METRICS["bleu"], bleu])
def test_identical_systems_give_zero(metric) -> None:
    res = paired_bootstrap(metric, PREDS_A, list(PREDS_A), REFS, n=200)
    assert (res.delta, res.mean, res.ci_low, res.ci_high) == (0.0, 0.0, 0.0, 0.0)
    assert res.p_value == 1.0


def test_bootstrap_fast_path_equals_slow_path() -> None:
    fast = paired_bootstrap(METRICS["bleu"], PREDS_A, PREDS_B, REFS, n=150, seed=3)
    slow = paired_bootstrap(bleu, PREDS_A, PREDS_B, REFS, n=150, seed=3)
    assert fast.delta == pytest.approx(slow.delta)
    assert fast.ci_low == pytest.approx(slow.ci_low)
    assert fast.ci_high == pytest.approx(slow.ci_high)
    assert fast.mean == pytest.approx(slow.mean)


def test_bootstrap_known_values_small_case() -> None:
    """Two examples, per-example ROUGE-1 known; each resample is one of 4 index pairs."""
    refs = ["a b", "c d"]
    a = ["a b", "x y"]  # per-example ROUGE-1: 100, 0
    b = ["a b", "c d"]  # 100, 100
    per_a = rouge_per_example(a, refs, ("rouge1",))["rouge1"]
    per_b = rouge_per_example(b, refs, ("rouge1",))["rouge1"]
    assert per_a.tolist() == [100.0, 0.0] and per_b.tolist() == [100.0, 100.0]
    res = paired_bootstrap(METRICS["rouge1"], a, b, refs, n=4000, seed=1)
    assert res.delta == pytest.approx(50.0)
    # Per-resample difference = 50 * (number of times index 1 is drawn) in {0, 50, 100}.
    assert res.mean == pytest.approx(50.0, abs=2.5)
    assert (res.ci_low, res.ci_high) == (0.0, 100.0)
    # Reproduce with the same generator directly.
    idx = np.random.default_rng(1).integers(0, 2, size=(4000, 2))
    deltas = per_b[idx].mean(1) - per_a[idx].mean(1)
    assert res.mean == pytest.approx(deltas.mean())
    assert res.p_value == pytest.approx(2 * np.mean(deltas <= 0))


def test_bootstrap_ci_contains_observed_and_detects_better_system() -> None:
    rng = random.Random(0)
    refs, a, b = [], [], []
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    for _ in range(60):
        ref = rng.sample(words, 6)
        refs.append(" ".join(ref))
        a.append(" ".join(w if rng.random() < 0.5 else rng.choice(words) for w in ref))
        b.append(" ".join(w if rng.random() < 0.8 else rng.choice(words) for w in ref))
    for metric in (METRICS["rouge1"], METRICS["rougeL"], METRICS["bleu"], METRICS["chrf"]):
        res = paired_bootstrap(metric, a, b, refs, n=500, seed=0)
        assert isinstance(res, BootstrapResult)
        assert res.delta == pytest.approx(metric(b, refs) - metric(a, refs))
        assert res.ci_low <= res.delta <= res.ci_high
        assert res.ci_low > 0 and res.p_value < 0.05, metric.name
        # Swapping the systems flips the sign.
        swapped = paired_bootstrap(metric, b, a, refs, n=500, seed=0)
        assert swapped.delta == pytest.approx(-res.delta)
        assert swapped.ci_high == pytest.approx(-res.ci_low)


def test_bootstrap_argument_checks() -> None:
    with pytest.raises(ValueError, match="n must be"):
        paired_bootstrap(bleu, PREDS_A, PREDS_B, REFS, n=0)
    with pytest.raises(ValueError, match="predictions but"):
        paired_bootstrap(bleu, PREDS_A[:2], PREDS_B, REFS)


# ----------------------------------------------------------------------------------------------
# likelihood metrics and diversity


def test_nll_and_perplexity_are_token_weighted() -> None:
    rows = [(3.0, 2), (1.0, 1), (8.0, 5)]  # (summed NLL, tokens)
    refs = ["x"] * 3
    assert get_metric("nll")(rows, refs) == pytest.approx(12 / 8)
    assert get_metric("perplexity")(rows, refs) == pytest.approx(np.exp(12 / 8))
    assert LOWER_IS_BETTER == {"nll", "perplexity"}
    b = paired_bootstrap(NLL, rows, [(2.0, 2), (1.0, 1), (4.0, 5)], refs, n=50)
    assert b.delta == pytest.approx(7 / 8 - 12 / 8)
    with pytest.raises(ValueError, match="summed NLL, token count"):
        NLL(["a prediction"], ["x"])


def test_diversity_by_hand() -> None:
    preds = ["a b c", "a b c", " a b c ", "a b d", "x"]
    d = diversity(preds)
    # distinct: {"a b c", "a b d", "x"} = 3 of 5; most frequent "a b c" 3 of 5
    assert (d.n, d.distinct, d.top_share) == (5, 3 / 5, 3 / 5)
    # bigrams: (a b)(b c) ×3, (a b)(b d): 8 in all, distinct {ab, bc, bd} = 3
    assert d.distinct_2 == pytest.approx(3 / 8)
    assert diversity(["one", "two"]).distinct_2 == 0.0  # no bigrams at all
    assert diversity(["same"] * 4).as_dict() == {"n": 4, "distinct": 0.25, "top_share": 1.0, "distinct_2": 0.0}
    with pytest.raises(ValueError, match="no predictions"):
        diversity([])


def test_diversity_below_reference() -> None:
    ref = Diversity(n=10, distinct=1.0, top_share=0.1, distinct_2=0.8)
    assert Diversity(10, 0.5, 0.2, 0.4).below(ref) is None  # exactly half is allowed
    reason = Diversity(10, 0.3, 0.7, 0.6).below(ref)
    assert reason == "less diverse than the reference: distinct 0.300 < 0.5 × 1.000"
    assert "distinct-2 0.100 < 0.5 × 0.800" in Diversity(10, 0.9, 0.1, 0.1).below(ref)
    with pytest.raises(ValueError, match="ratio must be in"):
        ref.below(ref, 0)
