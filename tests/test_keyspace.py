"""Rotary decoder-only models in key space (docs/method.md §10, §11): the common tester, the §10 reference, training."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from cases import ROTARY, Case
from test_equivalence import REGULARISED, check_caches, check_case, generate, output, pair

import nvib
from nvib.core import keyspace
from nvib.core.masks import key_mask


def prior_for(model, case: Case, n: int = 3) -> nvib.EmpiricalPrior:
    data = [case.inputs(batch=3, src=9 + i, seed=10 + i) for i in range(n)]
    return nvib.EmpiricalPrior.estimate(model, data, progress=False)


@pytest.mark.parametrize("case", ROTARY, ids=lambda c: c.name)
def test_equivalence_cache_and_beams(case: Case):
    """Default NVConfig: the pretrained logits to 1e-4; greedy and 4 beams identical with and without the cache."""
    stock, nv, inputs, ref = check_case(case)
    nvib.unload(nv)
    assert torch.equal(output(nv, inputs), ref)
    with_prior = nvib.convert(copy.deepcopy(stock), prior=prior_for(stock, case))
    assert (output(with_prior, inputs) - ref)[inputs["attention_mask"].bool()].abs().max() <= 1e-4


@pytest.mark.parametrize("case", ROTARY, ids=lambda c: c.name)
def test_regularised_cache_matches_no_cache(case: Case):
    stock, _ = pair(case)
    nv = nvib.convert(copy.deepcopy(stock), REGULARISED, prior=prior_for(stock, case))
    inputs = case.inputs()
    assert not torch.allclose(output(nv, inputs), output(stock, inputs), atol=1e-3)
    check_caches(case, nv, inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case", [c for c in ROTARY if c.name in ("llama", "gemma2", "gemma3_text")], ids=lambda c: c.name
)
def test_half_precision_finite(case: Case, dtype):
    stock, nv = pair(case, dtype)
    inputs = case.inputs()
    for config in (nvib.NVConfig(), REGULARISED):
        nvib.configure(nv, config)
        assert output(nv, inputs).dtype == dtype and torch.isfinite(output(nv, inputs)).all()
        assert torch.isfinite(generate(nv, inputs, pad_token_id=0).float()).all()


def reference(q, k_rot, mu, v, allowed, layer, scaling) -> torch.Tensor:
    """docs/method.md §10 written out, float64: q [B, Hq, Q, E], rotated keys and values [B, G, N, E], means μ_n = k_n
    [B, G, N, E], allowed [B, 1, Q, N] -> [B, Hq, Q, E]."""
    noise, G = layer.noise, layer.heads
    beta = layer.logvar_bias.exp() + noise  # [G, E]
    m0, beta0 = layer.prior_mean, layer.prior_var + noise
    log_alpha = (mu * mu).sum(-1) / (2 * noise) + layer.alpha_bias[:, None]
    c = log_alpha - 0.5 * (mu * mu / beta[:, None]).sum(-1) - 0.5 * beta.log().sum(-1)[:, None]
    c0 = layer.prior_log_alpha - 0.5 * (m0 * m0 / beta0).sum(-1) - 0.5 * beta0.log().sum(-1)
    k_tilde = noise * k_rot / beta[:, None]
    k0 = noise * m0 / beta0
    out = torch.empty_like(q)
    for h in range(q.shape[1]):
        g = h // (q.shape[1] // G)
        tokens = scaling * q[:, h] @ k_tilde[:, g].transpose(-1, -2) + c[:, g, None, :]  # [B, Q, N]
        if allowed is not None:
            tokens = tokens.masked_fill(~allowed[:, 0], float("-inf"))
        prior = scaling * q[:, h] @ k0[g] + c0[g]  # [B, Q]
        a = torch.cat([prior[..., None], tokens], -1).softmax(-1)
        out[:, h] = a[..., :1] * layer.prior_value[g] + a[..., 1:] @ v[:, g]
    return out


@pytest.mark.parametrize(
    "case", [c for c in ROTARY if c.name in ("llama", "qwen3", "gemma3_text")], ids=lambda c: c.name
)
@pytest.mark.parametrize("split", [True, False], ids=["prior-merged", "prior-prepended"])
def test_fast_form_equals_the_spec_10_reference(case: Case, split: bool, monkeypatch):
    """The implementation (query-side √E/β, c_n from rotated keys, bias in the mask) is §10 to 1e-10 in float64."""
    stock, _ = pair(case, torch.float64)
    nv = nvib.convert(copy.deepcopy(stock), prior=prior_for(stock, case))
    g = torch.Generator().manual_seed(3)
    for layer in nvib.nv_layers(nv).values():  # a prior far from the data: every term matters
        G, E = layer.heads, layer.head_dim
        var = torch.rand(G, E, generator=g, dtype=torch.float64) + 0.5
        layer.set_prior(torch.randn(G, E, generator=g), var, torch.rand(G) * 3, torch.rand(G) + 1, torch.randn(G, E))
    nvib.configure(nv, nvib.NVConfig(alpha_tau_d=-1.0, stdev_tau_d=0.7, stdev_unit="prior"))
    monkeypatch.setattr(nvib.core.masks, "SPLIT_PRIOR", split)
    calls, unrotated = [], []
    original = keyspace.nv_key_attention

    def spy(module, query, key, value, attention_mask, **kw):
        out = original(module, query, key, value, attention_mask, **kw)
        calls.append((module, query, key, value, attention_mask, out[0]))
        return out

    monkeypatch.setitem(tf.AttentionInterface._global_mapping, keyspace.ATTN_NAME, spy)
    for site in nv.__dict__["_nv_sites"]:
        source = getattr(site.module, site.arch.key_source)
        source.register_forward_hook(lambda m, a, out: unrotated.append(out))
    inputs = case.inputs()
    output(nv, inputs)
    assert len(calls) == len(unrotated) == nv.config.num_hidden_layers
    for (module, q, k, v, mask, out), k_unrot in zip(calls, unrotated, strict=True):
        slot = module._nv_slot
        if slot.key_layout == "heads_first":
            k_unrot = k_unrot.transpose(1, 2)
        k_unrot = k_unrot.reshape(*k_unrot.shape[:2], slot.layer.heads, slot.head_dim)
        allowed = key_mask(mask, q.shape[0], q.shape[2], k.shape[2], True, q.device)
        expected = reference(q, k, k_unrot.transpose(1, 2), v, allowed, slot.layer, slot.scaling).transpose(1, 2)
        # c_n from the rotated keys: exact for an orthogonal R_n; the models' rotations use float32 cos/sin
        assert (out - expected).abs().max() <= 1e-7
        rotation_exact = reference(q, k, k, v, allowed, slot.layer, slot.scaling).transpose(1, 2)
        assert (out - rotation_exact).abs().max() <= 1e-10


def test_prior_statistics_per_key_value_head():
    """The key-space prior is the direct per-head statistics of the unrotated keys and of the values
    (docs/method.md §10)."""
    case = ROTARY[3]  # qwen3: the key norm's output is the unrotated key
    stock, _ = pair(case)
    data = [case.inputs(batch=3, src=9 + i, seed=i) for i in range(3)]
    keys, values = [], []
    attn = stock.model.layers[1].self_attn
    attn.k_norm.register_forward_hook(lambda m, a, out: keys.append(out))
    attn.v_proj.register_forward_hook(lambda m, a, out: values.append(out))
    prior = nvib.EmpiricalPrior.estimate(stock, data, progress=False)
    k = torch.cat([kk[b["attention_mask"].bool()] for kk, b in zip(keys, data, strict=True)]).double()  # [T, G, E]
    v = torch.cat([vv[b["attention_mask"].bool()] for vv, b in zip(values, data, strict=True)]).double()
    s = prior.sites["decoder.1"]
    r = (k * k).sum(-1) / (2 * attn.head_dim**0.5)
    assert s.count == k.shape[0] and s.mean.shape == (2, 8)
    assert torch.allclose(s.mean, k.mean(0), atol=1e-12) and torch.allclose(s.var, k.var(0), atol=1e-12)
    assert torch.allclose(s.value_mean, v.reshape(-1, 2, 8).mean(0), atol=1e-12)
    assert torch.allclose(s.log_alpha_mean, r.mean(0), atol=1e-12) and torch.allclose(s.log_alpha_std, r.std(0))
    layer = nvib.nv_layers(nvib.convert(copy.deepcopy(stock), prior=prior))["decoder.1"]
    pairs = s.var.reshape(2, 2, 4).mean(1).float()  # s_0² averaged over each rotary pair (i, i + E/2)
    assert torch.allclose(layer.prior_var, torch.cat([pairs, pairs], -1))


def test_alpha_tau_is_centred_and_moves_prior_mass_monotonically():
    """docs/method.md §11: τ_α = 0 gives the prior about an average token's weight; the mass rises as τ_α falls."""
    case = ROTARY[0]
    stock, _ = pair(case)
    nv = nvib.convert(copy.deepcopy(stock), prior=prior_for(stock, case))
    inputs = case.inputs()
    masses = []
    for tau in (10, 3, 0, -3, -10):
        nvib.configure(nv, nvib.NVConfig(alpha_tau_d=tau))
        if tau == 0:  # b_α = δ_0: the prior scores like an average in-domain token at every site
            assert all(abs(layer.prior_weight() - 1) < 1e-9 for layer in nvib.nv_layers(nv).values())
        with nvib.record_prior_mass(nv) as mass:
            output(nv, inputs)
        masses.append(mass["decoder"])
    assert masses == sorted(masses) and masses[0] < 1e-4 and masses[-1] > 0.99


