"""NV attention inside transformers' attention modules (docs/method.md §6, §8, §9).

The module's own code keeps running. Its q/k/v projections are replaced (instance `forward`) by ones
that emit, per head, E+1 channels: the transformed query/key/value of the fast form plus one
channel carrying the per-key score bias c_n (keys), a constant 1/s (queries) and the prior
indicator (values, so the output reads the prior's attention weight a_m0). The module's head size
attribute is set to E+1 so its reshapes and its KV cache carry those channels unchanged. The
registered attention function "nvib" then prepends the prior component and calls
`scaled_dot_product_attention`. The prior never enters the cache (the self-attention cache length
drives positions); for cross-attention, whose cached keys do not change between decoding steps,
the keys and values with the prior prepended are kept until the cache hands over new ones.

Layers with per-token variances (after fine-tuning) need the general form (docs/method.md §4): the scores are
still standard attention over per-token k̃_n and c_n, but the output gains W_v[(Σ_n a_mn σ²_n/β_n) ⊙ W_kᵀq_m].
The per-token ratios σ²_n/β_n (size P) ride in `spare` extra channels per head of the keys and values
(half in each), so they live in the ordinary KV cache and follow its beam reordering.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from nvib.core import kernels
from nvib.core.architectures import Site
from nvib.core.channels import HeadLayout
from nvib.core.diagnostics import log_prior_mass
from nvib.core.layer import NVIBLayer
from nvib.core.masks import FLASH_CPU, can_split, key_mask, nv_mask, split_bias, through_weights, wants_weights
from nvib.core.memo import CallState, FoldMemo, PairMemo

ATTN_NAME = "nvib"
GENERAL_CHUNK = 1 << 22  # elements of the general form's per-head-group temporaries (16 MB in float32)


@dataclasses.dataclass(eq=False, kw_only=True)
class Slot(HeadLayout):
    """One converted attention module: its site's layer, its pretrained projections and what its calls keep."""

    layer: NVIBLayer
    kind: str
    scaling: float
    proj: tuple[nn.Module, ...]  # (q, k, v) or (fused,)
    fused: bool
    module: nn.Module  # the attention module: its train/eval mode is the NV layer's at this module
    mass_log: list | None = None  # `record_prior_mass`: (Σ a_m0, number of queries) per call
    # cross-attention: (the cached key, held weakly; the weights) -> keys and values with the prior prepended
    with_prior: PairMemo = dataclasses.field(default_factory=lambda: PairMemo(weak=True))
    hooks: list = dataclasses.field(default_factory=list)  # `load_state_dict` post-hooks dropping the fold memo

    def __post_init__(self) -> None:
        self.folds = FoldMemo(self.tensors, self.fast_weights, probe="prior_k")  # bound methods: deepcopy rebinds
        self.call = CallState(self.folds)

    def fast_weights(self, static: bool = False) -> dict:
        return fast_weights(self, static)

    @property
    def training(self) -> bool:
        """Sampling (docs/method.md §8) follows the attention module's mode, so
        `model.get_decoder().eval()` reaches it."""
        return self.module.training

    def qkv_weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The pretrained projections as [out, in] weights and biases."""
        if not self.fused:
            return [(p.weight, p.bias) for p in self.proj]
        conv = self.proj[0]  # transformers Conv1D: weight [in, out]
        P = self.heads * self.head_dim
        return [
            (
                conv.weight[:, i * P : (i + 1) * P].t(),
                None if conv.bias is None else conv.bias[i * P : (i + 1) * P],
            )
            for i in range(3)
        ]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the folded weights depend on (read from the modules each time: `.to()` replaces buffers)."""
        layer = self.layer
        own = (t for p in self.proj for t in (p.weight, p.bias) if t is not None)
        return (*own, *layer._parameters.values(), *layer._buffers.values())

    def refresh(self) -> None:
        """Fold again now where a memo exists (`nvib.configure` calls it), so a compiled model reads the new knobs."""
        self.folds.refresh()

    def splits(self, query: torch.Tensor, weights: bool) -> bool:
        """Whether this call merges the prior after a tokens-only kernel call (`attend_split`; `masks.can_split`)."""
        return can_split(query) and not self.spare and not self.training and not weights

    # ---- projections ------------------------------------------------------------------------

    def project(self, which: str, x: torch.Tensor) -> torch.Tensor:
        """Replacement forward of the q, k or v projection (or "qkv" for a fused one): [B, N, H·width]."""
        if self.fused:
            return torch.cat([self._project1(w, x) for w in "qkv"], dim=-1)
        return self._project1(which, x)

    def _linear(self, which: str, x: torch.Tensor) -> torch.Tensor:
        """The pretrained projection, [..., H, E]."""
        if self.fused:
            w, b = self.qkv_weights()["qkv".index(which)]
        else:
            p = self.proj["qkv".index(which)]
            w, b = p.weight, p.bias
        return F.linear(x, w, b).view(*x.shape[:-1], self.heads, self.head_dim)

    def _project1(self, which: str, x: torch.Tensor) -> torch.Tensor:
        if which == "q":
            self.call.begin(self.training)
            return self.with_channel(self._linear("q", x), 1.0 / self.scaling)
        if self.training:
            return self._project_train(which, x)
        w = self.call.weights()
        if w["general"]:
            t = self.layer.token_terms(x)
            first, second = self.split_ratio(t.ratio)
            z = t.point.to(x.dtype)
            if which == "v":
                return self.with_channel(self._linear("v", z), 0.0, second)
            return self.with_channel(self._linear("k", z), t.c, first)
        z = self._key_point(x, w)
        if which == "v":
            return self.with_channel(self._linear("v", z), 0.0)
        c = key_bias(x, w)
        return self.with_channel(self._linear("k", z), 0.0 if c is None else c)

    def _key_point(self, x: torch.Tensor, w: dict) -> torch.Tensor:
        """key_scale ⊙ x + key_shift [..., D], made once per call for the key and the value projections of x."""
        if w["scale"] is None:
            return x
        z = self.call.point.get(x, w)
        if z is None:
            z = torch.addcmul(w["shift"], x, w["scale"])
            self.call.point.keep(x, w, z)
        return z

    def _project_train(self, which: str, x: torch.Tensor) -> torch.Tensor:
        """docs/method.md §8: keys/values of a sampled z̃, with log γ − ‖z̃‖²/(2√E) as the key's bias channel."""
        z_t, bias, prior_z, prior_bias = self.layer.sample(x, (id(self), which))
        if which == "k":
            out, prior = (
                self.with_channel(self._linear("k", z_t), bias),
                self.with_channel(self._linear("k", prior_z), prior_bias),
            )
        else:
            out, prior = (
                self.with_channel(self._linear("v", z_t), 0.0),
                self.with_channel(self._linear("v", prior_z), 1.0),
            )
        kv = list(self.call.prior_kv or (None, None))
        kv["kv".index(which)] = prior.view(x.shape[0], self.heads, 1, -1)  # [B, H, 1, E+1]
        self.call.prior_kv = tuple(kv)
        return out

    # ---- attention --------------------------------------------------------------------------

    def prepend_prior(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, N, E+1] with the prior component at n = 0."""
        if self.training:
            prior_k, prior_v = self.call.prior_kv
        else:
            w = self.call.last
            kept = self.with_prior.get(key, w)
            if kept is not None:
                return kept
            B = key.shape[0]
            prior_k, prior_v = (w[n].view(1, self.heads, 1, -1).expand(B, -1, -1, -1) for n in ("prior_k", "prior_v"))
        out = torch.cat([prior_k, key], 2), torch.cat([prior_v, value], 2)
        if self.kind == "cross" and not self.training:
            self.with_prior.keep(key, w, out)
        return out

    def attend_split(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, prior_bias
    ) -> torch.Tensor:
        """Fast-form attention over the prior and the tokens, without concatenating them (`attend_split`)."""
        return attend_split(self, query, key, value, bias, prior_bias)

    def general_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, want_weights=False):
        """The general form with per-token variances, docs/method.md §4 (`general_attention`)."""
        return general_attention(self, query, key, value, mask, want_weights)

    def correct(self, out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """The attention output over prior and tokens [B, H, Q, E+1] (a_m0 in the last channel) → the corrected
        head outputs [B, Q, H, E] (docs/method.md §6)."""
        out, E = out.transpose(1, 2), self.head_dim
        o, a0 = out[..., :E], out[..., E : E + 1]
        log_prior_mass(self.mass_log, a0)
        if self.training:
            return o
        B, Q, H, E = o.shape
        q = query.transpose(1, 2)[..., :E].reshape(B * Q, H, E).transpose(0, 1)  # [H, B·Q, E]
        # o holds (1 − a_m0)·o_tokens + a_m0·ṽ_0 already: add G q + a_m0·(G_0 − G) q (q_terms without its ṽ_0 row)
        gq, d = products(self, torch.bmm(q, self.call.last["q_terms"][:, :E]), B, Q)
        o = torch.addcmul(o, a0, d)
        return o if gq is None else o.add_(gq)


# ---- the fast form's formulas (docs/method.md §6) and the general form's (§4) -------------------


def fast_weights(slot: Slot, static: bool = False) -> dict:
    """The fast form's small per-site/per-module tensors; the pretrained weights are used as they are. `static`:
    every term kept (none skipped for being 0 or 1), so the structure does not depend on the values (torch.compile)."""
    (_, _), (wk, bk), (wv, bv) = slot.qkv_weights()
    dtype, H, E = wk.dtype, slot.heads, slot.head_dim
    t = slot.layer.fast_terms()  # float64
    f = torch.promote_types(dtype, torch.float32)
    wk64, wv64 = wk.to(torch.float64), wv.to(torch.float64)
    bk64 = torch.zeros(H * E, dtype=torch.float64, device=wk.device) if bk is None else bk.to(torch.float64)
    bv64 = torch.zeros(H * E, dtype=torch.float64, device=wk.device) if bv is None else bv.to(torch.float64)
    prior_k = torch.cat([(wk64 @ t.prior_point + bk64).view(H, E), t.prior_c.expand(H, 1)], 1)
    prior_v = torch.cat([(wv64 @ t.prior_point + bv64).view(H, E), torch.ones_like(prior_k[:, :1])], 1)
    zeros = prior_k.new_zeros(H, slot.pad)  # the zero channels after E+1 (and the spare ones)
    wk_h, wv_h = wk64.view(H, E, -1), wv64.view(H, E, -1)
    if slot.spare:  # general form: the prior's σ²/β rides in the spare channels like the tokens'
        first, second = slot.split_ratio(t.prior_ratio)
        return dict(
            general=True,
            prior_k=torch.cat([prior_k, first.to(prior_k.dtype), zeros], 1).to(dtype),
            prior_v=torch.cat([prior_v, second.to(prior_k.dtype), zeros], 1).to(dtype),
            wk_h=wk.view(H, E, -1).to(f),  # u = W_kᵀ q per head
            wv_h=wv.view(H, E, -1).transpose(1, 2).to(f),
        )
    # G = W_v diag(σ²/β) W_kᵀ per head; the prior's G_0 enters weighted by a_m0, the tokens' by 1 − a_m0.
    g0 = (wv_h * t.prior_ratio) @ wk_h.transpose(1, 2)
    g = (wv_h * t.ratio) @ wk_h.transpose(1, 2) if static or bool(t.ratio.max() > 1e-9) else None
    key_scale, key_shift = t.key_scale.to(dtype), t.key_shift.to(dtype)
    g_t, d_t = (None if g is None else g.transpose(1, 2)), (g0 if g is None else g0 - g).transpose(1, 2)
    quad = static or bool(t.c_quad.abs().max() > 1e-6 * slot.layer.alpha_w2.abs().max())
    scale = key_scale if static or not bool((key_scale == 1).all()) else None
    shift = key_shift if static or not bool((key_shift == 0).all()) else None
    # [s_m0 | G q | (G_0 − G) q + ṽ_0] = q @ q_terms per head, q with its 1/s channel (which reads ṽ_0·s in row E)
    # and its zero channels: [H, width, 1 + 2E] (1 + E without G)
    prior_k, prior_v = torch.cat([prior_k, zeros], 1), torch.cat([prior_v, zeros], 1)
    d_v = F.pad(torch.cat([d_t, prior_v[:, None, :E] * slot.scaling], 1), (0, 0, 0, slot.pad))
    parts = [
        (prior_k * slot.scaling)[:, :, None],
        *([] if g is None else [F.pad(g_t, (0, 0, 0, 1 + slot.pad))]),
        d_v,
    ]
    q_terms = torch.cat(parts, 2)
    return dict(
        general=False,
        # k̃ = W_k(key_scale ⊙ z + key_shift) + b_k: transform z, not the weights (docs/method.md §6 with W_μ = τ_μ I)
        scale=scale if scale is not None or shift is None else torch.ones_like(shift),
        shift=shift if shift is not None or scale is None else torch.zeros_like(scale),
        c_lin=t.c_lin.to(f) if static or bool(t.c_lin.abs().max() > 0) else None,
        # w_2 − τ_μ²/(2β) is 0 at τ_σ = 0 but for float round-off of w_2: then skip the z⊙z pass
        c_quad=t.c_quad.to(f) if quad else None,
        prior_k=prior_k.to(dtype),
        prior_v=prior_v.to(dtype),
        prior_v_e=prior_v[:, :E].to(dtype),
        q_terms=q_terms.to(dtype),
        has_g=g is not None,
    )


def key_bias(x: torch.Tensor, w: dict) -> torch.Tensor | None:
    """The per-key score bias c_n = c_lin·x + c_quad·(x⊙x) [...] of key vectors x [..., D] (None where both terms are
    skipped: c_n is then the same for every key)."""
    x32, c = x.to(torch.promote_types(x.dtype, torch.float32)).flatten(0, -2), None  # c_n per token [B·N]
    if w["c_lin"] is not None:
        c = x32 @ w["c_lin"]
    if w["c_quad"] is not None:
        c = (x32 * x32) @ w["c_quad"] if c is None else torch.addmv(c, x32 * x32, w["c_quad"])
    return None if c is None else c.view(x.shape[:-1])


def attend_split(
    slot: Slot, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, prior_bias
) -> torch.Tensor:
    """Fast-form attention over the prior and the tokens, without concatenating them: q/k/v [B, H, *, E+1]
    (tokens only), `bias` the tokens' additive mask/bias [., ., Q, N] (finite), `prior_bias` the prior's or None.
    Returns the corrected head outputs [B, Q, H, E].

    With l_m = log Σ_n≥1 exp(s_mn) from the kernel, the prior's weight is a_m0 = sigmoid(s_m0 − l_m) and
    (1 − a_m0)·(token output) + a_m0·ṽ_0 is exactly softmax over n = 0..N (docs/method.md §6); the query correction
    follows. Everything after the kernel works on its output in place, in the [B, Q, H, ·] layout the kernel
    writes, so the only new [B, Q, H, E]-sized tensors are G q (one batched product) and the result.
    """
    w = slot.call.last
    out, lse = FLASH_CPU(query, key, value, attn_mask=bias, scale=slot.scaling)
    B, H, Q, C = query.shape
    q = query.transpose(1, 2).reshape(B * Q, H, C).transpose(0, 1)  # [H, B·Q, width], a view
    lse = lse.transpose(0, 1)  # [H, B, Q]
    if prior_bias is not None:
        lse = lse - prior_bias.squeeze(-1).expand(B, H, Q).transpose(0, 1)
    terms = torch.bmm(q, w["q_terms"])  # [H, B·Q, 1 + ·]: s_m0, then the correction's products
    s0 = terms[..., 0].view(H, B, Q)
    a0 = (s0 if s0.dtype == lse.dtype else s0.to(lse.dtype)).sub_(lse).sigmoid_()
    a0 = (a0 if a0.dtype == out.dtype else a0.to(out.dtype)).permute(1, 2, 0)[..., None]  # [B, Q, H, 1]
    log_prior_mass(slot.mass_log, a0)
    # (1 − a_m0)·(o + G q) + a_m0·(ṽ_0 + G_0 q) = lerp(o, ṽ_0 + (G_0 − G) q, a_m0) + G q
    gq, dv = products(slot, terms, B, Q)
    o = out.transpose(1, 2)[..., : slot.head_dim].lerp_(dv, a0)  # [B, Q, H, E], in the kernel's output
    return o if gq is None else o.add_(gq)


def products(slot: Slot, terms: torch.Tensor, B: int, Q: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`terms` = q @ q_terms [H, B·Q, 1 + ·] -> (G q or None, ṽ_0 + (G_0 − G) q), each [B, Q, H, E] (without ṽ_0
    when q lacks its 1/s channel)."""
    H, E = slot.heads, slot.head_dim
    r = terms[..., 1:].transpose(0, 1).view(B, Q, H, -1)
    return (r[..., :E], r[..., E:]) if slot.call.last["has_g"] else (None, r)


