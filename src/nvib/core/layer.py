"""`NVIBLayer`: the parameters of one NV site and what they imply (docs/method.md §2, §3, §6, §8).

The layer maps a key-side vector z (size P) to a Gaussian component (μ, σ²) and a log
pseudo-count log α. It is parameterised so that its identity initialisation costs nothing:
μ = mu_scale·z + mu_bias (W_μ = τ_μ·I), log σ² = logvar_bias (+ logvar_weight·z when the layer has
per-token variances, W_σ = 0 at initialisation), and log α = alpha_w1·z + alpha_w2·(z⊙z) + alpha_bias.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch
from torch import nn

from nvib.core.config import IDENTITY_ALPHA_TAU
from nvib.core.fast_form import FastTerms, fast_terms
from nvib.core.kl import kl_dirichlet, kl_gaussian
from nvib.core.memo import SampleReplay, tensor_state

TINY_VARIANCE = 1e-12  # docs/method.md §3: b_σ = log((s_0 τ_σ)² + tiny)
LOG_ALPHA_GAUSSIAN = 10.0  # above this log α, Gamma(α, 1) is sampled by its normal approximation
LAYERS = "nvib_layers"  # the ModuleDict of NV layers on a converted model
# added to the prior's score at τ_α = +∞: e^-1e4 is 0 in every float format, and it stays finite, so no 0·∞ in a
# product or gradient; the prior then has weight exactly 0 (scores within ±1e3 of each other)
PRIOR_OFF = -1e4


def is_converted(model: nn.Module) -> bool:
    return LAYERS in model._modules


def nv_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Site name ("encoder.0", ..., "cross") -> its NV layer (an `NVIBLayer` or a key-space layer)."""
    if not is_converted(model):
        raise ValueError("this model is not an NV model; call nvib.convert(model) first")
    return {layer.site: layer for layer in model._modules[LAYERS].values()}


def set_knobs(model: nn.Module, config) -> list[str]:
    """Re-initialise every NV layer of `model` from the knobs of an `NVConfig` (docs/method.md §3, §12); returns the
    mixtures ("site" or "site head g") whose τ_σ was clamped at the largest spread the site allows (§12)."""
    clamped = []
    for layer in nv_layers(model).values():
        if layer.prior_mean.is_meta:  # no values yet: `to_empty` then transformers' init_weights sets them
            continue
        unit = config.stdev_unit or layer.STDEV_UNIT
        flags = layer.reset(
            config.alpha_tau(layer.kind), config.stdev_tau(layer.kind), config.mu_tau, config.alpha_scale_min,
            config.centre_alpha, unit,
        )  # fmt: skip
        flags = flags.reshape(-1).tolist()
        clamped += [layer.site if len(flags) == 1 else f"{layer.site} head {g}" for g, c in enumerate(flags) if c]
    return clamped


