"""NVConfig() is the pretrained model exactly, whatever the prior (issue 21): τ_α = +∞ removes the prior component."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import transformers as tf
from cases import ROTARY, TINY, Case
from test_equivalence import generate, output
from test_prior import batches

import nvib
from nvib.workflow.search import best_knobs, equivalence_point, knobs_of, run_search


def gemma3_with_gains() -> torch.nn.Module:
    """The issue's config: hidden 64, 2 layers, 4 heads, 2 KV heads, head size 16, norm gains from U[0.5, 1.5]."""
    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, query_pre_attn_scalar=16, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = tf.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's RMSNorm multiplies by 1 + weight
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) - 1)
    return model


GEMMA3 = Case("gemma3-gains", gemma3_with_gains, "lm", 96)


def random_prior(model: torch.nn.Module, case: Case) -> nvib.EmpiricalPrior:
    """From three random batches of 4 × 24 tokens (the issue's recipe)."""
    data = [case.inputs(batch=4, src=24, tgt=24, seed=10 + i) for i in range(3)]
    return nvib.EmpiricalPrior.estimate(model, data, progress=False)


def test_default_is_the_pretrained_model_on_the_issue_gemma3_config() -> None:
    stock = GEMMA3.build()
    prior = random_prior(stock, GEMMA3)
    inputs = GEMMA3.inputs()
    valid = inputs["attention_mask"].bool()
    ref = output(stock, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about at the default
        nv = nvib.convert(copy.deepcopy(stock), nvib.NVConfig(), prior=prior)
    assert (output(nv, inputs) - ref)[valid].abs().max() <= 1e-4
    stock.generation_config.pad_token_id = nv.generation_config.pad_token_id = GEMMA3.pad
    assert torch.equal(generate(nv, inputs), generate(stock, inputs))
    # a finite τ_α that leaves the prior a visible weight says so, and is not the pretrained model
    with pytest.warns(UserWarning, match="finite alpha_tau .* visible weight"):
        finite = nvib.convert(copy.deepcopy(stock), nvib.NVConfig(alpha_tau_d=3.0), prior=prior)
    assert (output(finite, inputs) - ref)[valid].abs().max() > 1e-3


@pytest.mark.parametrize("case", TINY + ROTARY, ids=lambda c: c.name)
def test_default_is_the_pretrained_model_with_an_estimated_prior(case: Case) -> None:
    torch.manual_seed(0)
    stock = case.build().eval()
    prior = nvib.EmpiricalPrior.estimate(stock, batches(case, 2), progress=False)
    inputs = case.inputs()
    valid = inputs.get("decoder_attention_mask", inputs["attention_mask"]).bool()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nv = nvib.convert(copy.deepcopy(stock), prior=prior)
    assert all(layer.prior_weight() == 0.0 for layer in nvib.nv_layers(nv).values())
    assert (output(nv, inputs) - output(stock, inputs))[valid].abs().max() <= 1e-4
    if case.kind != "encoder":
        if case.kind == "lm":
            stock.generation_config.pad_token_id = nv.generation_config.pad_token_id = case.pad
        assert torch.equal(generate(nv, inputs), generate(stock, inputs))


def test_infinite_alpha_tau_trains_without_the_prior_and_round_trips(tmp_path) -> None:
    """Training mode at τ_α = +∞: finite loss, KL and gradients (the prior's gate is finite, so no 0·∞)."""
    stock = GEMMA3.build()
    nv = nvib.convert(copy.deepcopy(stock), prior=random_prior(stock, GEMMA3)).train()
    inputs = GEMMA3.inputs()
    loss = nv(**inputs, labels=inputs["input_ids"]).loss + nvib.kl_loss(nv)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in nv.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    config = nvib.NVConfig()
    config.save(tmp_path / "knobs.json")
    assert nvib.NVConfig.load(tmp_path / "knobs.json") == config and config.alpha_tau_d == math.inf
    with pytest.raises(ValueError, match="alpha_tau may be inf"):
        nvib.NVConfig(alpha_tau_d=-math.inf)
    with pytest.raises(ValueError, match="must be finite"):
        nvib.NVConfig(stdev_tau_d=math.inf)


def test_search_identity_point_is_infinite_alpha_tau() -> None:
    """The study stores the identity as alpha_tau = 10 (Optuna's ranges are finite); the objective and best_knobs
    read it as +∞, any other value as itself."""
    assert knobs_of({"alpha_tau_d": 10.0, "stdev_tau_d": 0.0, "alpha_tau_e": 9.5}) == {
        "alpha_tau_d": math.inf, "stdev_tau_d": 0.0, "alpha_tau_e": 9.5,
    }  # fmt: skip
    seen = []

    def objective(knobs: dict, n: int) -> float:
        seen.append(knobs)
        return 1.0 if knobs["alpha_tau_d"] == math.inf else 0.0

    study = run_search(objective, {"decoder"}, n_trials=3, storage=None, study_name="s", slices=[1], progress=False)
    assert study.trials[0].params == equivalence_point({"decoder"})
    assert seen[0]["alpha_tau_d"] == math.inf
    assert best_knobs(study)["alpha_tau_d"] == math.inf
