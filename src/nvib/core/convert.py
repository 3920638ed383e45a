"""convert / configure / unload: turn a transformers model into its NV form and back."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from nvib.core import attention, hooks, keyspace
from nvib.core.architectures import Site, find_sites
from nvib.core.config import NVConfig
from nvib.core.layer import LAYERS, NVIBLayer, is_converted, nv_layers, set_knobs
from nvib.core.prior import EmpiricalPrior


def convert(
    model: nn.Module, config: NVConfig | None = None, prior=None, per_token_variance: bool = False
) -> nn.Module:
    """Attach one NVIB layer per attention site (docs/method.md §1) with the identity initialisation (§3), in place.

    `prior` is an `EmpiricalPrior` (§7); without one every site gets the default prior.
    `per_token_variance` gives every layer a trainable W_σ (zero at first, so the model is unchanged); its
    evaluation then takes the general form of docs/method.md §4, which costs more than the fast form (§6).
    Every argument is checked before the model is touched, and on any error the model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"nvib.convert expects a transformers model (torch nn.Module), got {type(model).__name__}")
    if is_converted(model):
        raise ValueError("this model is already an NV model; use nvib.configure to change its knobs")
    if config is not None and not isinstance(config, NVConfig):
        hint = f"nvib.NVConfig(**{config!r})" if isinstance(config, dict) else "nvib.NVConfig(...)"
        raise TypeError(f"nvib.convert expects an nvib.NVConfig, got {type(config).__name__}. Fix: pass {hint}")
    if prior is not None and not isinstance(prior, EmpiricalPrior):
        raise TypeError(
            f"nvib.convert expects prior=nvib.EmpiricalPrior, got {type(prior).__name__}. "
            "Fix: EmpiricalPrior.load(path) or EmpiricalPrior.estimate(model, batches)"
        )
    with torch.inference_mode(False):  # NV parameters must stay trainable and re-configurable afterwards
        sites, layers = _build_layers(model, prior, per_token_variance)
        try:
            return _install(model, config or NVConfig(), prior, sites, layers)
        except BaseException:
            _rollback(model, sites)
            raise


def _path(site: Site):
    """The attention path of a site: z-space (docs/method.md §2–6) or key space (docs/method.md §10)."""
    return keyspace if site.arch.key_space else attention


def _new_layer(site: Site, per_token_variance: bool) -> NVIBLayer | keyspace.KeySpaceLayer:
    if not site.arch.key_space:
        return NVIBLayer(site.name, site.kind, site.key_dim, site.noise, per_token_variance)
    if per_token_variance:
        raise ValueError(
            f"per-token variances are not available at key-space site {site.name} (rotary decoder-only models, "
            "docs/method.md §10): convert with per_token_variance=False"
        )
    return keyspace.KeySpaceLayer(site.name, site.kind, *keyspace.site_shape(site), site.noise)


def _build_layers(model: nn.Module, prior, per_token_variance: bool) -> tuple[list[Site], dict[str, nn.Module]]:
    """The sites and their new NV layers (with the prior set), without touching the model."""
    sites = find_sites(model)
    param = next(model.parameters())
    layers: dict[str, NVIBLayer | keyspace.KeySpaceLayer] = {}
    for site in sites:
        if site.name not in layers:
            layer = _new_layer(site, per_token_variance)
            layers[site.name] = layer.to(device=param.device, dtype=param.dtype).train(model.training)
    if prior is not None:
        prior.check_compatible(model, layers)
        for name, layer in layers.items():
            _set_prior(layer, prior.sites[name])
    return sites, layers


def _set_prior(layer: nn.Module, s) -> None:
    layer.set_prior(s.mean, s.var, s.log_alpha_mean, s.log_alpha_std, s.value_mean, s.sq_var, s.sample)


def _install(model: nn.Module, config: NVConfig, prior, sites: list[Site], layers: dict[str, nn.Module]) -> nn.Module:
    path = _path(sites[0])
    path.register()
    model.add_module(LAYERS, nn.ModuleDict({n.replace(".", "_"): layer for n, layer in layers.items()}))
    model.__dict__["_nv_sites"] = sites
    model.__dict__["nv_prior"] = prior
    hooks.host_attention(model, sites)
    for site in sites:
        _path(site).install(site, layers[site.name])
        hooks.pin_attention(site.module, path.ATTN_NAME)
    hooks.hook_model(model, path.ATTN_NAME, _reinit_layers)
    _warn_clamped(_set_config(model, config), stacklevel=3)  # the caller of nvib.convert
    if not any(layer.prior_mean.is_meta for layer in layers.values()):
        _warn_visible_prior(layers.values(), stacklevel=3)
        for module in (model._modules[LAYERS], *layers.values()):  # initialised: HF's init_weights leaves them
            module._is_hf_initialized = True
    return model


@torch.no_grad()
def _reinit_layers(model: nn.Module) -> None:
    """The NV layers' prior and knobs set again (after `to_empty`, through transformers' `init_weights`)."""
    prior = model.__dict__.get("nv_prior")
    for name, layer in nv_layers(model).items():
        if prior is None:
            layer.set_default_prior()
        else:
            _set_prior(layer, prior.sites[name])
    _set_config(model, model.nv_config)


class VisiblePriorWarning(UserWarning):
    """A finite alpha_tau leaves the prior a visible weight: the NV model is not the pretrained one
    (docs/method.md §11)."""