def variance_scale(
    s0sq: torch.Tensor, sq_var: torch.Tensor, spread: torch.Tensor, noise: float, stdev_tau: float, unit: str,
    site: str, sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """λ of σ_d² = λ·s_0d² per mixture ([...] over the leading dims of s_0² [..., D]) and whether τ_σ was clamped.

    "prior" (docs/method.md §3): λ = τ_σ². "bias" (docs/method.md §12): Std_n(B_n) = τ_σ nats, B_n = ½Σ_d (1 − r_d)
    z_nd²/ν, w_d = (1 − r_d)/ν, found by bisection on log λ (float64): computed on the prior's token `sample` [K, ...,
    D] where it has one, else Var(B) ≈ ¼Σ_d w_d² Var(z_d²)·(ς/ς_diag)² (the diagonal estimate, off by up to 89% at
    LayerNorm sites: benchmarks/stdev_unit.py)."""
    s0sq, spread = s0sq.to(torch.float64), spread.to(torch.float64)
    shape = s0sq.shape[:-1]
    if unit == "prior" or stdev_tau == 0:
        return torch.full(shape, float(stdev_tau) ** 2, dtype=torch.float64), torch.zeros(shape, dtype=torch.bool)
    sq_var = sq_var.to(torch.float64)
    if sample is not None:
        z2 = sample.to(torch.float64) ** 2  # [K, ..., D]
        spread = (z2.sum(-1) / (2 * noise)).std(0)  # its own λ → ∞ end, so every target below it is reachable
    elif bool(torch.isnan(sq_var).any()):
        raise ValueError(
            f'stdev_unit="bias" at site {site} needs the fourth moments of its prior (docs/method.md §12), which this '
            "prior does not record (estimated by an older nvib). Fix: estimate the prior again, "
            'or use stdev_unit="prior"'
        )
    diag = 0.5 * sq_var.sum(-1).sqrt() / noise  # ς_diag: Std_diag(B) as λ → ∞
    ratio = torch.where(diag > 0, spread / diag.clamp(min=1e-300), torch.zeros_like(diag))
    top = spread * (1 - 1e-3)
    clamped = stdev_tau >= top
    target = torch.minimum(torch.full_like(top, float(stdev_tau)), top)

    def std(log_lam: torch.Tensor) -> torch.Tensor:
        lam = log_lam.exp()[..., None] * s0sq
        w = lam / (lam + noise) / noise
        if sample is not None:
            return 0.5 * torch.einsum("k...d,...d->k...", z2, w).std(0)
        return ratio * 0.5 * (w * w * sq_var).sum(-1).sqrt()

    low, high = torch.full(shape, -80.0, dtype=torch.float64), torch.full(shape, 80.0, dtype=torch.float64)
    for _ in range(40):  # Std(B) increases with λ; 160/2^40 in log λ
        mid = (low + high) / 2
        below = std(mid) < target
        low, high = torch.where(below, mid, low), torch.where(below, high, mid)
    lam = torch.where(target > 0, ((low + high) / 2).exp(), torch.zeros_like(low))
    return lam, clamped


@dataclasses.dataclass
class TokenTerms:
    """Per-token terms of the general form (docs/method.md §4) for key vectors z [B, N, P], float32 or wider.

    k̃ = W_k(point), ṽ = W_v(point); c is c_n minus the token constant of `FastTerms`.
    """

    point: torch.Tensor  # √E μ/β [B, N, P]
    ratio: torch.Tensor  # σ²/β [B, N, P]
    c: torch.Tensor  # [B, N]


class PriorWeight:
    """How much weight the knobs leave the prior component (docs/method.md §11), for layers with prior_mean, prior_var,
    logvar_bias (shared variances), alpha_bias, noise and prior_gate (0, or `PRIOR_OFF` at τ_α = +∞)."""

    @torch.no_grad()
    def gate_prior(self, alpha_tau: float) -> float:
        """Set the prior's gate from τ_α; returns the τ_α the tokens' bias b_α is computed with."""
        off = alpha_tau == math.inf
        self.prior_gate.fill_(PRIOR_OFF if off else 0.0)
        return IDENTITY_ALPHA_TAU if off else alpha_tau

    def prior_offset(self) -> torch.Tensor:
        """δ_0: the prior's score advantage over an average in-domain token at b_α = 0, float64 (per head)."""
        beta = self.logvar_bias.detach().to(torch.float64).exp() + self.noise
        return prior_offset(self.prior_mean, self.prior_var, beta, self.noise)

    @torch.no_grad()
    def set_default_prior(self) -> None:
        """The prior of a layer made without an estimated one: N(0, I), log-count 0 (spread 1), Var(z²) = 2."""
        ones = torch.ones_like(self.prior_var)
        self.set_prior(torch.zeros_like(ones), ones, 0.0, 1.0, sq_var=2 * ones)

    def prior_weight(self) -> float:
        """e^(δ_0 − b_α): the prior's weight relative to an average in-domain token (largest over heads); 0 when
        τ_α = +∞ removed it."""
        if bool(self.prior_gate < 0):
            return 0.0
        return float((self.prior_offset() - self.alpha_bias.detach().to(torch.float64)).max().clamp(max=700).exp())


class Sampling:
    """What training draws from a z-space layer (docs/method.md §8), for layers with `posterior`, the prior's
    buffers, noise, prior_gate and a `SampleReplay` as `drawn`; the KL terms of the last sample are left in
    kl_gaussian and kl_dirichlet."""

    def sample(self, z: torch.Tensor, caller=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One reparameterised sample for key vectors z [B, N, P], shared by every module of the site.

        Returns z̃ [B, N, P], the per-key score bias log γ − ‖z̃‖²/(2√E) [B, N] (float32), and the same
        two for the prior component: z̃_0 [B, P], bias_0 [B].

        The sample is drawn by the first `caller` (module and projection) that sees z and reused by the others, or
        drawn again for activation checkpointing (`SampleReplay`).
        """
        grad = torch.is_grad_enabled() and (z.requires_grad or self.mu_scale.requires_grad)
        kept = self.drawn.reuse(z, caller, grad)
        if kept is not None:
            return kept
        mu, logvar, log_alpha = self.posterior(z)
        z_tilde = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        m0 = self.prior_mean.to(mu.dtype).expand(z.shape[0], -1)
        prior_tilde = m0 + self.prior_var.to(mu.dtype).sqrt() * torch.randn_like(m0)
        prior_log_alpha = self.prior_log_alpha.to(mu.dtype).expand(z.shape[0])
        bias = sample_log_gamma(log_alpha) - (z_tilde * z_tilde).sum(-1) / (2 * self.noise)
        prior_bias = sample_log_gamma(prior_log_alpha) - (prior_tilde * prior_tilde).sum(-1) / (2 * self.noise)
        prior_bias = prior_bias + self.prior_gate.to(prior_bias.dtype)
        out = (z_tilde.to(z.dtype), bias, prior_tilde.to(z.dtype), prior_bias)
        self.drawn.keep(z, out, (mu, logvar, log_alpha), caller, grad)
        self.kl_gaussian = self.kl_dirichlet = None
        return out

    def compute_kl(self, valid: torch.Tensor | None) -> None:
        """KL_G and KL_D of the last sample (docs/method.md §8), averaged over the batch; `valid`
        [B, N] marks real keys."""
        if self.drawn.posterior is None or self.kl_gaussian is not None:
            return
        mu, logvar, log_alpha = self.drawn.posterior
        if valid is None:
            valid = torch.ones(log_alpha.shape, dtype=torch.bool, device=log_alpha.device)
        valid = valid[:, -log_alpha.shape[1] :]  # over a filled cache: this call's tokens, the ones sampled
        self.kl_gaussian = kl_gaussian(
            mu, logvar, log_alpha, valid, self.prior_mean, self.prior_var, self.prior_log_alpha
        ).mean()
        self.kl_dirichlet = kl_dirichlet(log_alpha, valid, self.prior_log_alpha).mean()


class NVIBLayer(PriorWeight, Sampling, nn.Module):
    """One NV site: P-dimensional NVIB parameters plus the site's prior statistics (buffers).

    `noise` is the query noise variance √E (1/s for models scaling scores by s, docs/method.md §1).
    """

    STDEV_UNIT = "prior"  # z-space: the paper's knob values keep their meaning (docs/method.md §12)

    def __init__(self, site: str, kind: str, dim: int, noise: float, per_token_variance: bool = False):
        super().__init__()
        self.site, self.kind, self.dim, self.noise = site, kind, dim, float(noise)
        self.mu_scale = nn.Parameter(torch.ones(()))
        self.mu_bias = nn.Parameter(torch.zeros(dim))
        self.logvar_bias = nn.Parameter(torch.full((dim,), math.log(TINY_VARIANCE)))
        self.register_parameter("logvar_weight", nn.Parameter(torch.zeros(dim, dim)) if per_token_variance else None)
        self.alpha_w1 = nn.Parameter(torch.zeros(dim))
        self.alpha_w2 = nn.Parameter(torch.full((dim,), 1 / (2 * self.noise)))
        self.alpha_bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("prior_mean", torch.zeros(dim))
        self.register_buffer("prior_var", torch.ones(dim))
        self.register_buffer("prior_log_alpha", torch.zeros(()))
        self.register_buffer("prior_scale", torch.ones(()))
        self.register_buffer("prior_gate", torch.zeros(()), persistent=False)  # set from the knobs by `reset`
        # Var(z_d²) of the prior's tokens (docs/method.md §12; 2 for the default N(0, 1), NaN for priors without it);
        # the prior file holds it, so it is not saved with the layer
        self.register_buffer("prior_sq_var", torch.full((dim,), 2.0), persistent=False)
        self.prior_sample: torch.Tensor | None = None
        self.kl_gaussian: torch.Tensor | None = None
        self.kl_dirichlet: torch.Tensor | None = None
        self.drawn = SampleReplay()  # the last sample, shared by the site's modules (`sample`)
        self._terms: tuple | None = None  # (weakref to z, parameter versions, TokenTerms)
        self._constants: tuple | None = None  # ((dtype, parameter versions), what token_terms needs)

    @property
    def per_token_variance(self) -> bool:
        return self.logvar_weight is not None

    def extra_repr(self) -> str:
        extra = ", per_token_variance=True" if self.per_token_variance else ""
        return f"site={self.site!r}, kind={self.kind!r}, dim={self.dim}, noise={self.noise:.4g}{extra}"

    def enable_per_token_variance(self) -> None:
        """Add W_σ (zero: the layer computes what it computed). The owning slots must be reinstalled."""
        if self.logvar_weight is None:
            self.logvar_weight = nn.Parameter(self.logvar_bias.new_zeros(self.dim, self.dim))

    @torch.no_grad()
    def set_prior(
        self, mean: torch.Tensor, var: torch.Tensor, log_alpha_mean, log_alpha_std, value_mean=None, sq_var=None,
        sample=None,
    ):  # fmt: skip
        """m_0, s_0², Var(z²) [P] (None: unknown), a_0, ς; `value_mean` is for key-space sites only."""
        self.prior_sq_var.copy_(torch.full_like(var, math.nan) if sq_var is None else sq_var)
        self.prior_sample = sample  # [K, P] or None (docs/method.md §12; kept on the CPU, read by `reset` only)
        self.prior_mean.copy_(mean)
        self.prior_var.copy_(var)
        self.prior_log_alpha.fill_(float(log_alpha_mean))
        self.prior_scale.fill_(float(log_alpha_std))

    @torch.no_grad()
    def reset(
        self, alpha_tau: float, stdev_tau: float, mu_tau: float = 1.0, alpha_scale_min: float = 1.0,
        centre: bool = False, stdev_unit: str = STDEV_UNIT,
    ) -> torch.Tensor:  # fmt: skip
        """Identity initialisation with knobs (docs/method.md §3), b_α = τ_α·max(ς, ς_min) (+ δ_0 if `centre`, §11), σ²
        = λ·s_0² with λ from `variance_scale` (§12); returns whether τ_σ was clamped."""
        m0 = self.prior_mean.to(self.mu_bias.dtype)
        s0sq = self.prior_var.to(torch.float64)
        lam, clamped = variance_scale(
            s0sq, self.prior_sq_var, self.prior_scale, self.noise, stdev_tau, stdev_unit, self.site, self.prior_sample
        )
        self.mu_scale.fill_(mu_tau)
        self.mu_bias.copy_((1 - mu_tau) * m0)
        self.logvar_bias.copy_(torch.log(s0sq * lam + TINY_VARIANCE))
        if self.logvar_weight is not None:
            self.logvar_weight.zero_()
        self.alpha_w1.zero_()
        self.alpha_w2.fill_(1 / (2 * self.noise))
        bias = self.gate_prior(alpha_tau) * max(float(self.prior_scale), alpha_scale_min)
        self.alpha_bias.fill_(bias + (float(self.prior_offset()) if centre else 0.0))
        return clamped

    # ---- evaluation (docs/method.md §4, §6) -------------------------------------------------------------

    def fast_terms(self) -> FastTerms:
        """The fast-form vectors in float64 (differentiable in the layer's parameters): `fast_form.fast_terms`."""
        return fast_terms(self)

    def token_terms(self, z: torch.Tensor) -> TokenTerms:
        """docs/method.md §4 per token, for variances that differ per token; memoised for the modules sharing z.

        Written as the fast form's terms plus corrections that vanish with W_σ (no cancellation in float32):
        with β̄ = σ̄² + √E the shared form and δ = 1/β̄ − 1/β_n,
        c_n = c_lin·z + c_quad·(z⊙z) + ½Σ δ μ_n² − ½Σ log(β_n/β̄).
        """
        traced = torch.compiler.is_compiling()  # then no memos (keyed by identity and versions)
        versions = None if traced else tensor_state((*self._parameters.values(), *self._buffers.values()))
        memo = self._terms
        if memo is not None and memo[0]() is z and memo[1] == versions and not torch.is_grad_enabled():
            return memo[2]
        f = torch.promote_types(z.dtype, torch.float32)
        k = self._token_constants(f, versions)
        zf = z.to(f)
        dvar = k["var0"] * torch.expm1(zf @ k["logvar_weight_t"])  # σ_n² − σ̄²
        beta0 = k["beta0"]
        beta = beta0 + dvar
        mu = k["mu_scale"] * zf + k["mu_bias"]
        var0 = k["var0"]
        c = zf @ k["c_lin"] + (zf * zf) @ k["c_quad"]
        c = c + 0.5 * (dvar / (beta * beta0) * mu * mu).sum(-1) - 0.5 * torch.log1p(dvar / beta0).sum(-1)
        terms = TokenTerms(point=self.noise * mu / beta, ratio=(var0 + dvar) / beta, c=c)
        if not traced:
            self._terms = (weakref.ref(z, self._drop_terms), versions, terms)  # released with z
        return terms

    def _token_constants(self, f: torch.dtype, versions: tuple) -> dict[str, torch.Tensor]:
        """The parameters `token_terms` needs, in dtype f; kept between calls while no parameter changes."""
        memo = self._constants
        if versions is not None and memo is not None and memo[0] == (f, versions) and not torch.is_grad_enabled():
            return memo[1]
        fast = self.fast_terms()
        var0 = self.logvar_bias.to(f).exp()
        consts = dict(
            var0=var0,
            beta0=var0 + self.noise,
            logvar_weight_t=self.logvar_weight.t().to(f),
            mu_scale=self.mu_scale.to(f),
            mu_bias=self.mu_bias.to(f),
            c_lin=fast.c_lin.to(f),
            c_quad=fast.c_quad.to(f),
        )
        if versions is not None and not torch.is_grad_enabled():
            self._constants = ((f, versions), consts)
        return consts

    def _drop_terms(self, _ref) -> None:
        self._terms = None

    def posterior(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """μ [..., P], log σ² [..., P] and log α [...] of key vectors z [..., P], in float32 or wider."""
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        mu = self.mu_scale * z + self.mu_bias
        if self.logvar_weight is None:
            logvar = self.logvar_bias.expand_as(mu)
        else:
            logvar = z @ self.logvar_weight.t().to(z.dtype) + self.logvar_bias
        log_alpha = z @ self.alpha_w1.to(z.dtype) + (z * z) @ self.alpha_w2.to(z.dtype) + self.alpha_bias
        return mu, logvar, log_alpha


def prior_offset(m0: torch.Tensor, s0sq: torch.Tensor, beta: torch.Tensor, noise: float) -> torch.Tensor:
    """δ_0 = ½Σ(m_0² + s_0²)/β − ½Σ m_0²/β_0 − ½Σ log(β_0/β), β_0 = s_0² + √E, summed over the last dim (§11)."""
    m0, s0sq, beta = (t.to(torch.float64) for t in (m0, s0sq, beta))
    beta0 = s0sq + noise
    return 0.5 * ((m0 * m0 + s0sq) / beta - m0 * m0 / beta0 - (beta0 / beta).log()).sum(-1)


def sample_log_gamma(log_alpha: torch.Tensor) -> torch.Tensor:
    """log γ with γ ~ Gamma(α, 1), reparameterised, from log α without ever forming a huge α."""
    small = log_alpha.clamp(max=LOG_ALPHA_GAUSSIAN)
    gamma = torch.distributions.Gamma(small.exp().clamp(min=1e-6), 1.0).rsample()
    log_small = gamma.clamp(min=1e-30).log()
    big = log_alpha.clamp(min=LOG_ALPHA_GAUSSIAN)  # Gamma(α,1) ≈ N(α, α): log γ ≈ log α + log1p(ε/√α)
    log_big = big + torch.log1p(torch.randn_like(big) * (-0.5 * big).exp())
    return torch.where(log_alpha > LOG_ALPHA_GAUSSIAN, log_big, log_small)