def test_training_kl_and_gradients():
    case = ROTARY[5]  # gemma3_text: key norm, sliding window, GQA
    stock, _ = pair(case)
    nv = nvib.convert(copy.deepcopy(stock), REGULARISED, prior=prior_for(stock, case))
    nv.train()
    inputs = case.inputs()
    out = nv(**inputs, labels=inputs["input_ids"], use_cache=False)
    terms = nvib.kl_terms(nv)
    assert set(terms) == set(nvib.nv_layers(nv))
    assert all(torch.isfinite(g) and g > 0 and torch.isfinite(d) for g, d in terms.values())
    (out.loss + nvib.kl_loss(nv, 0.1, 0.1)).backward()
    for name, param in nv.nvib_layers.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_kl_gaussian_in_key_space_matches_direct():
    """At τ_σ = 0.3 the key-space KL_G of one sequence equals the docs/method.md §8 formula written out per head."""
    case = ROTARY[0]
    stock, _ = pair(case, torch.float64)
    nv = nvib.convert(
        copy.deepcopy(stock), nvib.NVConfig(alpha_tau_d=0.0, stdev_tau_d=0.3), prior=prior_for(stock, case)
    )
    nv.train()
    inputs = {k: v[:1] for k, v in case.inputs().items()}  # one unpadded sequence
    keys = []
    nv.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.append(out))
    nv(**inputs, use_cache=False)
    layer = nvib.nv_layers(nv)["decoder.0"]
    mu = keys[0][0].reshape(-1, layer.heads, layer.head_dim).transpose(0, 1)  # [G, N, E]
    var, s0sq, m0 = layer.logvar_bias.exp(), layer.prior_var, layer.prior_mean
    log_alpha = torch.cat(
        [layer.prior_log_alpha[:, None], (mu * mu).sum(-1) / (2 * layer.noise) + layer.alpha_bias[:, None]], 1
    )
    weights = log_alpha.softmax(1)[:, 1:]
    per_token = 0.5 * (
        var[:, None] / s0sq[:, None] + (mu - m0[:, None]) ** 2 / s0sq[:, None] - 1 - (var / s0sq).log()[:, None]
    )
    expected = (weights * per_token.mean(-1)).sum(-1).mean()
    assert torch.allclose(layer.kl_gaussian, expected, rtol=1e-10)


