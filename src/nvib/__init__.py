"""nvib: the Nonparametric Variational reinterpretation of pretrained transformers."""

from nvib.architectures import SUPPORTED, UnsupportedModelError
from nvib.config import NVConfig
from nvib.convert import (
    configure,
    convert,
    enable_per_token_variance,
    is_converted,
    kl_loss,
    kl_terms,
    nv_layers,
    unload,
)
from nvib.diagnostics import record_prior_mass
from nvib.io import load, save
from nvib.prior import EmpiricalPrior, PriorMismatchError

__all__ = [
    "SUPPORTED",
    "EmpiricalPrior",
    "NVConfig",
    "PriorMismatchError",
    "UnsupportedModelError",
    "configure",
    "convert",
    "enable_per_token_variance",
    "is_converted",
    "kl_loss",
    "kl_terms",
    "load",
    "nv_layers",
    "record_prior_mass",
    "save",
    "unload",
]
