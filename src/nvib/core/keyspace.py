"""Key-space NV attention for rotary decoder-only models: Llama, Mistral, Qwen 2/3, Gemma 2/3,
OLMo 2 (docs/method.md §10).

The module's own code keeps running: it projects, normalises and rotates q and k, updates its KV cache with the
ordinary keys and values and calls the registered attention function "nvib-key", which computes everything from
those keys and values. One NV mixture per key/value head g (the query heads of a GQA group share it). With the
shared variance σ² and β = σ² + √E, both constant on each rotary pair (i, i + E/2) so that they commute with the
rotation R_n, the denoising attention of §10 at τ_μ = 1 is

    s_mn = s·q̂_m·k̃_n + c_n,   k̃_n = (√E/β) ⊙ k̂_n,   c_n = ½ Σ_p k̂²_np (1/√E − 1/β_p)  (+ a token constant)
    prior (n = 0, unrotated, never masked): k̃_0 = √E m_0/β_0, c_0 relative to the token constant, value m_v.

(√E/β) moves to the query side, (√E/β ⊙ q̂)·k̂ = q̂·k̃, so the cached keys are used as they are (the prior's key is
divided by it instead), and c_n rides in the additive attention mask.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from nvib.core import kernels
from nvib.core.architectures import Site
from nvib.core.kl import kl_dirichlet, kl_gaussian
from nvib.core.layer import TINY_VARIANCE, PriorWeight, sample_log_gamma, variance_scale
from nvib.core.masks import FLASH_CPU, can_split, compiling, key_mask, nv_mask, through_weights, wants_weights

ATTN_NAME = "nvib-key"
C_LIMIT = 1e4  # |c_n| bound so the bias stays finite in float16 (e^-1e4 is already 0)


class KeySpaceLayer(PriorWeight, nn.Module):
    """One key-space NV site (docs/method.md §10): per key/value head g, the prior (m_0, s_0², m_v, a_0, ς) as buffers
    and the knob-derived parameters log σ² [G, E] (shared by the tokens) and b_α [G]."""

    per_token_variance = False
    STDEV_UNIT = "bias"  # key space: one τ_σ means the same spread of scores at every head (docs/method.md §12)

    def __init__(self, site: str, kind: str, heads: int, head_dim: int, noise: float):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"site {site}: rotary keys need an even head size, got {head_dim}")
        self.site, self.kind, self.heads, self.head_dim, self.noise = site, kind, heads, head_dim, float(noise)
        self.dim = heads * head_dim
        self.logvar_bias = nn.Parameter(torch.full((heads, head_dim), math.log(TINY_VARIANCE)))
        self.alpha_bias = nn.Parameter(torch.zeros(heads))
        self.register_buffer("prior_mean", torch.zeros(heads, head_dim))
        self.register_buffer("prior_var", torch.ones(heads, head_dim))
        self.register_buffer("prior_value", torch.zeros(heads, head_dim))
        self.register_buffer("prior_log_alpha", torch.zeros(heads))
        self.register_buffer("prior_scale", torch.ones(heads))
        self.register_buffer("prior_gate", torch.zeros(()), persistent=False)  # set from the knobs by `reset`
        self.register_buffer("prior_sq_var", torch.full((heads, head_dim), 2.0), persistent=False)  # docs/method.md §12
        self.prior_sample: torch.Tensor | None = None
        self.kl_gaussian: torch.Tensor | None = None
        self.kl_dirichlet: torch.Tensor | None = None

    def extra_repr(self) -> str:
        shape = f"heads={self.heads}, head_dim={self.head_dim}"
        return f"site={self.site!r}, kind={self.kind!r}, {shape}, noise={self.noise:.4g}"

    @torch.no_grad()
    def set_prior(self, mean, var, log_alpha_mean, log_alpha_std, value_mean=None, sq_var=None, sample=None) -> None:
        """Per-head statistics [G, E] / [G]; s_0² is averaged over each rotary pair (docs/method.md §10); Var(k²) [G, E]
        (None: unknown, docs/method.md §12)."""
        G, E = self.heads, self.head_dim
        self.prior_sq_var.copy_(torch.full((G, E), math.nan) if sq_var is None else sq_var.reshape(G, E))
        self.prior_sample = None if sample is None else sample.reshape(-1, G, E)  # [K, G, E], docs/method.md §12
        pair = var.reshape(G, 2, E // 2).mean(1)
        self.prior_mean.copy_(mean.reshape(G, E))
        self.prior_var.copy_(pair.repeat(1, 2))
        self.prior_value.copy_(torch.zeros(G, E) if value_mean is None else value_mean.reshape(G, E))
        self.prior_log_alpha.copy_(torch.as_tensor(log_alpha_mean).reshape(-1).expand(G))
        self.prior_scale.copy_(torch.as_tensor(log_alpha_std).reshape(-1).expand(G))

    @torch.no_grad()
    def reset(
        self, alpha_tau: float, stdev_tau: float, mu_tau: float = 1.0, alpha_scale_min: float = 1.0,
        centre: bool = True, stdev_unit: str = STDEV_UNIT,
    ) -> torch.Tensor:  # fmt: skip
        """Identity initialisation with knobs; b_α = τ_α·max(ς, ς_min) + δ_0, always centred here (docs/method.md §11);
        σ² = λ_g·s_0² per head (§12). Returns whether τ_σ was clamped, per head."""
        if mu_tau != 1.0:
            raise ValueError(
                f"mu_tau = {mu_tau} is not available at key-space site {self.site}: docs/method.md §10 reads the "
                "rotated keys, which fixes τ_μ = 1; leave mu_tau at 1 for rotary decoder-only models"
            )
        s0sq = self.prior_var.double()
        lam, clamped = variance_scale(
            s0sq, self.prior_sq_var, self.prior_scale, self.noise, stdev_tau, stdev_unit, self.site, self.prior_sample
        )
        self.logvar_bias.copy_(torch.log(s0sq * lam[:, None] + TINY_VARIANCE))
        bias = self.gate_prior(alpha_tau) * self.prior_scale.double().clamp(min=alpha_scale_min) + self.prior_offset()
        self.alpha_bias.copy_(bias)
        return clamped

    def terms(self, static: bool = False) -> dict[str, torch.Tensor | None]:
        """The fast-form terms of §10 in float64 (differentiable in the layer's parameters); `static`: the variance
        terms kept at τ_σ = 0 too (a structure that does not depend on values, for torch.compile)."""
        f = torch.float64
        var = self.logvar_bias.to(f).exp()
        beta = var + self.noise
        m0, beta0 = self.prior_mean.to(f), self.prior_var.to(f) + self.noise
        token_const = self.alpha_bias.to(f) - 0.5 * beta.log().sum(-1)
        c0 = self.prior_log_alpha.to(f) - 0.5 * (m0 * m0 / beta0).sum(-1) - 0.5 * beta0.log().sum(-1)
        tiny = not static and bool(var.max() <= 1e-9 * self.noise)  # τ_σ = 0: √E/β = 1 and c_n = const to round-off
        return dict(
            query_scale=None if tiny else self.noise / beta,  # [G, E]
            key_weight=None if tiny else 0.5 * (1 / self.noise - 1 / beta),  # [G, E]
            prior_key=m0 * beta / beta0,  # k̃_0 divided by the query scale
            prior_c=c0 - token_const + self.prior_gate.to(f),  # [G]
            prior_value=self.prior_value,
        )


@dataclasses.dataclass(eq=False)
class KeySlot:
    """What one converted attention module needs: its site's layer, head counts and cached terms."""

    layer: KeySpaceLayer
    kind: str
    heads: int  # query heads
    head_dim: int
    scaling: float
    key_layout: str
    hook: object = None
    folded: dict | None = None
    folded_key: tuple | None = None
    mass_log: list | None = None  # record_prior_mass: (Σ a_m0, number of queries) per call
    unrotated: torch.Tensor | None = None  # training: this forward's unrotated keys [B, N, G, E]
    module: nn.Module | None = None  # the attention module: its train/eval mode decides sampling (docs/method.md §8)

    def capture(self, _module, _args, out: torch.Tensor) -> None:
        """Forward hook on the key norm (or k projection): keep the unrotated keys for KL_G in training."""
        if not self.module.training:
            self.unrotated = None
            return
        G, E = self.layer.heads, self.head_dim
        if self.key_layout == "heads_first":
            out = out.transpose(1, 2)
        self.unrotated = out.reshape(*out.shape[:2], G, E)

    def fold(self, dtype: torch.dtype) -> dict:
        """Terms in the attention's dtype, [Hq, E]-expanded where queries use them; rebuilt when anything changed."""
        static = compiling()  # traced: rebuilt in the graph, every term kept (no data-dependent shortcut)
        tensors = [*self.layer.parameters(), *self.layer.buffers()]
        grad = static or torch.is_grad_enabled() and any(t.requires_grad for t in tensors)  # then rebuilt every call
        key = None if grad else (dtype, *((0 if t.is_inference() else t._version, t.data_ptr()) for t in tensors))
        if not grad and self.folded is not None and key == self.folded_key:
            return self.folded
        t = self.layer.terms(static)
        rep = self.heads // self.layer.heads
        f = torch.promote_types(dtype, torch.float32)
        folded = dict(
            query_scale=None if t["query_scale"] is None else t["query_scale"].repeat_interleave(rep, 0).to(dtype),
            key_weight=None if t["key_weight"] is None else t["key_weight"].to(f),
            prior_key=t["prior_key"].to(dtype),
            prior_c=t["prior_c"].to(f),
            prior_value=t["prior_value"].to(dtype),
            same_c=not static and bool((t["prior_c"] == t["prior_c"][0]).all().detach()),  # one row serves all heads
            scaling=self.scaling,
        )
        if not grad:
            self.folded, self.folded_key = folded, key
        return folded


def _bias_mask(allowed: torch.Tensor | None, bias: torch.Tensor, q_len: int, dtype) -> torch.Tensor:
    """Additive mask [B, G', Q, 1+N]: the per-key bias [B, G', 1+N] where allowed, −inf elsewhere."""
    bias = bias.clamp(-C_LIMIT, C_LIMIT).to(dtype)[:, :, None, :]
    if allowed is None:
        return bias.expand(-1, -1, q_len, -1)
    allowed = F.pad(allowed, (1, 0), value=True)  # the prior is never hidden (docs/method.md §10)
    return torch.where(allowed, bias, torch.finfo(dtype).min)


def _attend(query, key, value, mask, slot: KeySlot, dropout: float, softcap: float | None, weights: bool = False):
    """Attention with an additive mask [B, G' (1 or G), Q, 1+N] over the prior and the tokens; GQA by grouping.
    Returns [B, Hq, Q, E] and, if `weights`, the attention on the tokens [B, Hq, Q, N] (the prior has the rest)."""
    G, Hq = key.shape[1], query.shape[1]
    if mask.shape[1] not in (1, Hq):
        mask = mask.repeat_interleave(Hq // G, 1)
    if softcap is None and slot.mass_log is None and not weights:
        return kernels.sdpa(query, key, value, mask, slot.scaling, dropout), None
    key, value = (t.repeat_interleave(Hq // G, 1) for t in (key, value))
    scores = (query @ key.transpose(-1, -2)).float() * slot.scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)  # the bias comes after the cap (docs/method.md §10)
    a = (scores + mask.float()).softmax(-1)
    if slot.mass_log is not None:  # queries that see some token (a padding query sees the prior alone)
        sees = (mask[..., 1:] > torch.finfo(mask.dtype).min / 2).any(-1).expand_as(a[..., 0])
        slot.mass_log.append((float(a[..., 0][sees].sum()), int(sees.sum())))
    a = (F.dropout(a, dropout) if dropout else a).to(value.dtype)
    return through_weights(a, value) if weights else (a @ value, None)


def nv_key_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
):
    """Key-space NV attention: query [B, Hq, Q, E], key/value [B, G, N, E] as the module hands them over (rotated,
    from its cache); returns ([B, Q, Hq, E], the attention on the tokens [B, Hq, Q, N] if output_attentions asks
    for it, else None)."""
    slot: KeySlot | None = getattr(module, "_nv_slot", None)
    if slot is None:  # a model that shares its config with a converted one stays stock
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    weights = wants_weights(module, kwargs)
    B, _, Q, _ = query.shape
    N = key.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] > N:
        attention_mask = attention_mask[..., -N:]
    allowed = key_mask(attention_mask, B, Q, N, bool(getattr(module, "is_causal", True)), query.device)
    dropout = dropout if module.training else 0.0
    if slot.module.training:
        out, a = _train_attention(slot, query, key, value, allowed, dropout, softcap, weights)
        return out.transpose(1, 2), a
    w = slot.fold(query.dtype)
    G, E = key.shape[1], key.shape[3]
    if w["query_scale"] is not None:
        query = query * w["query_scale"][:, None, :]
    if _can_split(query, softcap, slot, dropout) and not weights:
        return _attend_split(query, key, value, allowed, w).transpose(1, 2), None
    key = torch.cat([w["prior_key"][None, :, None, :].expand(B, G, 1, E), key], 2)
    value = torch.cat([w["prior_value"][None, :, None, :].expand(B, G, 1, E), value], 2)
    prior_c = w["prior_c"][None, :, None].expand(B, G, 1)
    if softcap is None and not weights and slot.mass_log is None:
        return _attend_bias_channel(query, key, value, allowed, prior_c, w, dropout).transpose(1, 2), None
    if w["key_weight"] is None:
        bias = F.pad(prior_c[:, :1] if w["same_c"] else prior_c, (0, N))  # [B, 1 or G, 1+N]
    else:
        c = token_bias(key[:, :, 1:], w["key_weight"])
        bias = torch.cat([prior_c, c], -1)
    mask = _bias_mask(allowed, bias, Q, query.dtype)
    out, a = _attend(query, key, value, mask, slot, dropout, softcap, weights)
    return out.transpose(1, 2), a


def _attend_bias_channel(query, key, value, allowed, prior_c, w: dict, dropout: float) -> torch.Tensor:
    """Keys/values [B, G, 1+N, E] with the prior at n = 0: the per-key bias c_n (prior_c [B, G, 1] for n = 0) rides
    in one more key channel against a query channel of 1/s, so the mask stays the boolean [B, 1, Q, 1+N] of the
    tokens (no per-head [B, G, Q, N] bias is built). -> [B, Hq, Q, E]"""
    B, G, N1, E = key.shape
    kw = w["key_weight"]
    c = key.new_zeros(()).expand(B, G, N1 - 1) if kw is None else token_bias(key[:, :, 1:], kw)
    bias = torch.cat([prior_c.to(c.dtype), c], -1).clamp(-C_LIMIT, C_LIMIT)
    key = torch.cat([key, bias[..., None].to(key.dtype)], -1)
    query = F.pad(query, (0, 1), value=1.0 / w["scaling"])
    # the prior is never hidden (docs/method.md §10)
    mask = None if allowed is None else F.pad(allowed, (1, 0), value=True)
    return kernels.sdpa(query, key, value, mask, w["scaling"], dropout)


def token_bias(key: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """docs/method.md §10: c_n = ½ Σ_p k̂²_np (1/√E − 1/β_p) of keys [B, G, N, E] (`weight` [G, E] holds
    the factor): [B, G, N]."""
    return (key.to(weight.dtype).square() * weight[:, None, :]).sum(-1)


def _can_split(query: torch.Tensor, softcap, slot: KeySlot, dropout: float) -> bool:
    """Whether the prior can be merged after a fused tokens-only pass (`masks.can_split`, no soft cap, nothing
    recorded)."""
    return can_split(query) and softcap is None and slot.mass_log is None and not dropout


def _attend_split(query, key, value, allowed, w: dict) -> torch.Tensor:
    """The same attention without copying the cache: the fused kernel attends to the tokens and returns their
    log-sum-exp l_m; the prior then enters with weight a_m0 = sigmoid(s_m0 − l_m) (as in `attention.Slot`).
    GQA without repeating keys: the R query heads of a group are folded into the query axis. -> [B, Hq, Q, E]"""
    B, Hq, Q, E = query.shape
    G, N = key.shape[1], key.shape[2]
    R = Hq // G
    q = query.reshape(B, G, R * Q, E)
    low = torch.finfo(query.dtype).min  # finite: a query that sees no token gets a_m0 = 1 (the prior alone)
    bias = None
    if w["key_weight"] is not None:
        c = token_bias(key, w["key_weight"])
        bias = c.clamp(-C_LIMIT, C_LIMIT).to(query.dtype)[:, :, None, :]
    if allowed is not None:
        bias = torch.where(allowed, query.new_zeros(()) if bias is None else bias, low)
    if bias is not None:
        bias = bias.expand(B, -1, Q, N).repeat(1, 1, R, 1)  # query axis r·Q + q, as in `q`
    out, lse = FLASH_CPU(q, key, value, attn_mask=bias, scale=w["scaling"])
    s0 = (q @ w["prior_key"][:, :, None]).squeeze(-1) * w["scaling"] + w["prior_c"][None, :, None]  # [B, G, R·Q]
    a0 = torch.sigmoid(s0.to(lse.dtype) - lse).to(out.dtype)
    out = torch.lerp(out, w["prior_value"][None, :, None, :], a0[..., None])
    return out.reshape(B, Hq, Q, E)


def _train_attention(slot: KeySlot, query, key, value, allowed, dropout: float, softcap, weights: bool = False):
    """docs/method.md §8 in key space: sampled keys k̃ = k̂ + σ ⊙ ε (σ is constant on rotary pairs, so this has the law
    of R_n(μ_n + σε)), scores s·q̂·k̃ + log γ − ‖k̃‖²/(2√E); the prior's key sampled from N(m_0, s_0²); KL terms."""
    layer, B, G, N, E = slot.layer, key.shape[0], key.shape[1], key.shape[2], key.shape[3]
    f = torch.promote_types(key.dtype, torch.float32)
    k32 = key.to(f)
    sigma = (0.5 * layer.logvar_bias).exp().to(f)[None, :, None, :]
    k_t = k32 + sigma * torch.randn_like(k32)
    log_alpha = k32.square().sum(-1) / (2 * layer.noise) + layer.alpha_bias.to(f)[None, :, None]  # ‖k̂‖ = ‖k‖
    bias = sample_log_gamma(log_alpha) - k_t.square().sum(-1) / (2 * layer.noise)  # [B, G, N]
    m0, s0 = layer.prior_mean.to(f), layer.prior_var.to(f).sqrt()
    k0 = m0 + s0 * torch.randn(B, G, E, dtype=f, device=key.device)
    bias0 = sample_log_gamma(layer.prior_log_alpha.to(f).expand(B, G)) - k0.square().sum(-1) / (2 * layer.noise)
    bias0 = bias0 + layer.prior_gate.to(f)
    keys = torch.cat([k0[:, :, None], k_t], 2).to(key.dtype)
    values = torch.cat([layer.prior_value.to(value.dtype)[None, :, None].expand(B, G, 1, E), value], 2)
    mask = _bias_mask(allowed, torch.cat([bias0[..., None], bias], -1), query.shape[2], query.dtype)
    out = _attend(query, keys, values, mask, slot, dropout, softcap, weights)
    _set_kl(slot, log_alpha, allowed, B, N)
    return out


def _set_kl(slot: KeySlot, log_alpha: torch.Tensor, allowed, B: int, N: int) -> None:
    """KL_G and KL_D (docs/method.md §8) per sequence and head, from the unrotated keys μ_n = k_n, averaged."""
    layer, mu = slot.layer, slot.unrotated
    if mu is None or mu.shape[:2] != (B, N):
        raise RuntimeError(
            f"site {layer.site}: training-mode NV attention needs the keys of this forward pass; training on top of "
            "a filled KV cache is not supported (pass use_cache=False)"
        )
    G, E = layer.heads, layer.head_dim
    valid = torch.ones(B, N, dtype=torch.bool, device=mu.device) if allowed is None else allowed[:, 0].any(1)
    valid = valid.repeat_interleave(G, 0)  # [B·G, N]
    mu = mu.transpose(1, 2).reshape(B * G, N, E).to(log_alpha.dtype)
    logvar = layer.logvar_bias.to(mu.dtype).repeat(B, 1)[:, None, :].expand_as(mu)
    prior = dict(
        prior_mean=layer.prior_mean.repeat(B, 1)[:, None, :],
        prior_var=layer.prior_var.repeat(B, 1)[:, None, :],
        prior_log_alpha=layer.prior_log_alpha.repeat(B),
    )
    la = log_alpha.reshape(B * G, N)
    layer.kl_gaussian = kl_gaussian(mu, logvar, la, valid, **prior).mean()
    layer.kl_dirichlet = kl_dirichlet(la, valid, prior["prior_log_alpha"]).mean()


def register() -> None:
    """Make "nvib-key" selectable by `model.set_attn_implementation` (docs/method.md §9)."""
    AttentionInterface.register(ATTN_NAME, nv_key_attention)
    AttentionMaskInterface.register(ATTN_NAME, nv_mask)


def site_shape(site: Site) -> tuple[int, int]:
    """(key/value heads G, head size E) of a key-space site."""
    E = int(getattr(site.module, site.arch.head_dim_attr))
    return site.key_projection.weight.shape[0] // E, E


def install(site: Site, layer: KeySpaceLayer) -> KeySlot:
    """Route one attention module through key-space NV attention; `uninstall` reverts it."""
    module, arch = site.module, site.arch
    E = int(getattr(module, arch.head_dim_attr))
    heads = getattr(module, arch.q).weight.shape[0] // E
    slot = KeySlot(layer, site.kind, heads, E, float(module.scaling), arch.key_layout, module=module)
    slot.hook = getattr(module, arch.key_source).register_forward_hook(slot.capture)
    object.__setattr__(module, "_nv_slot", slot)
    return slot


def uninstall(site: Site) -> None:
    slot: KeySlot = site.module.__dict__.pop("_nv_slot")
    slot.hook.remove()
