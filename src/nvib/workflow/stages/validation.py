"""The run's first stage: what can be checked before the first forward pass (lengths against the model's positions,
start points against its attention kinds, the dev and test data, a few-shot prompt against a sliding window)."""

from __future__ import annotations

import dataclasses

from torch import nn

from nvib.core.architectures import find_sites
from nvib.workflow.limits import Lengths, fit_lengths
from nvib.workflow.prompting import SharedPrefix
from nvib.workflow.search import knob_names
from nvib.workflow.settings import RunConfig
from nvib.workflow.stages.inputs import RunInputs

__all__ = ["check_start_points", "fit_config", "validate"]


def fit_config(config: RunConfig, model: nn.Module, prefix: int = 0) -> tuple[RunConfig, list[str]]:
    """``config`` with data.max_source_len / max_target_len and generation.max_new_tokens made to fit the model's
    positions (`nvib.workflow.limits.fit_lengths`: lengths the config sets are refused if too long, defaults
    lowered), and the notes of what was lowered. ``prefix``: a few-shot prompt's tokens before each source."""
    d, g = config.data, config.generation
    given = {k for k in ("max_source_len", "max_target_len") if k in (config.raw.get("data") or {})}
    fitted, notes = fit_lengths(
        model,
        Lengths(d.max_source_len, d.max_target_len, g.max_new_tokens),
        names={"source": "data.max_source_len", "target": "data.max_target_len",
               "new_tokens": "generation.max_new_tokens"},
        explicit={{"max_source_len": "source", "max_target_len": "target"}[k] for k in given},
        prefix=prefix,
    )  # fmt: skip
    data = dataclasses.replace(d, max_source_len=fitted.source, max_target_len=fitted.target)
    generation = dataclasses.replace(g, max_new_tokens=fitted.new_tokens)
    return dataclasses.replace(config, data=data, generation=generation), notes


def check_start_points(config: RunConfig, model: nn.Module) -> None:
    """Refuse (one line) a search start point that sets a knob of an attention kind the model lacks."""
    kinds = {site.kind for site in find_sites(model)}
    names = knob_names(kinds)
    for i, point in enumerate(config.search.start_points):
        extra = sorted(set(point) - set(names))
        if extra:
            raise ValueError(
                f"search.start_points[{i}] sets {', '.join(extra)}, but {type(model).__name__} has only "
                f"{', '.join(sorted(kinds))} attention (knobs: {', '.join(names)}). Fix: drop those knobs"
            )


def validate(inputs: RunInputs) -> None:
    """Fit the lengths to the model's positions (`fit_config`; ``inputs`` uses the fitted config from now on,
    with a warning per length lowered), check the start points' knobs against its attention kinds, that the dev
    and test data load, and that a few-shot prompt fits a sliding window."""
    model, _ = inputs.loaded
    config, notes = fit_config(inputs.config, model, inputs.prompt_overhead())
    inputs.refit(config)
    for note in notes:
        inputs.console.print(f"[yellow]warning:[/yellow] {note}")
    check_start_points(config, model)
    sets = [inputs.examples("dev"), *(inputs.examples("test", name) for name in config.data.test)]
    if inputs.prompt is not None:
        items = [inputs.prompt.encode(e) for examples in sets for e in examples]
        SharedPrefix(model, inputs.prompt).check_window(items, config.generation.max_new_tokens)