def general_attention(slot: Slot, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, want_weights):
    """docs/method.md §4 with per-token variances: q/k/v [B, H, *, width] (prior at n = 0) -> [B, Q, H, E] and, if
    `want_weights`, the attention on the tokens [B, H, Q, N] (else None).

    Costs eager attention plus B·H·Q·(N+1)·P multiply-adds for Σ_n a_mn σ²_n/β_n and 2·B·H·Q·E·P for the lift
    u = W_kᵀq and the projection back: the lifting the fast form avoids. Heads go in groups, each group's
    products as single batched matrix products, sized so that the [B, heads, Q, P] temporaries stay near
    `GENERAL_CHUNK` elements (all heads at once when decoding one token).
    """
    w = slot.call.last
    E, E1 = slot.head_dim, slot.head_dim + 1
    f = torch.promote_types(query.dtype, torch.float32)
    scores = query[..., :E1].to(f) @ key[..., :E1].to(f).transpose(-1, -2) * slot.scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.to(f)
    a = scores.softmax(-1)  # [B, H, Q, N+1]
    out = a @ value[..., :E1].to(f)
    log_prior_mass(slot.mass_log, out[..., E])
    ratio, q = slot.gather_ratio(key, value, slot.layer.dim).to(f), query[..., :E].to(f)  # [B, N+1, P], [B, H, Q, E]
    B, H, Q, N1 = a.shape
    P = ratio.shape[-1]
    o = out[..., :E].transpose(1, 2).contiguous()  # [B, Q, H, E]
    step = max(1, min(H, GENERAL_CHUNK // (B * Q * P)))
    for h0 in range(0, H, step):
        hs = slice(h0, min(H, h0 + step))
        n = hs.stop - hs.start
        weights = (a[:, hs].reshape(B, n * Q, N1) @ ratio).view(B, n, Q, P)  # Σ_n a_mn σ²_n/β_n
        u = torch.bmm(q[:, hs].transpose(0, 1).reshape(n, B * Q, E), w["wk_h"][hs])  # W_kᵀ q, [n, B·Q, P]
        u.view(n, B, Q, P).mul_(weights.transpose(0, 1))
        o[:, :, hs] += torch.bmm(u, w["wv_h"][hs]).view(n, B, Q, E).permute(1, 2, 0, 3)
    return o.to(query.dtype), a[..., 1:].to(query.dtype) if want_weights else None


def nv_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
):
    """NV attention: q/k/v [B, H, *, E+1] from `Slot.project`; returns ([B, Q, H, E], the attention on the tokens
    [B, H, Q, N] if output_attentions asks for it (the prior has the rest of each row), else None)."""
    slot: Slot | None = getattr(module, "_nv_slot", None)
    if slot is None:  # a model that shares its config with a converted one stays stock
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            position_bias=position_bias, **kwargs,
        )  # fmt: skip
    weights = wants_weights(module, kwargs)
    if not slot.training:
        slot.call.end()
    B, _, Q, _ = query.shape
    if slot.splits(query, weights):
        causal = bool(getattr(module, "is_causal", False))
        bias, prior_bias = split_bias(attention_mask, position_bias, query, key.shape[2], causal)
        return slot.attend_split(query, key, value, bias, prior_bias), None
    key, value = slot.prepend_prior(key, value)
    if slot.spare and slot.training:  # sampling (docs/method.md §8) needs no ratios
        query, key, value = (t[..., : slot.head_dim + 1] for t in (query, key, value))
    n_tokens = key.shape[2] - 1
    if attention_mask is not None and attention_mask.shape[-1] > n_tokens:
        attention_mask = attention_mask[..., -n_tokens:]  # some models size masks by the cache incl. prior
    allowed = key_mask(attention_mask, B, Q, n_tokens, bool(getattr(module, "is_causal", False)), query.device)
    if slot.training:
        slot.layer.compute_kl(None if allowed is None else allowed[:, 0].any(1).expand(B, -1))
    mask = None
    if allowed is not None:
        mask = F.pad(allowed, (1, 0), value=True)
    if position_bias is not None:
        bias = position_bias if position_bias.shape[-1] == n_tokens + 1 else F.pad(position_bias, (1, 0))
        bias = bias.to(query.dtype)
        mask = bias if mask is None else torch.where(mask, bias, torch.finfo(query.dtype).min)
    if slot.spare and not slot.training:
        return slot.general_attention(query, key, value, mask, weights)
    dropout = dropout if module.training else 0.0
    if weights:
        out, a = explicit_attention(query, key, value, mask, slot.scaling, dropout)
        return slot.correct(out, query), a
    out = kernels.sdpa(query, key, value, mask, slot.scaling, dropout)
    return slot.correct(out, query), None


