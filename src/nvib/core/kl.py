"""The NVIB regularisers KL_G and KL_D of docs/method.md §8, per sequence."""

from __future__ import annotations

import math

import torch

# Pseudo-counts are e^(‖z‖²/2√E + …): with real hidden-state norms Σα overflows any float. KL_D only grows
# like ((K−1)/2)·log Σα, but Σα itself must stay finite: it is clamped at e^60.
MAX_LOG_PSEUDO_COUNT = 60.0
MIN_PRIOR_VARIANCE = 1e-12  # real models have dimensions with (float32) zero variance: s0² = 0 would give 0/0
# docs/method.md §8 conditioning: KL_G divides by s̄0² = max(s0², PRIOR_VARIANCE_FLOOR · median_p s0²), so dimensions
# the pretrained model keeps (about) constant cannot dominate the regulariser.
PRIOR_VARIANCE_FLOOR = 1e-3
SERIES_FROM = 10.0  # Stirling-type series for lnΓ and ψ from here on (truncation error < 1e-10)


def _with_prior(log_alpha: torch.Tensor, valid: torch.Tensor, prior_log_alpha: torch.Tensor):
    """log α of all components [B, 1+N] in float64, padding at -inf."""
    f = torch.float64
    la = log_alpha.to(f).masked_fill(~valid, float("-inf"))
    la0 = prior_log_alpha.to(f).reshape(-1, 1).expand(la.shape[0], 1)  # a scalar, or one per row
    return torch.cat([la0, la], dim=1)


def floored_prior_var(prior_var: torch.Tensor, floor: float | None = None) -> torch.Tensor:
    """s̄0² [P] = max(s0², floor · median_p s0², 1e-12) (docs/method.md §8; the median of an even P is the mean of the
    two middle values); `floor` None reads PRIOR_VARIANCE_FLOOR. Used by KL_G only: at evaluation
    β0 = s0² + √E is well conditioned without it."""
    floor = PRIOR_VARIANCE_FLOOR if floor is None else floor
    var = prior_var.to(torch.promote_types(prior_var.dtype, torch.float32))
    relative = floor * torch.quantile(var.reshape(-1, var.shape[-1]).to(torch.float64), 0.5, dim=-1)
    return torch.maximum(var, relative.to(var.dtype).reshape(var.shape[:-1] + (1,))).clamp(min=MIN_PRIOR_VARIANCE)


def kl_gaussian(
    mu, logvar, log_alpha, valid, prior_mean, prior_var, prior_log_alpha, floor: float | None = None
) -> torch.Tensor:
    """KL_G [B] = ½ Σ_n (α_n/Σα) mean_p[σ²/s̄0² + (μ−m0)²/s̄0² − 1 − log(σ²/s̄0²)], s̄0² = `floored_prior_var`.

    mu, logvar [B, N, P]; log_alpha, valid [B, N]; prior_mean, prior_var [P]; the prior component (its own
    KL is 0) counts in Σα. `floor` = 0 gives the unconditioned KL against s0² itself.
    """
    weights = torch.softmax(_with_prior(log_alpha, valid, prior_log_alpha), dim=1)[:, 1:]
    log_s0sq = floored_prior_var(prior_var, floor).to(mu.dtype).log()
    log_ratio = logvar - log_s0sq
    per_token = 0.5 * (log_ratio.exp() + (mu - prior_mean.to(mu.dtype)) ** 2 / log_s0sq.exp() - 1 - log_ratio)
    return (weights * per_token.mean(-1).to(weights.dtype)).sum(-1)


def feature_mean(z, valid, prior_mean, prior_var, floor: float | None = None) -> torch.Tensor:
    """Feature-mean matching [B] = mean_n mean_p (z − m0)²/(2 s̄0²) over each sequence's valid tokens: KL_G's mean
    term with uniform token weights in place of α_n/Σα, s̄0² = `floored_prior_var` (a penalty on a plain model's
    attention inputs, no NV layer needed).

    z [B, N, P]; valid [B, N] (a row with no valid token gives 0); prior_mean, prior_var [P].
    """
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    s0sq = floored_prior_var(prior_var, floor).to(z.dtype)
    per_token = ((z - prior_mean.to(z.dtype)) ** 2 / (2 * s0sq)).mean(-1)
    weights = valid.to(per_token.dtype)
    return (weights * per_token).sum(-1) / weights.sum(-1).clamp(min=1)


def kl_dirichlet(log_alpha, valid, prior_log_alpha, delta: float = 1.0) -> torch.Tensor:
    """KL_D [B] between Dir(α) and the prior Dirichlet, in float64 (docs/method.md §8); L = K.

    docs/method.md §8's lnΓ(A_q) − lnΓ(A_p) + (A_q − A_p)(ψ(A_q/K) − ψ(A_q)) + K(lnΓ(A_p/K) − lnΓ(A_q/K)) cancels
    terms of size A·log A, hopeless in float64 once A ≳ 1e6. With lnΓ(x) = (x−½)ln x − x + ½ln 2π + r(x)
    and ψ(x) = ln x + s(x) it is exactly
    ((K−1)/2)(ln A_q − ln A_p) + (A_q − A_p)(s(A_q/K) − s(A_q)) + R(A_q) − R(A_p), R(A) = r(A) − K·r(A/K),
    where every term stays small.
    """
    la = _with_prior(log_alpha, valid, prior_log_alpha)
    K = la.isfinite().sum(1).to(torch.float64)
    log_A_q = torch.logsumexp(la, dim=1).clamp(max=MAX_LOG_PSEUDO_COUNT)
    A_q = log_A_q.exp()
    A_p = prior_log_alpha.to(torch.float64).clamp(max=MAX_LOG_PSEUDO_COUNT).exp() + delta * (K - 1)
    kl = (
        0.5 * (K - 1) * (log_A_q - A_p.log())
        + (A_q - A_p) * (_digamma_rest(A_q / K) - _digamma_rest(A_q))
        + _lgamma_rest(A_q) - K * _lgamma_rest(A_q / K)
        - _lgamma_rest(A_p) + K * _lgamma_rest(A_p / K)
    )  # fmt: skip
    return kl / K


def _lgamma_rest(x: torch.Tensor) -> torch.Tensor:
    """r(x) = lnΓ(x) − [(x − ½)ln x − x + ½ln 2π], x > 0."""
    big = x.clamp(min=SERIES_FROM)
    inv, inv2 = 1 / big, 1 / (big * big)
    series = inv * (1 / 12 - inv2 * (1 / 360 - inv2 * (1 / 1260 - inv2 / 1680)))
    small = x.clamp(max=SERIES_FROM)
    direct = torch.lgamma(small) - ((small - 0.5) * small.log() - small + 0.5 * math.log(2 * math.pi))
    return torch.where(x >= SERIES_FROM, series, direct)


def _digamma_rest(x: torch.Tensor) -> torch.Tensor:
    """s(x) = ψ(x) − ln x, x > 0."""
    big = x.clamp(min=SERIES_FROM)
    inv, inv2 = 1 / big, 1 / (big * big)
    series = -0.5 * inv - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 / 240)))
    small = x.clamp(max=SERIES_FROM)
    return torch.where(x >= SERIES_FROM, series, torch.digamma(small) - small.log())
