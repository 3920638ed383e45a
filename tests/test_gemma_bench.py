"""What the Gemma benchmark (benchmarks/gemma) keeps of its own: the table's measures and the resumable state, and
that it is a client of the product (its prompt, scoring and search are nvib.workflow's, tested in test_prompting)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from nvib.workflow.prompting import draw_demonstrations

GEMMA = Path(__file__).parents[1] / "benchmarks" / "gemma"
sys.path.insert(0, str(GEMMA))
from measures import summarise  # noqa: E402


def gemma_experiment():
    """benchmarks/gemma/experiment.py under its own name: benchmarks/ood has an `experiment` module too."""
    if (module := sys.modules.get("gemma_experiment")) is None:
        spec = importlib.util.spec_from_file_location("gemma_experiment", GEMMA / "experiment.py")
        module = sys.modules["gemma_experiment"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_summary_is_token_weighted_with_diversity_and_paired_deltas():
    refs = ["a b c", "a b d", "x y"]
    base = {"preds": ["a b c", "a b c", "x y"], "nll": [[3.0, 1], [1.0, 3], [2.0, 2]]}
    other = {"preds": ["a b c", "a b d", "x y"], "nll": [[1.0, 1], [1.0, 3], [2.0, 2]]}
    b, o = summarise(base, None, refs), summarise(other, base, refs)
    assert b["nll"] == pytest.approx(1.0) and o["nll"] == pytest.approx(4 / 6)  # Σ nll / Σ tokens
    assert b["distinct"] == pytest.approx(2 / 3) and b["top_share"] == pytest.approx(2 / 3)
    assert b["distinct_2"] == pytest.approx(3 / 5)  # bigrams: ab bc ab bc xy
    assert o["delta_nll"] == pytest.approx(4 / 6 - 1.0) and o["delta_rougeL"] > 0
    assert o["ci_nll"][0] <= o["delta_nll"] <= o["ci_nll"][1]


def test_post_hoc_range_reuses_only_the_steps_that_do_not_depend_on_it(tmp_path):
    experiment = gemma_experiment()
    State, range_free = experiment.State, experiment.range_free

    base = State(tmp_path / "state.json", "base")
    for name in ("check stock", "prior", "check nv", "wiki/unconverted", "wiki/temperature", "wiki/target demos",
                 "wiki/NV tuned", "wiki/NV + target demos", "wiki/NV tuned, prior only"):  # fmt: skip
        base.get(name, lambda name=name: {"from": name}, "test")
    post = State(tmp_path / "state.json", "post")
    post.get("wiki/temperature", lambda: {"from": "post"}, "test")  # its own result wins
    post.inherit("base", range_free)
    assert post.data["wiki/temperature"] == {"from": "post"}
    assert {n for n in post.data if not n.startswith("_")} == {
        "check stock",
        "prior",
        "wiki/unconverted",
        "wiki/temperature",
        "wiki/target demos",
    }
    assert post.get("wiki/NV tuned", lambda: {"from": "post"}, "nv") == {"from": "post"}
    assert set(post.cost) >= {"prior", "wiki/unconverted", "wiki/NV tuned"}
    assert "check nv" not in post.data  # its regularised setting is read in the run's unit: recomputed


def test_the_benchmark_draws_the_demonstrations_of_its_recorded_runs() -> None:
    """The product's draw gives the demonstrations the stored runs list (benchmarks/runs/gemma-bias/results.json)."""
    experiment = gemma_experiment()
    data = Path(__file__).parents[1] / "benchmarks" / "data" / "build"
    if not (data / "manifest.json").is_file():
        pytest.skip("benchmark data not built (make benchmarks/data/build/manifest.json)")
    details = json.loads((GEMMA.parent / "runs" / "gemma-bias" / "results.json").read_text())["details"]
    for domain, recorded in details.items():
        pool = experiment.pairs(data / domain / "train.jsonl", experiment.POOL)
        ids = {id(e): i for i, e in pool}
        drawn = draw_demonstrations([e for _, e in pool], 3, 0, experiment.DEMO_WORDS)
        assert [ids[id(e)] for e in drawn] == recorded["demos"]


def test_demo_ends_with_a_verdict_read_from_the_intervals():
    from tables import verdict

    def entry(delta: float, lo: float, hi: float) -> dict:
        return {"delta_nll": delta, "ci_nll": [lo, hi]}

    rows = {"debian": {"NV tuned": entry(-0.01, -0.02, -0.001)}, "wiki": {"NV tuned": entry(0.002, -0.001, 0.004)}}
    against = {"debian": {"NV tuned": entry(0.003, 0.001, 0.005)}, "wiki": {"NV tuned": entry(-0.004, -0.006, -0.002)}}
    text = verdict(rows, against)
    assert "debian: NV tuned is better than the unconverted model (Δ NLL -0.0100 [-0.0200, -0.0010] nats/token)" in text
    assert "and worse than the attention temperature" in text
    assert "wiki: NV tuned is no different from the unconverted model" in text
    assert text.splitlines()[-1].startswith(
        "Verdict: tuned NV beat the unconverted model on 1 of 2 domains and the one-knob attention temperature "
        "on 1 of 2"
    )
