"""What the NV model does with its knobs: attention mass on the prior component per site kind."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from nvib.core.layer import nv_layers


def log_prior_mass(log: list | None, weights: torch.Tensor) -> None:
    """Add one call's prior weights a_m0 (any shape, one per query) to the log that `record_prior_mass` opened on
    the slot, if it did: the hook NV attention calls."""
    if log is not None:
        log.append((float(weights.sum(dtype=torch.promote_types(weights.dtype, torch.float32))), weights.numel()))


@contextlib.contextmanager
def record_prior_mass(model: nn.Module) -> Iterator[dict[str, float]]:
    """Within the block, record a_m0; on exit the yielded dict maps site kind -> mean prior weight."""
    nv_layers(model)
    slots = [site.module._nv_slot for site in model.__dict__["_nv_sites"]]
    for slot in slots:
        slot.mass_log = []
    result: dict[str, float] = {}
    try:
        yield result
    finally:
        totals: dict[str, list[float]] = {}
        for slot in slots:
            acc = totals.setdefault(slot.kind, [0.0, 0])
            for mass, n in slot.mass_log:
                acc[0] += mass
                acc[1] += n
            slot.mass_log = None
        result.update({kind: m / n for kind, (m, n) in totals.items() if n})
