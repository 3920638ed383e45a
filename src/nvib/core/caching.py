"""A shared prefix's KV cache, as transformers 5.x spells it: the keyword its models take, a fresh cache, and a
copy of one cache for every row of a batch. The NV models' caches hold ordinary keys and values (docs/method.md §10)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import transformers as tf
from torch import nn


def cache_kwarg(forward: Callable) -> str:
    """The keyword ``forward`` takes its cache by: ``cache`` (later 5.x releases) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def new_cache(model: nn.Module) -> Any:
    """An empty dynamic cache with the model's layer types (sliding-window layers included)."""
    return tf.DynamicCache(config=model.config)


def expanded(cache: Any, rows: int) -> Any:
    """A copy of a one-row ``cache`` for ``rows`` rows; the original is left as it is."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(rows)
    return out
