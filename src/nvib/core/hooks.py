"""The hooks that keep a converted model a transformers model: each converted attention module's config view pinned
to NV attention (`PinnedConfig`), the configs' implementation names and NV's masks (`host_attention`), and instance
overrides of `save_pretrained`, `set_attn_implementation` and `_init_weights` (`hook_model`). `nvib.convert` installs
them and `nvib.unload` removes them; docs/transformers.md says what they are for."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from nvib.core import attention, keyspace, masks, saving
from nvib.core.architectures import Site
from nvib.core.layer import LAYERS

__all__ = [
    "HOSTS",
    "PinnedConfig",
    "hook_model",
    "host_attention",
    "pin_attention",
    "restore_attention",
    "unhook_model",
    "unpin_attention",
]

HOSTS = tuple(masks.HOSTS)  # implementations a user may ask for that NV attention stands in for ("sdpa", "eager")


class PinnedConfig:
    """A converted attention module's view of its model's config: every attribute read through, but the attention
    implementation pinned to NV's, so `config._attn_implementation = "eager"` (assisted decoding, transformers'
    tests) or `set_attn_implementation` never hands this module's E+1-channel heads to stock attention."""

    def __init__(self, config: PretrainedConfig, name: str):
        object.__setattr__(self, "nv_wrapped", config)
        object.__setattr__(self, "_attn_implementation", name)

    def __getattr__(self, key: str):
        if key == "nv_wrapped":  # not yet set (copy and pickle build the object without __init__)
            raise AttributeError(key)
        return getattr(self.nv_wrapped, key)

    def __setattr__(self, key: str, value) -> None:
        setattr(self.nv_wrapped, key, value)


def pin_attention(module: nn.Module, name: str) -> None:
    config = module.__dict__.get("config")
    if isinstance(config, PretrainedConfig):
        module.__dict__["config"] = PinnedConfig(config, name)


def unpin_attention(module: nn.Module) -> None:
    config = module.__dict__.get("config")
    if isinstance(config, PinnedConfig):
        module.__dict__["config"] = config.nv_wrapped


def hook_model(model: nn.Module, attn_name: str, reinit: Callable[[nn.Module], None]) -> None:
    """Instance overrides of transformers methods that would otherwise undo or drop the NV form: `save_pretrained`
    (writes what `nvib.load` needs), `set_attn_implementation` (on every sub-model; keeps NV attention) and
    `_init_weights` (re-initialises the NV layers after `to_empty`, with `reinit`). `unhook_model` removes them."""
    hooks = [(model, "save_pretrained", functools.partial(_save_pretrained, model))]
    hooks.append((model, "_init_weights", functools.partial(_init_weights, model, reinit)))
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            hooks.append((module, "set_attn_implementation", functools.partial(_set_attn, attn_name, module)))
    for module, name, hook in hooks:
        module.__dict__[name] = hook
    model.__dict__["_nv_hooks"] = [(module, name) for module, name, _ in hooks]


def unhook_model(model: nn.Module) -> None:
    for module, name in model.__dict__.pop("_nv_hooks", ()):
        module.__dict__.pop(name, None)


def _save_pretrained(model: nn.Module, save_directory, *args, **kwargs) -> None:
    """`model.save_pretrained` of an NV model: `nvib.save` (pretrained weights as usual plus the NV parts)."""
    if args:
        raise TypeError("save_pretrained of an NV model takes its options by keyword (as transformers documents)")
    if kwargs.get("state_dict") is None:  # with the NV layers, as transformers writes them: the Trainer resumes
        kwargs["state_dict"] = model.state_dict()
    saving.save(model, save_directory, **kwargs)
    warnings.warn(
        f"saved an NV model to {save_directory}: load it with nvib.load({str(save_directory)!r}); transformers' "
        "from_pretrained on that directory gives the stock pretrained model without the NV layers",
        stacklevel=2,
    )


def _set_attn(attn_name: str, module: nn.Module, attn_implementation, allow_all_kernels: bool = False) -> None:
    """`set_attn_implementation` on a converted model (or a sub-model of it): "eager" and "sdpa" are set as usual
    (they choose the masks' format, `masks.host_mask`; the converted attention modules keep NV attention,
    `PinnedConfig`), and stay after `nvib.unload`; other implementations cannot host NV attention; a name
    transformers does not know gets transformers' own error."""
    known = {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()}  # others (a hub kernel aside) transformers refuses
    refused = [
        name
        for name in _leaves(attn_implementation)
        if name not in (*HOSTS, attn_name) and (name in known or "/" in str(name))
    ]
    if refused:
        raise ValueError(
            f"attn_implementation={refused[0]!r} cannot run NV attention (it runs on the eager/sdpa kernels as "
            f"{attn_name!r}). Fix: nvib.unload(model) first for the plain model, or keep the NV model as it is"
        )
    type(module).set_attn_implementation(module, attn_implementation, allow_all_kernels)


def _leaves(value) -> list:
    return [leaf for v in value.values() for leaf in _leaves(v)] if isinstance(value, dict) else [value]


@torch.no_grad()
def _init_weights(model: nn.Module, reinit: Callable[[nn.Module], None], module: nn.Module) -> None:
    """transformers' `_init_weights`, and for the NV layers (all at once, when their ModuleDict is reached)
    `reinit(model)`: the prior and the knobs again, what `to_empty` after a conversion on the meta device leaves
    uninitialised."""
    type(model)._init_weights(model, module)
    if module is model._modules.get(LAYERS):
        reinit(model)


def host_attention(model: nn.Module, sites: list[Site]) -> None:
    """Let the mask builders of the sub-models that hold the sites make NV's masks (`masks.host_mask`), while their
    configs keep the user's implementation name ("eager" or "sdpa": transformers' `config.output_attentions`,
    `save_pretrained` and its tests read it); a config naming another one (None, flash, flex) is set to "sdpa", which
    NV attention stands in for. The attention modules themselves run NV attention (`PinnedConfig`). A sub-model that
    holds no site (Gemma 3's vision tower) keeps its config as it is. What to restore is kept on the model first."""
    holders = [site.module_name for site in sites]
    configs = {}
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        inside = name == "" or any(h.startswith(name + ".") for h in holders)
        if inside and isinstance(config, PretrainedConfig):
            configs.setdefault(id(config), config)
    model.__dict__["_nv_attn_original"] = [(c, c._attn_implementation) for c in configs.values()]
    model.__dict__["_nv_mask_configs"] = list(configs.values())
    masks.register_hosts()
    masks.mark_configs(configs.values(), True)
    for config in configs.values():
        if config._attn_implementation not in HOSTS:
            config._attn_implementation = {"": "sdpa"}  # this config only, not its sub-configs


def restore_attention(model: nn.Module) -> None:
    """The attention implementation of before `convert`, on the configs still set to what conversion left (NV's
    name, set by `set_attn_implementation`, or the "sdpa" it put for a non-host one); one the user set since stays."""
    masks.mark_configs(model.__dict__.pop("_nv_mask_configs", ()), False)
    for config, implementation in model.__dict__.pop("_nv_attn_original", ()):
        left = (attention.ATTN_NAME, keyspace.ATTN_NAME, implementation if implementation in HOSTS else "sdpa")
        if config._attn_implementation in left:
            config._attn_implementation = {"": implementation}
