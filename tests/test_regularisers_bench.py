"""Issue 40's benchmark (benchmarks/ood/finetune_regularisers.py): its hierarchical bootstrap, and a `--quick` smoke run
of every stage and of `--score` on a tiny saved BERT2BERT and tiny JSONL splits."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from cases import MINILM

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "ood"))
import finetune_regularisers as bench  # noqa: E402

DEMO_DATA = Path(__import__("nvib").__file__).parent / "demo_data"


def scores(nll: list[float], tokens: list[int], rouge: list[float]) -> dict:
    return {"nll": nll, "tokens": tokens, "rougeL": rouge}


def test_bootstrap_is_token_weighted_paired_and_hierarchical():
    rng = np.random.default_rng(1)
    a, b = {}, {}
    for s in range(5):
        tokens = rng.integers(1, 20, 50).tolist()
        base = rng.normal(3, 1, 50) * tokens
        b[s] = scores(base.tolist(), tokens, rng.uniform(0, 50, 50).tolist())
        a[s] = scores((base - 0.1 * np.array(tokens)).tolist(), tokens, [r + 1 for r in b[s]["rougeL"]])
    result = bench.hierarchical_bootstrap(a, b, 200)
    # A is B minus 0.1 nats on every token: every resample gives exactly -0.1 (token-weighted, paired by example)
    assert result["nll"] == pytest.approx((-0.1, -0.1, -0.1), abs=1e-9)
    assert result["rougeL"] == pytest.approx((1.0, 1.0, 1.0), abs=1e-9)
    noisy = {s: scores((np.array(a[s]["nll"]) + rng.normal(0, 3, 50)).tolist(), a[s]["tokens"], a[s]["rougeL"])
             for s in a}  # fmt: skip
    mean, low, high = bench.hierarchical_bootstrap(noisy, b, 500)["nll"]
    per_seed = [sum(noisy[s]["nll"]) / sum(a[s]["tokens"]) - sum(b[s]["nll"]) / sum(b[s]["tokens"]) for s in a]
    assert mean == pytest.approx(np.mean(per_seed)) and low < mean < high


def test_pairs_cover_every_system_against_plain_and_kl_g_against_every_other():
    systems = ["plain", "kl_g", "l2sp", "feature_mean", "plain + T", "kl_g + T"]
    pairs = bench.pairs_of(systems)
    assert {(s, "plain") for s in systems[1:]} <= set(pairs)
    assert {("kl_g", s) for s in ("l2sp", "feature_mean", "plain + T", "kl_g + T")} <= set(pairs)


def test_quick_run_of_every_stage_and_score(tmp_path):
    torch.manual_seed(0)
    tokenizer = tf.AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    config = dict(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=128)  # fmt: skip
    model = tf.EncoderDecoderModel(
        encoder=tf.BertModel(tf.BertConfig(**config)),
        decoder=tf.BertLMHeadModel(tf.BertConfig(**config, is_decoder=True, add_cross_attention=True)),
    )
    for c in (model.config, model.generation_config):
        c.decoder_start_token_id, c.pad_token_id, c.eos_token_id = 101, 0, 102
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = tmp_path / "data"
    for domain in ("debian", "wiki"):
        (data / domain).mkdir(parents=True)
        for split in ("train", "dev", "test"):
            shutil.copy(DEMO_DATA / f"{split}.jsonl", data / domain / f"{split}.jsonl")
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\n## protocol: finetune regularisers (issue 40)\n\nfixed\n")
    common = ["--quick", "--base", str(base), "--data", str(data), "--models", str(tmp_path / "models"),
              "--domains", "debian", "wiki", "--results", str(results), "--threads", "1"]  # fmt: skip
    bench.main(["--stage", "select", *common])
    root = tmp_path / "models" / "issue40" / "quick"
    selection = json.loads((root / "selection.json").read_text())
    assert set(selection["chosen"]) == {"kl_g", "l2sp", "feature_mean"}
    assert (root / "kl_g-0.01-seed0" / "nv_config.json").exists() and (root / "plain-seed0" / "config.json").exists()
    assert not list(root.glob("*/test.json"))  # seed 0 is for selection only
    bench.main(["--stage", "test", "--seeds", "4", "--systems", "plain", "l2sp", *common])  # a share of the stage
    assert (root / "plain-seed4" / "test.json").exists() and (root / "l2sp-0.1-seed4" / "test.json").exists()
    assert not (root / "plain-seed3").exists() and not (root / "kl_g-0.01-seed4").exists()
    bench.main(["--stage", "test", *common])
    test = json.loads((root / "l2sp-0.1-seed4" / "test.json").read_text())
    assert len(test["scores"]["wiki"]["nll"]) == 8 and set(test["temperature"]) == {"debian", "wiki"}
    bench.main(["--stage", "table", *common])
    text = results.read_text()
    assert "## protocol: finetune regularisers (issue 40)\n\nfixed\n" in text
    section = text[text.index("## finetune regularisers") :]
    assert "**Criterion (protocol).**" in section and "| KL_G only | L2-SP |" in section
    assert "| feature mean + T |" in section
    bench.main(["--score", str(DEMO_DATA / "ood.jsonl"), *common])
    scored = json.loads((root / "scores-ood.json").read_text())
    assert len(scored["models"]) == 4 + 8 and all(np.isfinite(m["nll"]) for m in scored["models"].values())