def explicit_attention(query, key, value, mask, scale: float, dropout: float = 0.0):
    """Softmax attention with its weights, for output_attentions: q/k/v [B, H, *, C] with the prior at n = 0, `mask`
    boolean or additive [., ., Q, 1+N] -> ([B, H, Q, C], the attention on the tokens [B, H, Q, N])."""
    f = torch.promote_types(query.dtype, torch.float32)
    scores = query.to(f) @ key.to(f).transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.to(f)
    a = (F.dropout(scores.softmax(-1), dropout) if dropout else scores.softmax(-1)).to(query.dtype)
    return through_weights(a, value)


def register() -> None:
    """Make "nvib" selectable by `model.set_attn_implementation` (docs/method.md §9)."""
    AttentionInterface.register(ATTN_NAME, nv_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, nv_mask)


def mpnet_forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kw):
    """MPNetSelfAttention does not use the attention interface; this forward routes it through NV attention."""
    slot: Slot = self._nv_slot
    shape = (*hidden_states.shape[:-1], -1, slot.width)
    q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in (self.q, self.k, self.v))
    out, _ = nv_attention_forward(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=self.dropout.p,
        scaling=slot.scaling,
        position_bias=position_bias,
    )
    return (self.o(out.reshape(*hidden_states.shape[:-1], -1)),)


