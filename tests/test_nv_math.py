"""NV attention against the reference form (docs/method.md §4), KL terms against closed forms (docs/method.md
§8), training pieces."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from cases import ROTARY, TINY
from test_equivalence import REGULARISED, pair

import nvib
import nvib.core.attention
import nvib.core.masks
from nvib.core.kl import kl_dirichlet, kl_gaussian
from nvib.core.layer import sample_log_gamma


def reference_attention(x, z, allowed, module, layer, per_token_var=None):
    """docs/method.md §4 literally, one head at a time, float64: lift each query into P-space.

    x [M, P] queries' inputs, z [N, P] keys' inputs, allowed [N] bool; returns the module output [M, P].
    """
    H, E = module.num_heads, module._nv_slot.head_dim
    noise = layer.noise
    mu = layer.mu_scale * z + layer.mu_bias
    var = layer.logvar_bias.exp().expand_as(mu) if per_token_var is None else per_token_var
    log_alpha = z @ layer.alpha_w1 + (z * z) @ layer.alpha_w2 + layer.alpha_bias
    mus = torch.cat([layer.prior_mean[None], mu])
    vars_ = torch.cat([layer.prior_var[None], var])
    las = torch.cat([layer.prior_log_alpha[None], log_alpha])
    keep = torch.cat([torch.ones(1, dtype=torch.bool), allowed])
    beta = vars_ + noise
    q = x @ module.q_proj.weight.T + module.q_proj.bias
    heads = []
    for h in range(H):
        rows = slice(h * E, (h + 1) * E)
        wk, bk = module.k_proj.weight[rows], module.k_proj.bias[rows]
        wv, bv = module.v_proj.weight[rows], module.v_proj.bias[rows]
        qh = q[:, rows]
        u = qh @ wk
        s = (
            u @ (mus / beta).T
            + (qh @ bk / noise)[:, None]
            + las
            - 0.5 * (mus**2 / beta).sum(-1)
            - 0.5 * beta.log().sum(-1)
        )
        a = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
        o = (a @ (vars_ / beta)) * u + a @ (noise * mus / beta)
        heads.append(o @ wv.T + bv)
    return torch.cat(heads, -1) @ module.out_proj.weight.T + module.out_proj.bias


def randomise(layer, generator):
    with torch.no_grad():
        P = layer.dim
        layer.mu_scale.fill_(0.7)
        layer.mu_bias.copy_(0.3 * torch.randn(P, generator=generator))
        layer.logvar_bias.copy_(torch.randn(P, generator=generator) - 1)
        layer.alpha_w1.copy_(0.1 * torch.randn(P, generator=generator))
        layer.alpha_w2.copy_(0.05 * torch.randn(P, generator=generator))
        layer.alpha_bias.fill_(0.5)
        layer.gate_prior(0.0)  # the prior in play (NVConfig() removes it: τ_α = +∞)
        layer.set_prior(0.2 * torch.randn(P, generator=generator), torch.rand(P, generator=generator) + 0.5, 1.0, 2.0)


@pytest.mark.parametrize("split", [True, False], ids=["split-prior", "prepended-prior"])
@pytest.mark.parametrize("site", ["encoder.0", "decoder.1", "cross"])
def test_fast_form_equals_reference(site, split, monkeypatch):
    """Both ways of attending to the prior (merged by log-sum-exp, or prepended to the keys) are docs/method.md §4."""
    monkeypatch.setattr(nvib.core.masks, "SPLIT_PRIOR", split)
    g = torch.Generator().manual_seed(0)
    _, nv = pair(TINY[0], torch.float64)
    layer = nvib.nv_layers(nv)[site]
    randomise(layer, g)
    module = next(s.module for s in nv.__dict__["_nv_sites"] if s.name == site)
    x = torch.randn(2, 5, 32, generator=g, dtype=torch.float64) * 2
    z = torch.randn(2, 7, 32, generator=g, dtype=torch.float64) * 2
    allowed = torch.ones(2, 7, dtype=torch.bool)
    allowed[1, 4:] = False
    mask = allowed[:, None, None, :].expand(2, 1, 5, 7).clone()
    if site == "cross":
        mask[1, :, 2] = False  # a query that sees no token: all its weight goes to the prior
    with torch.no_grad():
        kv = {"key_value_states": z} if site == "cross" else {}
        if site == "cross":
            out, _ = module(x, attention_mask=mask, **kv)
        else:  # self-attention: queries and keys from the same sequence
            x = z
            out, _ = module(x, attention_mask=allowed[:, None, None, :].expand(2, 1, 7, 7))
        for b in range(2):
            ref = reference_attention(x[b], z[b], allowed[b], module, layer)
            if site == "cross" and b == 1:
                ref[2] = reference_attention(x[b, 2:3], z[b], torch.zeros(7, dtype=torch.bool), module, layer)[0]
            assert (out[b] - ref).abs().max() <= 1e-10


def test_split_bias_made_once_per_forward_and_never_from_a_refilled_mask(monkeypatch):
    """The split path turns the mask `nv_mask` made for a forward into its additive bias once, not in every layer;
    a caller's own mask tensor, refilled in place between calls (in inference mode no version is counted), is read
    again each call."""
    g = torch.Generator().manual_seed(0)
    _, nv = pair(TINY[0])
    nvib.configure(nv, REGULARISED)
    module = next(s.module for s in nv.__dict__["_nv_sites"] if s.name == "encoder.0")
    x = torch.randn(2, 7, 32, generator=g)
    buffer = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    calls = []
    key_mask = nvib.core.masks.key_mask
    monkeypatch.setattr(nvib.core.masks, "key_mask", lambda *a: calls.append(1) or key_mask(*a))
    with torch.inference_mode():
        ids = torch.randint(4, 90, (2, 9), generator=g)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0
        nv(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5])
        assert 0 < len(calls) <= 3 < len(nv.__dict__["_nv_sites"])  # encoder, decoder and cross masks
        first = module(x, attention_mask=buffer)[0]
        buffer[1, ..., 4:] = False
        refilled = module(x, attention_mask=buffer)[0]
        fresh = module(x, attention_mask=buffer.clone())[0]
    assert torch.equal(refilled, fresh)
    assert not torch.allclose(first[1], refilled[1])


@pytest.mark.parametrize("case", [TINY[0], next(c for c in ROTARY if c.name == "llama")], ids=lambda c: c.name)
def test_eval_mode_gradients(case, monkeypatch):
    """Gradients through evaluation-time NV attention (z-space and key space, float64) are those of the prepended
    prior, also with the NV layers frozen: the CPU kernel that merges the prior after the tokens drops the gradient
    of its log-sum-exp, through which a_m0 depends on q and k. In BART they also match central differences (the
    rotary models' float32 norms make differences too noisy there)."""
    stock, _ = pair(case, torch.float64)
    nv = nvib.configure(nvib.convert(copy.deepcopy(stock)), REGULARISED)
    inputs = case.inputs()
    weight = next(p for n, p in nv.named_parameters() if "layers.0.self_attn.k_proj.weight" in n)

    def loss() -> torch.Tensor:
        return nv(**inputs).logits.pow(2).mean()

    def gradient(param: torch.Tensor, split: bool) -> torch.Tensor:
        monkeypatch.setattr(nvib.core.masks, "SPLIT_PRIOR", split)
        nv.zero_grad()
        loss().backward()
        return param.grad.clone()

    for layer in nvib.nv_layers(nv).values():
        layer.requires_grad_(False)
    assert torch.allclose(gradient(weight, True), gradient(weight, False), rtol=1e-9, atol=0)
    if case.kind == "lm":
        return
    for layer in nvib.nv_layers(nv).values():
        layer.requires_grad_(True)
    for param in (next(iter(nvib.nv_layers(nv).values())).logvar_bias, weight):
        full = gradient(param, True).view(-1)
        i = int(full.abs().argmax())  # the best-conditioned entry: tiny gradients drown in the loss's round-off
        grad = float(full[i])
        h = 1e-4  # the loss's float64 round-off is ~1e-3 of a difference quotient at h = 1e-6; h² terms are smaller
        with torch.no_grad():
            entry = param.view(-1)[i : i + 1]
            entry += h
            up = float(loss())
            entry -= 2 * h
            down = float(loss())
            entry += h
        assert grad == pytest.approx((up - down) / (2 * h), rel=1e-5)


@pytest.mark.parametrize("chunk", [None, 1], ids=["heads-at-once", "head-by-head"])
@pytest.mark.parametrize("site", ["encoder.0", "decoder.1", "cross"])
def test_general_form_equals_reference(site, chunk, monkeypatch):
    """Per-token variances (W_σ ≠ 0): the module output is docs/method.md §4 computed literally (heads in one group or
    one at a time, as for long inputs)."""
    if chunk is not None:
        monkeypatch.setattr(nvib.core.attention, "GENERAL_CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    nv = nvib.convert(TINY[0].build().eval().double(), per_token_variance=True)
    layer = nvib.nv_layers(nv)[site]
    randomise(layer, g)
    with torch.no_grad():
        layer.logvar_weight.copy_(0.2 * torch.randn(layer.logvar_weight.shape, generator=g, dtype=torch.float64))
    module = next(s.module for s in nv.__dict__["_nv_sites"] if s.name == site)
    z = torch.randn(2, 7, 32, generator=g, dtype=torch.float64) * 2
    x = torch.randn(2, 5, 32, generator=g, dtype=torch.float64) * 2 if site == "cross" else z
    allowed = torch.ones(2, 7, dtype=torch.bool)
    allowed[1, 4:] = False
    var = (z @ layer.logvar_weight.T + layer.logvar_bias).exp().detach()
    assert var.log().std(1).min() > 0.5  # the variances really differ per token
    with torch.no_grad():
        mask = allowed[:, None, None, :].expand(2, 1, x.shape[1], 7)
        out, _ = module(x, attention_mask=mask, **({"key_value_states": z} if site == "cross" else {}))
        for b in range(2):
            ref = reference_attention(x[b], z[b], allowed[b], module, layer, var[b])
            assert (out[b] - ref).abs().max() <= 1e-10


def test_reference_with_equal_per_token_variances_is_the_shared_form():
    """The reference form's per-token variances, all equal, reduce to the shared-variance fast form."""
    g = torch.Generator().manual_seed(1)
    _, nv = pair(TINY[0], torch.float64)
    layer = nvib.nv_layers(nv)["encoder.0"]
    randomise(layer, g)
    module = nv.model.encoder.layers[0].self_attn
    z = torch.randn(6, 32, generator=g, dtype=torch.float64)
    allowed = torch.ones(6, dtype=torch.bool)
    with torch.no_grad():
        shared = reference_attention(z, z, allowed, module, layer)
        per_token = reference_attention(z, z, allowed, module, layer, layer.logvar_bias.exp().repeat(6, 1).clone())
        out, _ = module(z[None])
    assert (shared - per_token).abs().max() == 0
    assert (out[0] - shared).abs().max() <= 1e-10


def test_kl_gaussian_closed_form():
    g = torch.Generator().manual_seed(2)
    B, N, P = 2, 5, 4
    mu, logvar = (
        torch.randn(B, N, P, generator=g, dtype=torch.float64),
        torch.randn(B, N, P, generator=g, dtype=torch.float64),
    )
    log_alpha = torch.randn(B, N, generator=g, dtype=torch.float64)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, 3:] = False
    m0, s0sq, a0 = (
        torch.randn(P, dtype=torch.float64),
        torch.rand(P, dtype=torch.float64) + 0.5,
        torch.tensor(0.3),
    )
    got = kl_gaussian(mu, logvar, log_alpha, valid, m0, s0sq, a0)
    for b in range(B):
        n = int(valid[b].sum())
        alphas = torch.cat([a0.exp()[None].double(), log_alpha[b, :n].exp()])
        kl = torch.distributions.kl_divergence(
            torch.distributions.Normal(mu[b, :n], (0.5 * logvar[b, :n]).exp()),
            torch.distributions.Normal(m0, s0sq.sqrt()),
        ).mean(-1)
        assert torch.allclose(got[b], (alphas[1:] / alphas.sum() * kl).sum(), atol=1e-12)


def test_kl_gaussian_prior_variance_floor_against_a_direct_loop():
    """docs/method.md §8 conditioning: s̄0² = max(s0², 1e-3·median s0²), checked element by element
    in plain Python floats."""
    g = torch.Generator().manual_seed(5)
    B, N, P = 2, 4, 6  # even P: the median is the mean of the two middle values
    mu = torch.randn(B, N, P, generator=g, dtype=torch.float64)
    logvar = torch.randn(B, N, P, generator=g, dtype=torch.float64) - 3
    log_alpha = torch.randn(B, N, generator=g, dtype=torch.float64)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[0, 2:] = False
    m0 = torch.randn(P, dtype=torch.float64, generator=g)
    s0sq = torch.tensor([0.0, 1e-33, 2.5e-4, 0.7, 1.3, 4.0], dtype=torch.float64)  # like MiniLM's dead dimensions
    a0 = torch.tensor(0.4, dtype=torch.float64)
    floor = 1e-3 * statistics.median(s0sq.tolist())
    floored = [max(v, floor) for v in s0sq.tolist()]
    assert floored[:3] == [floor, floor, floor] and floored[3:] == s0sq[3:].tolist()
    got = kl_gaussian(mu, logvar, log_alpha, valid, m0, s0sq, a0)
    for b in range(B):
        n = int(valid[b].sum())
        alphas = [math.exp(float(a0))] + [math.exp(float(la)) for la in log_alpha[b, :n]]
        total = 0.0
        for i in range(n):
            terms = []
            for p in range(P):
                var, s = math.exp(float(logvar[b, i, p])), floored[p]
                d = float(mu[b, i, p] - m0[p])
                terms.append(var / s + d * d / s - 1 - math.log(var / s))
            total += alphas[i + 1] / sum(alphas) * 0.5 * sum(terms) / P
        assert float(got[b]) == pytest.approx(total, rel=1e-12)
    unfloored = kl_gaussian(mu, logvar, log_alpha, valid, m0, s0sq, a0, floor=0.0)
    assert (unfloored > 1e9).all() and (got < 1e4).all()  # what the floor prevents: 1/s0² with s0² ≈ 0


def test_kl_dirichlet_closed_form():
    g = torch.Generator().manual_seed(3)
    log_alpha = torch.randn(3, 6, generator=g, dtype=torch.float64)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[2, 2:] = False
    a0 = torch.tensor(1.5)
    got = kl_dirichlet(log_alpha, valid, a0)
    for b in range(3):
        K = int(valid[b].sum()) + 1
        A_q = a0.exp().double() + log_alpha[b][valid[b]].exp().sum()
        A_p = a0.exp().double() + (K - 1)
        Dir = torch.distributions.Dirichlet
        q, p = (torch.full((K,), float(A / K), dtype=torch.float64) for A in (A_q, A_p))
        direct = torch.distributions.kl_divergence(Dir(q), Dir(p))
        assert torch.allclose(got[b], direct / K, atol=1e-10)


def test_gamma_sampling_in_log_space():
    torch.manual_seed(0)
    log_alpha = torch.tensor([1.0986, 50.0, 5000.0]).repeat(20000, 1).requires_grad_()
    lg = sample_log_gamma(log_alpha)
    assert torch.isfinite(lg).all()
    assert abs(lg[:, 0].exp().mean() - 3.0) < 0.05  # E[Gamma(3, 1)] = 3
    assert (lg[:, 1] - 50).abs().max() < 1e-8 and (lg[:, 2] - 5000).abs().max() < 1e-3
    lg.sum().backward()
    assert torch.isfinite(log_alpha.grad).all() and (log_alpha.grad[:, 0] != 0).any()


@pytest.mark.parametrize(
    "case", [c for c in TINY if c.name in ("bart", "t5", "gpt2", "bert2bert", "mpnet")], ids=lambda c: c.name
)
def test_training_mode_kl_and_gradients(case):
    _, nv = pair(case)
    nvib.configure(nv, REGULARISED)
    nvib.enable_per_token_variance(nv)
    nv.train()
    inputs = case.inputs()
    labels = inputs.get("decoder_input_ids", inputs["input_ids"])
    out = nv(**inputs, labels=labels)
    terms = nvib.kl_terms(nv)
    assert set(terms) == set(nvib.nv_layers(nv))
    loss = out.loss + nvib.kl_loss(nv, 0.1, 0.1)
    loss.backward()
    for name, param in nv.nvib_layers.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_training_at_equivalence_is_close_to_eval():
    """Sampling around the identity initialisation perturbs the pretrained loss only slightly."""
    case = TINY[0]
    stock, nv = pair(case)
    inputs = case.inputs()
    labels = inputs["decoder_input_ids"]
    with torch.no_grad():
        ref = stock(**inputs, labels=labels).loss
        assert torch.allclose(nv(**inputs, labels=labels).loss, ref, atol=1e-5)
        nv.train()
        for module in nv.modules():  # no dropout: isolate the NV sampling
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        stock.config.dropout = 0
        sampled = nv(**inputs, labels=labels).loss
    assert abs(float(sampled - ref)) < 0.05


def test_kl_loss_needs_a_training_forward():
    _, nv = pair(TINY[0])
    with pytest.raises(RuntimeError, match="model.train"):
        nvib.kl_loss(nv)


@pytest.mark.parametrize("per_token_variance", [False, True])
def test_save_load_round_trip(tmp_path, per_token_variance):
    case = TINY[0]
    _, nv = pair(case)
    nvib.configure(nv, REGULARISED)
    if per_token_variance:
        nvib.enable_per_token_variance(nv)
    with torch.no_grad():  # as after fine-tuning: NV parameters away from their initialisation
        for p in nv.nvib_layers.parameters():
            p.add_(0.01 * torch.randn_like(p))
    inputs = case.inputs()
    with torch.no_grad():
        expected = nv(**inputs).logits
    nvib.save(nv, tmp_path / "m")
    loaded = nvib.load(tmp_path / "m")
    assert loaded.nv_config == REGULARISED
    assert all(layer.per_token_variance == per_token_variance for layer in nvib.nv_layers(loaded).values())
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
    plain = type(nv).from_pretrained(tmp_path / "m")  # a plain HF load works too: no stray keys
    assert not nvib.is_converted(plain)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        nvib.load(tmp_path / "missing")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="nv_config.json"):
        nvib.load(tmp_path / "plain")


def test_deepcopy_and_to_dtype_keep_working():
    case = TINY[0]
    stock, nv = pair(case)
    twin = copy.deepcopy(nv)
    inputs = case.inputs()
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, nv(**inputs).logits)
        nvib.configure(twin, REGULARISED)  # the twin folds its own layers' weights, not those of the model it copies
        expected = nvib.convert(copy.deepcopy(stock), REGULARISED)(**inputs).logits
        torch.testing.assert_close(twin(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    nv.double()
    with torch.no_grad():
        assert nv(**{k: v for k, v in inputs.items()}).logits.dtype == torch.float64
