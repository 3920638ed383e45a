"""What the knob search and the baseline tuning share: the Optuna storage, the TPE seed, the dev slices, the
identity knobs every trial starts from, and what besides the objective a resumed study must share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from torch import nn

from nvib.core.config import NVConfig
from nvib.core.convert import is_converted, nv_layers
from nvib.core.prior import EmpiricalPrior
from nvib.workflow.data import Example
from nvib.workflow.identity import prior_digest
from nvib.workflow.metrics import LIKELIHOOD_METRICS
from nvib.workflow.search import load_study, sampler_seed
from nvib.workflow.settings import DatasetSection, RunConfig
from nvib.workflow.stages.records import STUDY_FILE, data_name, prompt_digest

__all__ = ["FINISHED", "base_knobs", "dev_slices", "run_sampler_seed", "stored_study", "storage_url", "study_identity"]

#: The trial states that count towards a study's budget.
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def storage_url(config: RunConfig, run_dir: Path) -> str:
    """The config's Optuna storage, else the run directory's SQLite study."""
    return config.search.storage or f"sqlite:///{(run_dir / STUDY_FILE).resolve()}"


def stored_study(storage: str, name: str) -> optuna.Study | None:
    """The stored study, or None; storage problems (missing driver, server down) are one-line errors."""
    return load_study(storage, name, heartbeat_interval=None, grace_period=None)


def base_knobs(config: RunConfig) -> NVConfig:
    """What every trial shares: the identity knobs in the config's stdev unit."""
    return NVConfig(stdev_unit=config.search.stdev_unit)


def run_sampler_seed(config: RunConfig) -> int:
    """The TPE seed: derived from the dev data's name (its file and folder) and shifted by search.seed."""
    dev = config.data.dev
    name = (
        data_name(config, dev) if isinstance(dev, DatasetSection) else "/".join(Path(data_name(config, dev)).parts[-2:])
    )
    return sampler_seed(name, config.search.seed)


def dev_slices(config: RunConfig, dev: Sequence[Example]) -> list[int]:
    """The search's dev slices, clipped to the dev set's size."""
    return sorted({min(s, len(dev)) for s in config.search.slices})


def study_identity(config: RunConfig, prior: EmpiricalPrior | None, model: nn.Module) -> dict[str, Any]:
    """What changes a trial's value beside the metric, the dev data, the knob ranges and the slices (which
    `run_search` records itself): the prior, the stdev unit, the lengths, the prompt and, for a generation
    metric, the generation settings and the diversity guard. A resumed study refuses any other."""
    cfg = config
    generating = cfg.metric not in LIKELIHOOD_METRICS
    g = cfg.generation
    return {
        "prior": prior_digest(prior) if prior is not None else None,
        "stdev_unit": (cfg.search.stdev_unit or next(iter(nv_layers(model).values())).STDEV_UNIT)
        if is_converted(model)
        else None,
        "lengths": [cfg.data.max_source_len, cfg.data.max_target_len],
        "prompt": prompt_digest(cfg) if cfg.prompt is not None else None,
        "max_new_tokens": g.max_new_tokens if generating else None,
        "num_beams": g.num_beams if generating else None,
        "generation_kwargs": dict(g.kwargs) if generating else None,
        "min_diversity": cfg.search.min_diversity if generating else None,
    }
