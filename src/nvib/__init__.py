"""nvib: the Nonparametric Variational reinterpretation of pretrained transformers.

The public API below is imported on first use (PEP 562), so that ``import nvib.cli`` (the command line's
``--help``) does not pay for torch and transformers; ``from nvib import convert`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nvib.core.architectures import SUPPORTED, UnsupportedModelError
    from nvib.core.config import NVConfig
    from nvib.core.convert import configure, convert, enable_per_token_variance, kl_loss, kl_terms, unload
    from nvib.core.diagnostics import record_prior_mass
    from nvib.core.io import load, save
    from nvib.core.layer import is_converted, nv_layers
    from nvib.core.prior import EmpiricalPrior, PriorMismatchError

_SOURCES = {
    "SUPPORTED": "nvib.core.architectures",
    "UnsupportedModelError": "nvib.core.architectures",
    "NVConfig": "nvib.core.config",
    "configure": "nvib.core.convert",
    "convert": "nvib.core.convert",
    "enable_per_token_variance": "nvib.core.convert",
    "kl_loss": "nvib.core.convert",
    "kl_terms": "nvib.core.convert",
    "unload": "nvib.core.convert",
    "record_prior_mass": "nvib.core.diagnostics",
    "load": "nvib.core.io",
    "save": "nvib.core.io",
    "is_converted": "nvib.core.layer",
    "nv_layers": "nvib.core.layer",
    "EmpiricalPrior": "nvib.core.prior",
    "PriorMismatchError": "nvib.core.prior",
}

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


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'nvib' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
