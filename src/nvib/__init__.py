"""nvib: the Nonparametric Variational reinterpretation of pretrained transformers."""

from nvib.core.architectures import SUPPORTED, UnsupportedModelError
from nvib.core.config import NVConfig
from nvib.core.convert import configure, convert, enable_per_token_variance, kl_loss, kl_terms, unload
from nvib.core.diagnostics import record_prior_mass
from nvib.core.io import load, save
from nvib.core.layer import is_converted, nv_layers
from nvib.core.prior import EmpiricalPrior, PriorMismatchError

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
