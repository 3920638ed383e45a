"""docs/method.md §12: the "bias" unit of the stdev knob (τ_σ nats of spread of the score bias
B_n), its prior moments."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from cases import ROTARY, TINY
from stdev_unit import tokens_and_prior

import nvib
from nvib.core.layer import variance_scale
from nvib.core.prior import SiteStats

LLAMA = next(c for c in ROTARY if c.name == "llama")
SAVED = Path(__file__).parent / "fixtures" / "saved"


def direct_spread(z: torch.Tensor, sig2: torch.Tensor, nu: float) -> torch.Tensor:
    """Std_n of B_n = ½ Σ_d (1 − r_d) z_nd² / ν over tokens z [T, ..., D]."""
    return (0.5 * (1 - nu / (sig2 + nu)) / nu * z * z).sum(-1).std(0)


def synthetic(n: int = 40_000, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, SiteStats]:
    """Independent dimensions of very different scales (as key-norm gains make them), with means."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 3.0, dim, dtype=torch.float64)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64) * scale + 0.5
    return z, SiteStats.of(z, 1.0)


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_bias_unit_gives_the_asked_spread_on_independent_dimensions(tau):
    z, stats = synthetic()
    lam, clamped = variance_scale(stats.var, stats.sq_var, stats.log_alpha_std, 1.0, tau, "bias", "s")
    assert not bool(clamped) and float(stats.log_alpha_std) > tau
    assert float(direct_spread(z, lam * stats.var, 1.0)) == pytest.approx(tau, rel=0.03)


def test_lambda_is_monotone_and_clamped_at_the_largest_spread():
    _, stats = synthetic()
    spread = float(stats.log_alpha_std)
    taus = [0.1, 0.3, 1.0, 2.0, 0.5 * spread, 0.99 * spread]
    lams = [float(variance_scale(stats.var, stats.sq_var, stats.log_alpha_std, 1.0, t, "bias", "s")[0]) for t in taus]
    assert all(a < b for a, b in zip(lams, lams[1:], strict=False))
    for tau in (spread, 2 * spread):
        assert bool(variance_scale(stats.var, stats.sq_var, stats.log_alpha_std, 1.0, tau, "bias", "s")[1])
    prior_lam, _ = variance_scale(stats.var, stats.sq_var, stats.log_alpha_std, 1.0, 0.3, "prior", "s")
    assert float(prior_lam) == pytest.approx(0.09)


def test_higher_moments_merge_exactly():
    z, whole = synthetic(5000)
    merged = SiteStats.of(z[:1234], 1.0).merge(SiteStats.of(z[1234:3000], 1.0)).merge(SiteStats.of(z[3000:], 1.0))
    for name in ("m2", "m3", "m4"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=1e-9, atol=1e-9)
    direct = (z * z).var(0, unbiased=False)
    torch.testing.assert_close(whole.sq_var, direct, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", [TINY[0], LLAMA], ids=lambda c: c.name)
@pytest.mark.parametrize("unit", ["prior", "bias"])
def test_zero_stdev_is_the_identity_in_both_units(case, unit):
    torch.manual_seed(0)
    stock = case.build().eval()
    prior = nvib.EmpiricalPrior.estimate(stock, [case.inputs(seed=s) for s in (1, 2)], progress=False)
    nv = nvib.convert(copy.deepcopy(stock), nvib.NVConfig(stdev_unit=unit), prior=prior)
    inputs = case.inputs(seed=3)
    with torch.no_grad():
        ref, out = stock(**inputs).logits, nv(**inputs).logits
    valid = inputs.get("decoder_attention_mask", inputs["attention_mask"]).bool()
    assert float((out - ref)[valid].abs().max()) <= 1e-4


def _gained(case):
    """A tiny model whose attention inputs spread widely enough (ς > 1 nat) for τ_σ = 1 to be reachable: norm gains
    drawn from [0.2, 3.2] (as trained key norms are uneven), and larger key projections."""
    torch.manual_seed(0)
    model = case.build().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(0.2 + 3 * torch.rand(p.shape, generator=g))
            elif name.endswith("k_proj.weight"):
                p.mul_(8.0)
    return model


@pytest.mark.parametrize("case", [TINY[0], LLAMA], ids=lambda c: c.name)
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_bias_unit_spread_on_the_priors_own_tokens(case, tau):
    """The spread of B_n over the tokens the prior was estimated on is τ_σ; where it cannot be, a warning names
    the clamped mixtures (and the others still get τ_σ)."""
    model = _gained(case)
    data = [case.inputs(batch=3, src=12, seed=10 + i) for i in range(6)]
    prior, tokens = tokens_and_prior(model, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nv = nvib.convert(copy.deepcopy(model), nvib.NVConfig(**_all("stdev_tau", tau), stdev_unit="bias"), prior=prior)
    clamped = " ".join(str(w.message) for w in caught if "clamped" in str(w.message))
    checked = 0
    for name, layer in nvib.nv_layers(nv).items():
        z = tokens[name] if tokens[name].dim() == 3 else tokens[name][:, None]
        spread = direct_spread(z, layer.logvar_bias.detach().double().exp().reshape(z.shape[1:]), layer.noise)
        scale = prior.sites[name].log_alpha_std.reshape(-1).expand(z.shape[1])
        for g in range(z.shape[1]):
            if scale[g] * (1 - 1e-3) <= tau:
                assert name in clamped
                continue
            assert float(spread[g]) == pytest.approx(tau, rel=0.02), (name, g)  # the sample holds every token here
            checked += 1
    assert checked > 0


def _all(prefix: str, value: float) -> dict[str, float]:
    return {f"{prefix}_{s}": value for s in "ecd"}


def test_old_prior_with_bias_unit_is_one_line():
    model = nvib.load(SAVED / "llama")  # its prior was written before the higher moments existed
    with pytest.raises(ValueError, match=r"fourth moments.*Fix: estimate the prior again") as err:
        nvib.configure(model, nvib.NVConfig(stdev_tau_d=0.5))  # key space: "bias" by default
    assert "\n" not in str(err.value)
    nvib.configure(model, nvib.NVConfig(stdev_tau_d=0.5, stdev_unit="prior"))


def test_save_load_keeps_the_unit_and_the_moments(tmp_path):
    torch.manual_seed(0)
    stock = LLAMA.build().eval()
    prior = nvib.EmpiricalPrior.estimate(stock, [LLAMA.inputs(seed=s) for s in (1, 2)], progress=False)
    prior.save(tmp_path / "prior.safetensors")
    again = nvib.EmpiricalPrior.load(tmp_path / "prior.safetensors")
    for name, stats in prior.sites.items():
        assert torch.equal(again.sites[name].m4, stats.m4) and torch.equal(again.sites[name].m3, stats.m3)
    nv = nvib.convert(copy.deepcopy(stock), nvib.NVConfig(alpha_tau_d=0.0, stdev_tau_d=0.2), prior=prior)
    nvib.save(nv, tmp_path / "nv")
    loaded = nvib.load(tmp_path / "nv")
    assert json.loads((tmp_path / "nv" / "nv_config.json").read_text())["stdev_unit"] == "bias"  # key space's default
    inputs = LLAMA.inputs(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, nv(**inputs).logits, rtol=0, atol=1e-6)
    assert not math.isnan(float(nvib.nv_layers(loaded)["decoder.0"].prior_sq_var.sum()))