class StdevClampWarning(UserWarning):
    """stdev_tau is above the largest score-bias spread of some mixtures and was clamped there (docs/method.md §12)."""


def _warn_visible_prior(layers, stacklevel: int, at_least: float = 1e-3) -> None:
    """docs/method.md §11: where a finite τ_α leaves the prior a visible weight, say so (τ_α = +∞ leaves it none)."""
    visible = {layer.site: w for layer in layers if (w := layer.prior_weight()) > at_least}
    if visible:
        worst = ", ".join(f"{site} ({w:.2g}×)" for site, w in sorted(visible.items(), key=lambda kv: -kv[1])[:5])
        warnings.warn(
            f"at the finite alpha_tau of this NVConfig the prior keeps a visible weight at {len(visible)} site(s), "
            f"relative to an average in-domain token: {worst}; the NV model differs from the pretrained one there "
            "(docs/method.md §11). For the pretrained model exactly use alpha_tau = inf (the NVConfig() default)",
            VisiblePriorWarning,
            stacklevel=stacklevel + 1,
        )


def _rollback(model: nn.Module, sites: list[Site]) -> None:
    """Undo a partial `_install`: the model is as it was before `convert`."""
    hooks.unhook_model(model)
    for site in sites:
        hooks.unpin_attention(site.module)
        if "_nv_slot" in site.module.__dict__:
            _path(site).uninstall(site)
    model._modules.pop(LAYERS, None)
    hooks.restore_attention(model)
    for key in ("_nv_sites", "nv_prior", "nv_config"):
        model.__dict__.pop(key, None)


def enable_per_token_variance(model: nn.Module) -> nn.Module:
    """Give every NV layer a trainable W_σ (zero, so outputs do not change), in place; from then on evaluation
    takes the general form of docs/method.md §4. A no-op for layers that have one."""
    layers = nv_layers(model)
    if all(layer.per_token_variance for layer in layers.values()):
        return model
    if any(isinstance(layer, keyspace.KeySpaceLayer) for layer in layers.values()):
        raise ValueError(
            "per-token variances are not available for rotary decoder-only models (key space, docs/method.md §10)"
        )
    with torch.inference_mode(False):
        for layer in layers.values():
            layer.enable_per_token_variance()
    for site in model.__dict__["_nv_sites"]:  # the slots' channel layout depends on it
        attention.uninstall(site)
        attention.install(site, layers[site.name])
    return model


def configure(model: nn.Module, config: NVConfig) -> nn.Module:
    """Re-initialise every site with new knobs, in place; cheap enough to call once per search trial. Warns as
    `convert` does: `VisiblePriorWarning` where a finite alpha_tau leaves the prior a visible weight,
    `StdevClampWarning` where stdev_tau was clamped."""
    if not isinstance(config, NVConfig):
        raise TypeError(f"configure expects an nvib.NVConfig, got {type(config).__name__}")
    _warn_clamped(_set_config(model, config), stacklevel=2)
    layers = nv_layers(model).values()
    if not any(layer.prior_mean.is_meta for layer in layers):
        _warn_visible_prior(layers, stacklevel=2)
    return model


def _set_config(model: nn.Module, config: NVConfig) -> list[str]:
    """`configure` without its warnings: the knobs set on every site; the mixtures whose stdev_tau was clamped."""
    clamped = set_knobs(model, config)
    model.__dict__["nv_config"] = config
    for site in model.__dict__.get("_nv_sites", ()):
        slot = site.module.__dict__.get("_nv_slot")
        if isinstance(slot, attention.Slot):
            slot.refresh()
    return clamped


def _warn_clamped(clamped: list[str], stacklevel: int) -> None:
    if clamped:
        warnings.warn(
            f"stdev_tau is above the largest score-bias spread at {len(clamped)} mixture(s): "
            f"{', '.join(clamped[:6])}{', ...' if len(clamped) > 6 else ''}; clamped there (docs/method.md §12: "
            "attention by key norm alone). Fix: a smaller stdev_tau, if that is not what you meant",
            StdevClampWarning,
            stacklevel=stacklevel + 1,
        )


def unload(model: nn.Module) -> nn.Module:
    """Remove the NV layers and give back the plain pretrained model, in place."""
    nv_layers(model)
    hooks.unhook_model(model)
    for site in model.__dict__.pop("_nv_sites"):
        hooks.unpin_attention(site.module)
        _path(site).uninstall(site)
    del model._modules[LAYERS]
    hooks.restore_attention(model)
    model.__dict__.pop("nv_config", None)
    model.__dict__.pop("nv_prior", None)
    return model


def kl_terms(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Site -> (KL_G, KL_D) of the last training-mode forward pass (docs/method.md §8)."""
    terms = {}
    for name, layer in nv_layers(model).items():
        if layer.kl_gaussian is None:
            raise RuntimeError(
                f"site {name} has no KL terms: run a forward pass in model.train() mode before nvib.kl_loss"
            )
        terms[name] = (layer.kl_gaussian, layer.kl_dirichlet)
    return terms


def kl_loss(model: nn.Module, lambda_g: float = 1.0, lambda_d: float = 1.0) -> torch.Tensor:
    """λ_G Σ_sites KL_G + λ_D Σ_sites KL_D of the last training-mode forward pass."""
    terms = kl_terms(model).values()
    return sum(lambda_g * g.float() + lambda_d * d.float() for g, d in terms)
