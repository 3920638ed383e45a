"""What z-space (`attention`) and key-space (`keyspace`) NV attention share: masks over the tokens, the test for the
CPU split path (the prior merged after a fused tokens-only kernel call, by its log-sum-exp; docs/method.md §6, §9), and
the attention weights that transformers asks for."""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from nvib.core import kernels

try:  # transformers' collector of outputs (attention weights, hidden states) recorded by forward hooks
    from transformers.utils.output_capturing import _active_collector as _COLLECTOR
except ImportError:  # a transformers without one: the argument and the config decide
    _COLLECTOR = None

# Evaluation on CPU attends to the tokens with the fused kernel that also returns the log-sum-exp of the scores, and
# merges the prior component afterwards (`Slot.attend_split`): no per-call copy of the keys and values with the prior
# prepended. False (or another device, training, per-token variances, or gradients: the kernel's backward ignores the
# log-sum-exp's gradient, through which a_m0 depends on q and k) prepends the prior instead; tests compare both.
SPLIT_PRIOR = True
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
SPLIT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# masks made by `nv_mask` (new in every forward, never updated in place) -> (what the bias was made for, bias)
_SPLIT_BIAS = WeakIdKeyDictionary()


def wants_weights(module: torch.nn.Module, kwargs: dict) -> bool:
    """Whether an attention call is to return its weights: its `output_attentions` argument; else whether the model's
    output-capturing hooks are recording attentions in this forward (transformers 5 collects them from each attention
    module's output, passing the module nothing: GPT-2 drops the argument; its eager attention always returns them);
    else the module's config (`config.output_attentions`)."""
    asked = kwargs.get("output_attentions")
    if asked is None:
        asked = recording_attentions()
    if asked is None:
        asked = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(asked)


def recording_attentions() -> bool | None:
    """Whether the output-capturing forward running now records attention weights (any "...attentions" output);
    None outside one."""
    if _COLLECTOR is None or (compiling() and not getattr(_COLLECTOR, "compiling", False)):
        return None  # torch.compile traces the collector only once a compiled forward has set it
    collected = _COLLECTOR.get()
    if collected is None:
        return None
    return any(key.endswith("attentions") for key in collected)


def through_weights(a: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention a [B, H, Q, 1+N] (prior at n = 0) of values [B, H, 1+N, C] -> (output, the weights on the tokens),
    the output computed from those weights, so that their gradient is the output's (as in transformers' eager
    attention, whose tests retain it)."""
    tokens = a[..., 1:]
    return tokens @ value[..., 1:, :] + a[..., :1] * value[..., :1, :], tokens


def compiling() -> bool:
    """Whether torch.compile is tracing: then no memos keyed by tensor identity or version (they break the graph)."""
    return torch.compiler.is_compiling()


def key_mask(mask: torch.Tensor | None, batch: int, q_len: int, n_tokens: int, is_causal: bool, device):
    """A boolean [B, 1, Q, N] mask (True = attend) over the tokens, or None for no mask."""
    if mask is None:
        if not is_causal or q_len == 1:
            return None
        return torch.ones(q_len, n_tokens, dtype=torch.bool, device=device).tril(n_tokens - q_len)[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def can_split(query: torch.Tensor) -> bool:
    """Whether the prior may be merged after the fused CPU kernel's tokens-only pass (`SPLIT_PRIOR`): on CPU, in a
    dtype the kernel takes, and without gradients (its backward ignores the log-sum-exp's gradient)."""
    return (
        SPLIT_PRIOR
        and FLASH_CPU is not None
        and not torch.is_grad_enabled()
        and kernels.device_type(query) == "cpu"
        and query.dtype in SPLIT_DTYPES
    )


def split_bias(mask, position_bias, query: torch.Tensor, n_tokens: int, is_causal: bool):
    """The tokens' additive bias [., ., Q, N] for the split kernel call (finite, so that a query that sees no token
    gets a_m0 = 1) and the prior's ([., ., Q, 1] or None). The model hands every layer the mask `nv_mask` made for
    this forward, so the bias made from it is kept with it rather than rebuilt in each layer; a mask from anywhere
    else (a user's 4D mask may be a buffer refilled in place) is converted each time."""
    B, _, Q, _ = query.shape
    made_for = (n_tokens, Q, query.dtype)
    ours = mask is not None and position_bias is None and not compiling() and mask in _SPLIT_BIAS
    kept = _SPLIT_BIAS[mask] if ours else None
    if kept is not None and kept[0] == made_for:
        return kept[1], None
    keys = mask if mask is None or mask.shape[-1] <= n_tokens else mask[..., -n_tokens:]
    allowed = key_mask(keys, B, Q, n_tokens, is_causal, query.device)
    bias = prior_bias = None
    low = torch.finfo(query.dtype).min
    if position_bias is not None:
        position_bias = position_bias.to(query.dtype)
        bias = position_bias[..., -n_tokens:]
        prior_bias = position_bias[..., :1] if position_bias.shape[-1] == n_tokens + 1 else None
        bias = bias if allowed is None else torch.where(allowed, bias, low)
    elif allowed is not None:
        bias = torch.where(allowed, query.new_zeros(()), low)
    if ours:
        _SPLIT_BIAS[mask] = (made_for, bias)
    return bias, prior_bias


def nv_mask(*args, stock=sdpa_mask, **kwargs):
    """The mask NV attention is given: the implementation's own, never skipped for a causal one (`key_mask` would
    then rebuild it in every layer), and marked as made for this forward (`split_bias` may keep what it makes from
    it)."""
    kwargs["allow_is_causal_skip"] = False
    mask = stock(*args, **kwargs)
    if mask is not None and not compiling():
        _SPLIT_BIAS[mask] = None
    return mask


# ---- the masks of a converted model whose config keeps the user's implementation name -----------------------------

HOSTS = {"sdpa": sdpa_mask, "eager": eager_mask}  # implementations a converted model's config may name
# id of a config read by converted models' mask builders -> how many converted models read it (ids, not a weak
# dictionary: torch.compile traces the lookup; an id reused by a config freed without `unload` only costs its model
# the causal-mask skip, since `nv_mask` makes the host's own mask)
_NV_CONFIGS: dict[int, int] = {}


def host_mask(stock):
    """The mask function registered for host implementation `stock` ("sdpa"/"eager"): transformers picks masks by
    the config's implementation name and passes the config along, so the configs of converted models get `nv_mask`
    in the host's own format (so a stock model sharing the config reads them too), every other model the stock mask."""

    def mask(*args, config=None, **kwargs):
        if config is not None and id(config) in _NV_CONFIGS:
            return nv_mask(*args, stock=stock, config=config, **kwargs)
        return stock(*args, config=config, **kwargs)

    mask.nv_host = stock
    return mask


def register_hosts() -> None:
    """Register `host_mask` for "sdpa" and "eager" (once; a stock model's masks stay the stock ones)."""
    for name, stock in HOSTS.items():
        if getattr(AttentionMaskInterface._global_mapping.get(name), "nv_host", None) is not stock:
            AttentionMaskInterface.register(name, host_mask(stock))


def mark_configs(configs, converted: bool) -> None:
    """Count `configs` as read (or no longer read) by a converted model's mask builders."""
    for config in configs:
        count = _NV_CONFIGS.get(id(config), 0) + (1 if converted else -1)
        if count > 0:
            _NV_CONFIGS[id(config)] = count
        else:
            _NV_CONFIGS.pop(id(config), None)
