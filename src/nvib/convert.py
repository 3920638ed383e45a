"""convert / configure / unload: turn a transformers model into its NV form and back."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers import PretrainedConfig

from nvib import attention
from nvib.architectures import Site, find_sites
from nvib.config import NVConfig
from nvib.layer import NVIBLayer

LAYERS = "nvib_layers"  # the ModuleDict of NVIB layers on the converted model


def is_converted(model: nn.Module) -> bool:
    return LAYERS in model._modules


def nv_layers(model: nn.Module) -> dict[str, NVIBLayer]:
    """Site name ("encoder.0", ..., "cross") -> its NVIB layer."""
    if not is_converted(model):
        raise ValueError("this model is not an NV model; call nvib.convert(model) first")
    return {layer.site: layer for layer in model._modules[LAYERS].values()}


def convert(
    model: nn.Module, config: NVConfig | None = None, prior=None, per_token_variance: bool = False
) -> nn.Module:
    """Attach one NVIB layer per attention site (spec §1) with the identity initialisation (§3), in place.

    `prior` is an `EmpiricalPrior` (§7); without one every site gets the default prior.
    `per_token_variance` gives every layer a trainable W_σ (zero at first, so the model is unchanged); its
    evaluation then takes the general form of spec §4, which costs more than the fast form (§6).
    Every argument is checked before the model is touched, and on any error the model is left as it was.
    """
    from nvib.prior import EmpiricalPrior

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


def _build_layers(model: nn.Module, prior, per_token_variance: bool) -> tuple[list[Site], dict[str, NVIBLayer]]:
    """The sites and their new NVIB layers (with the prior set), without touching the model."""
    sites = find_sites(model)
    param = next(model.parameters())
    layers: dict[str, NVIBLayer] = {}
    for site in sites:
        if site.name not in layers:
            layer = NVIBLayer(site.name, site.kind, site.key_dim, site.noise, per_token_variance)
            layers[site.name] = layer.to(device=param.device, dtype=param.dtype).train(model.training)
    if prior is not None:
        prior.check_compatible(model, layers)
        flat = []
        for name, layer in layers.items():
            s = prior.sites[name]
            layer.set_prior(s.mean, s.var, s.log_alpha_mean, s.log_alpha_std)
            if s.log_alpha_std < 0.05:
                flat.append(name)
        if flat:  # b_α = τ_α·ς (spec §3): with ς ≈ 0 the knob cannot move the prior's weight
            warnings.warn(
                f"the prior's spread ς of ‖z‖²/(2√E) is below 0.05 at sites {flat}: alpha_tau has almost no effect "
                "there (typical of random-weight models whose LayerNorm fixes ‖z‖)",
                stacklevel=3,
            )
    return sites, layers


def _install(model: nn.Module, config: NVConfig, prior, sites: list[Site], layers: dict[str, NVIBLayer]) -> nn.Module:
    attention.register()
    model.add_module(LAYERS, nn.ModuleDict({n.replace(".", "_"): layer for n, layer in layers.items()}))
    model.__dict__["_nv_sites"] = sites
    model.__dict__["nv_prior"] = prior
    _select_attention(model, attention.ATTN_NAME)
    for site in sites:
        attention.install(site, layers[site.name])
    configure(model, config)
    return model


def _rollback(model: nn.Module, sites: list[Site]) -> None:
    """Undo a partial `_install`: the model is as it was before `convert`."""
    for site in sites:
        if "_nv_slot" in site.module.__dict__:
            attention.uninstall(site)
    model._modules.pop(LAYERS, None)
    for config, implementation in model.__dict__.pop("_nv_attn_original", ()):
        config._attn_implementation = implementation
    for key in ("_nv_sites", "nv_prior", "nv_config"):
        model.__dict__.pop(key, None)


def enable_per_token_variance(model: nn.Module) -> nn.Module:
    """Give every NV layer a trainable W_σ (zero, so outputs do not change), in place; from then on evaluation
    takes the general form of spec §4. A no-op for layers that have one."""
    layers = nv_layers(model)
    if all(layer.per_token_variance for layer in layers.values()):
        return model
    with torch.inference_mode(False):
        for layer in layers.values():
            layer.enable_per_token_variance()
    for site in model.__dict__["_nv_sites"]:  # the slots' channel layout depends on it
        attention.uninstall(site)
        attention.install(site, layers[site.name])
    return model


def _select_attention(model: nn.Module, name: str) -> None:
    """Select attention `name` on every config the model's modules read (sub-models may hold their own
    copies, e.g. inside a deep-copied EncoderDecoderModel); what to restore is kept on the model first."""
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            configs.setdefault(id(config), config)
    model.__dict__["_nv_attn_original"] = [(c, c._attn_implementation) for c in configs.values()]
    model.set_attn_implementation(name)
    for config in configs.values():
        config._attn_implementation = name


def configure(model: nn.Module, config: NVConfig) -> nn.Module:
    """Re-initialise every site with new knobs, in place; cheap enough to call once per search trial."""
    if not isinstance(config, NVConfig):
        raise TypeError(f"configure expects an nvib.NVConfig, got {type(config).__name__}")
    for layer in nv_layers(model).values():
        layer.reset(config.alpha_tau(layer.kind), config.stdev_tau(layer.kind), config.mu_tau)
    model.__dict__["nv_config"] = config
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the NV layers and give back the plain pretrained model, in place."""
    nv_layers(model)
    for site in model.__dict__.pop("_nv_sites"):
        attention.uninstall(site)
    del model._modules[LAYERS]
    for config, implementation in model.__dict__.pop("_nv_attn_original"):
        config._attn_implementation = implementation
    model.__dict__.pop("nv_config", None)
    model.__dict__.pop("nv_prior", None)
    return model


def kl_terms(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Site -> (KL_G, KL_D) of the last training-mode forward pass (spec §8)."""
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
