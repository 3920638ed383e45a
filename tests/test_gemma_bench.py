"""The Gemma benchmark's prefix-shared scoring (benchmarks/gemma) on a tiny random Gemma 3, stock and NV."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

import nvib

GEMMA = Path(__file__).parents[1] / "benchmarks" / "gemma"
sys.path.insert(0, str(GEMMA))
from engine import PrefixRunner, check_sharing, greedy_unshared  # noqa: E402
from measures import summarise  # noqa: E402
from prompts import Encoded  # noqa: E402

NEWLINE = 5


def gemma_experiment():
    """benchmarks/gemma/experiment.py under its own name: benchmarks/ood has an `experiment` module too."""
    if (module := sys.modules.get("gemma_experiment")) is None:
        spec = importlib.util.spec_from_file_location("gemma_experiment", GEMMA / "experiment.py")
        module = sys.modules["gemma_experiment"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


class StubTokenizer:
    """What the engine needs of a tokenizer: the pad id and decoding (token 5 is a newline)."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join("\n" if i == NEWLINE else f"t{i}" for i in ids)


def tiny_gemma3() -> tf.Gemma3ForCausalLM:
    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, sliding_window=64, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )  # fmt: skip
    return tf.Gemma3ForCausalLM(cfg).eval()


def items(n: int, seed: int = 1) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):  # different suffix and target lengths, so rows are padded
        suffix = torch.randint(6, 96, (3 + 2 * i,), generator=g).tolist()
        target = torch.randint(6, 96, (1 + i % 3,), generator=g).tolist()
        out.append(Encoded(suffix, target, ""))
    return out


def runner(model) -> PrefixRunner:
    stop = [False] * 96
    stop[NEWLINE] = stop[2] = True
    return PrefixRunner(model, StubTokenizer(), [1, 7, 8, 9, 10, 11, 12], stop)


def test_shared_prefix_matches_unshared_stock():
    result = check_sharing(runner(tiny_gemma3()), items(4), tol=1e-5, max_new_tokens=6)
    assert result["greedy_identical"] and result["nll_gap"] < 1e-5 and result["evaluate_nll_gap"] < 1e-5


def test_shared_prefix_matches_unshared_nv_and_identity_is_stock():
    model = tiny_gemma3()
    r, xs = runner(model), items(4)
    stock = r.nll(xs)
    batch = {"input_ids": torch.randint(6, 96, (4, 20)), "attention_mask": torch.ones(4, 20, dtype=torch.long)}
    prior = nvib.EmpiricalPrior.estimate(model, [batch], progress=False)
    nvib.convert(model, prior=prior)
    r.reset()
    at_identity = r.nll(xs)
    assert max(abs(a.nll - b.nll) for a, b in zip(stock, at_identity, strict=True)) < 1e-4
    nvib.configure(model, nvib.NVConfig(alpha_tau_d=-1.0, stdev_tau_d=0.5))
    r.reset()
    regularised = r.nll(xs)
    assert max(abs(a.nll - b.nll) for a, b in zip(stock, regularised, strict=True)) > 1e-3  # the knobs act
    check_sharing(r, xs, tol=1e-5, max_new_tokens=6)


def test_knob_change_needs_reset():
    """The prefix cache belongs to one model setting: without `reset` the old prefix keys are reused."""
    model = tiny_gemma3()
    r, xs = runner(model), items(2)
    before = r.nll(xs)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(2.0)  # (k_proj would be undone by the key norm)
    stale, _ = r.nll(xs), r.reset()
    fresh = r.nll(xs)
    assert stale[0].nll != pytest.approx(fresh[0].nll) and fresh[0].nll != pytest.approx(before[0].nll)
    assert greedy_unshared(r, xs[0], 4) == r.evaluate(xs[:1], 4)[1][0]


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