def install(site: Site, layer: NVIBLayer) -> Slot:
    """Route one attention module through NV attention; `uninstall` reverts it."""
    module, arch = site.module, site.arch
    E = getattr(module, arch.head_dim_attr)
    scaling = float(getattr(module, "scaling", E**-0.5))
    fused = arch.fused_qkv is not None
    proj = (getattr(module, arch.fused_qkv),) if fused else tuple(getattr(module, n) for n in (arch.q, arch.k, arch.v))
    heads = proj[0].weight.shape[0 if not fused else 1] // (E * (3 if fused else 1))
    spare = math.ceil(layer.dim / (2 * heads)) if layer.per_token_variance else 0
    # converted on a GPU, the width is rounded up with zero channels to the head size the fused kernels take, so the
    # cache holds that width and no call pads (`kernels.sdpa` still pads a CPU-converted model moved to a GPU)
    device = kernels.device_type(proj[0].weight)  # (a model on the meta device is not aligned: its device is unknown)
    pad = -(E + 1 + spare) % kernels.ALIGN if device != "meta" and kernels.needs_fused_shapes(device) else 0
    slot = Slot(
        layer=layer, kind=site.kind, heads=heads, head_dim=E, scaling=scaling, proj=proj, fused=fused, spare=spare,
        pad=pad, module=module,
    )  # fmt: skip
    object.__setattr__(module, "_nv_slot", slot)
    slot.hooks = slot.folds.watch(module, layer)
    setattr(module, arch.head_dim_attr, slot.width)
    if fused:
        module.split_size = heads * slot.width
        proj[0].forward = functools.partial(slot.project, "qkv")
    else:
        for which, p in zip("qkv", proj, strict=True):
            p.forward = functools.partial(slot.project, which)
    if not arch.uses_attention_interface:
        module.forward = functools.partial(mpnet_forward, module)
    return slot


def uninstall(site: Site) -> None:
    module, arch = site.module, site.arch
    slot: Slot = module.__dict__.pop("_nv_slot")
    for hook in slot.hooks:
        hook.remove()
    setattr(module, arch.head_dim_attr, slot.head_dim)
    if slot.fused:
        module.split_size = slot.heads * slot.head_dim
    for p in slot.proj:
        p.__dict__.pop("forward", None)
    module.__dict__.pop("forward", None)
