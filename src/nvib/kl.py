"""The NVIB regularisers KL_G and KL_D of spec §8, per sequence."""

from __future__ import annotations

import torch

# Pseudo-counts are e^(‖z‖²/2√E + …): with real hidden-state norms Σα overflows any float. KL_D grows like
# Σα·log K, so past e^60 it is astronomically large anyway; clamping there keeps it (and float32 losses) finite.
MAX_LOG_PSEUDO_COUNT = 60.0


def _with_prior(log_alpha: torch.Tensor, valid: torch.Tensor, prior_log_alpha: torch.Tensor):
    """log α of all components [B, 1+N] in float64, padding at -inf."""
    f = torch.float64
    la = log_alpha.to(f).masked_fill(~valid, float("-inf"))
    la0 = prior_log_alpha.to(f).expand(la.shape[0], 1)
    return torch.cat([la0, la], dim=1)


def kl_gaussian(mu, logvar, log_alpha, valid, prior_mean, prior_var, prior_log_alpha) -> torch.Tensor:
    """KL_G [B] = ½ Σ_n (α_n/Σα) mean_p[σ²/s0² + (μ−m0)²/s0² − 1 − log(σ²/s0²)].

    mu, logvar [B, N, P]; log_alpha, valid [B, N]; the prior component (its own KL is 0) counts in Σα.
    """
    weights = torch.softmax(_with_prior(log_alpha, valid, prior_log_alpha), dim=1)[:, 1:]
    log_s0sq = prior_var.to(mu.dtype).log()
    log_ratio = logvar - log_s0sq
    per_token = 0.5 * (log_ratio.exp() + (mu - prior_mean.to(mu.dtype)) ** 2 / log_s0sq.exp() - 1 - log_ratio)
    return (weights * per_token.mean(-1).to(weights.dtype)).sum(-1)


def kl_dirichlet(log_alpha, valid, prior_log_alpha, delta: float = 1.0) -> torch.Tensor:
    """KL_D [B] between Dir(α) and the prior Dirichlet, in float64 (spec §8); L = K."""
    la = _with_prior(log_alpha, valid, prior_log_alpha)
    K = la.isfinite().sum(1).to(torch.float64)
    A_q = torch.logsumexp(la, dim=1).clamp(max=MAX_LOG_PSEUDO_COUNT).exp()
    A_p = prior_log_alpha.to(torch.float64).clamp(max=MAX_LOG_PSEUDO_COUNT).exp() + delta * (K - 1)
    lg, dg = torch.lgamma, torch.digamma
    kl = lg(A_q) - lg(A_p) + (A_q - A_p) * (dg(A_q / K) - dg(A_q)) + K * (lg(A_p / K) - lg(A_q / K))
    return kl / K
