"""Fine-tuning's own regularisers beside the NVIB KL terms, as penalties the trainer adds to the task loss:

- `L2SP` (Li et al., 2018): ½·Σ‖w − w_start‖² over every pretrained weight that trains, w_start a frozen copy taken
  when fine-tuning starts (the NV layers' parameters excluded); the trainer weighs it by α.
- `FeatureMean`: Σ_sites mean_B `nvib.core.kl.feature_mean` of each attention site's input z (what the site's key
  projection reads: encoder and decoder self-attention, and cross-attention's encoder states, once), against the
  empirical prior's mean and floored variance of that site: KL_G's mean term (docs/method.md §8) with uniform token
  weights, on a plain model, so the pull towards the in-domain mean needs no NV layer. The trainer weighs it by μ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from nvib.core.architectures import Site, find_sites
from nvib.core.convert import LAYERS, is_converted
from nvib.core.kl import feature_mean
from nvib.core.prior import EmpiricalPrior, valid_mask

__all__ = ["L2SP", "FeatureMean", "check_weight"]


def check_weight(name: str, value: float) -> None:
    """A regulariser's weight: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}. Fix: pass a weight such as 0.01")


class L2SP:
    """½·Σ‖w − w_start‖² over the pretrained weights of `model` that train now (w_start: their values now)."""

    def __init__(self, model: nn.Module):
        nv_ids = {id(p) for p in model._modules[LAYERS].parameters()} if is_converted(model) else set()
        self.params = [p for p in model.parameters() if p.requires_grad and id(p) not in nv_ids]
        self.start = [p.detach().clone() for p in self.params]

    def __call__(self) -> torch.Tensor:
        """The penalty [] (float32), differentiable in the weights."""
        total = sum(((p.float() - s.float()) ** 2).sum() for p, s in zip(self.params, self.start, strict=True))
        return 0.5 * total


class FeatureMean:
    """Captures each attention site's input in training-mode forward passes (forward pre-hooks on the key
    projections, located by `nvib.core.architectures.find_sites`) and turns them into the feature-mean penalty.

    The valid tokens of a site are those `EmpiricalPrior.estimate` counts (`nvib.core.prior.valid_mask`: the
    attention mask; seq2seq decoders: the target tokens). For plain (unconverted) z-space models: on an NV model KL_G
    already carries this pull (its mean term, `lambda_g`), and rotary key-space models have no z at the site.
    """

    def __init__(self, model: nn.Module, prior: EmpiricalPrior):
        if is_converted(model):
            raise ValueError(
                "feature-mean matching is for a plain (unconverted) model; on an NV model KL_G's mean term is the same "
                "pull. Fix: use lambda_g (--lambda-g) instead, or fine-tune without converting (convert=False, --no-nv)"
            )
        if not isinstance(prior, EmpiricalPrior):
            raise ValueError(
                "feature-mean matching needs the model's empirical prior (its mean and variance per site). "
                "Fix: pass prior= (an EmpiricalPrior or its file from `nvib prior`, --prior)"
            )
        prior.check_compatible(model)
        self.sites: dict[str, Site] = {}
        for site in find_sites(model):
            if site.arch.key_space:
                raise ValueError(
                    f"feature-mean matching reads attention inputs z; {type(model).__name__} attends in key space "
                    "(docs/method.md §10), where the prior describes keys. Fix: use the NV form with lambda_g"
                )
            self.sites.setdefault(site.name, site)  # cross-attention: the encoder output, taken once
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        pad_id = getattr(model.config, "pad_token_id", None)
        if pad_id is None and model.config.model_type == "encoder-decoder":
            pad_id = model.config.decoder.pad_token_id
        self.pad_id = pad_id
        self.stats = {name: (prior.sites[name].mean, prior.sites[name].var) for name in self.sites}
        self.captured: dict[str, torch.Tensor] = {}
        self.handles = [
            site.key_projection.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            for name, site in self.sites.items()
        ]
        self.model = model

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            if self.model.training and name not in self.captured:
                self.captured[name] = args[0] if args else next(iter(kwargs.values()))

        return hook

    def clear(self) -> None:
        """Forget the inputs captured so far (call before each training forward)."""
        self.captured = {}

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Σ_sites mean over the batch of the penalty of the inputs captured in the last training forward of
        `batch` (the dict the model was called with), float32 []."""
        missing = [name for name in self.sites if name not in self.captured]
        if missing:
            raise RuntimeError(f"no attention input captured at site {missing[0]}: run a training-mode forward first")
        total = None
        for name, site in self.sites.items():
            z = self.captured[name]
            valid = valid_mask(site.kind, batch, z, self.pad_id, self.seq2seq)
            mean, var = (t.to(z.device) for t in self.stats[name])
            term = feature_mean(z, valid, mean, var).mean()
            total = term if total is None else total + term
        self.clear()
        return total

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