def test_save_load_unload(tmp_path):
    case = ROTARY[5]
    stock, _ = pair(case)
    nv = nvib.convert(copy.deepcopy(stock), REGULARISED, prior=prior_for(stock, case))
    inputs = case.inputs()
    expected = output(nv, inputs)
    nvib.save(nv, tmp_path / "m")
    loaded = nvib.load(tmp_path / "m")
    assert torch.equal(output(loaded, inputs), expected)
    assert torch.equal(output(nvib.unload(loaded), inputs), output(stock, inputs))


def test_errors():
    stock, nv = pair(ROTARY[0])
    other = ROTARY[3].build()
    with pytest.raises(nvib.PriorMismatchError, match="estimate a prior on this model"):
        nvib.convert(copy.deepcopy(stock), prior=prior_for(other, ROTARY[3]))  # same sizes, another model
    with pytest.raises(ValueError, match="mu_tau"):
        nvib.configure(nv, nvib.NVConfig(mu_tau=0.5))
    with pytest.raises(ValueError, match="per-token variances"):
        nvib.enable_per_token_variance(nv)
    phi3 = tf.Phi3ForCausalLM(
        tf.Phi3Config(
            vocab_size=96,
            pad_token_id=0,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
        )
    )
    with pytest.raises(nvib.UnsupportedModelError, match="fused module \\('qkv_proj'\\)"):
        nvib.convert(phi3)


def test_equivalence_warning_reports_visible_prior():
    """At alpha_scale_min = 0 and a prior whose keys barely vary, τ_α = 10 cannot hide the prior: convert says so."""
    case = ROTARY[0]
    stock, _ = pair(case)
    prior = prior_for(stock, case)
    for s in prior.sites.values():
        s.norm_m2.mul_(1e-8)
    with pytest.warns(UserWarning, match="visible weight"):
        nvib.convert(copy.deepcopy(stock), nvib.NVConfig(alpha_scale_min=0.0, alpha_tau_d=10.0), prior=prior)
