"""The fast form's per-site vectors (docs/method.md §6) of a z-space NV layer with shared variances: the key rescaling
κ = √E τ_μ/β and shift η = √E b_μ/β, the bias vectors c_lin and c_quad, and the prior's key, ratio and c_0, all from
the layer's parameters and prior buffers in float64 (differentiable in the parameters).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass
class FastTerms:
    """Per-site vectors of the fast form (docs/method.md §6), all of size P unless noted.

    For a token z: k̃ = W_k(key_scale ⊙ z + key_shift); c = c_lin·z + c_quad·(z⊙z) (token constant
    removed: it is the same for every token and drops out of the softmax).
    """

    key_scale: torch.Tensor
    key_shift: torch.Tensor
    c_lin: torch.Tensor
    c_quad: torch.Tensor
    ratio: torch.Tensor  # σ²/β of the tokens
    prior_point: torch.Tensor  # √E m_0/β_0
    prior_ratio: torch.Tensor  # s_0²/β_0
    prior_c: torch.Tensor  # scalar: c_0 minus the token constant


def fast_terms(layer: nn.Module) -> FastTerms:
    """The fast-form vectors of an `NVIBLayer` (its mu_scale, mu_bias, logvar_bias, alpha_w1, alpha_w2, alpha_bias,
    noise and prior buffers), in float64."""
    f = torch.float64
    s, b = layer.mu_scale.to(f), layer.mu_bias.to(f)
    var = layer.logvar_bias.to(f).exp()
    beta = var + layer.noise
    d = layer.noise / beta
    m0, s0sq = layer.prior_mean.to(f), layer.prior_var.to(f)
    beta0 = s0sq + layer.noise
    token_const = layer.alpha_bias.to(f) - 0.5 * (b * b / beta).sum() - 0.5 * beta.log().sum()
    c0 = layer.prior_log_alpha.to(f) - 0.5 * (m0 * m0 / beta0).sum() - 0.5 * beta0.log().sum()
    return FastTerms(
        key_scale=d * s,
        key_shift=d * b,
        c_lin=layer.alpha_w1.to(f) - s * b / beta,
        c_quad=layer.alpha_w2.to(f) - s * s / (2 * beta),
        ratio=var / beta,
        prior_point=layer.noise * m0 / beta0,
        prior_ratio=s0sq / beta0,
        prior_c=c0 - token_const + layer.prior_gate.to(f),
    )
