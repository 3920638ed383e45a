"""The simple baselines beside NV: one scalar each, tuned with the run's objective, dev data and trial budget.

- :class:`AttentionTemperature`: every attention score of the unconverted model divided by one temperature
  t ∈ [0.5, 2] (the modules' ``scaling`` over t); t = 1 is the model. T5's relative position bias, added after the
  scaled q·k, is left as it is.
- :class:`WiseFT`: the weights interpolated between a pre-fine-tuning model and the run's model,
  θ(w) = (1 − w)·θ_pre + w·θ_fine, w ∈ [0, 1] (Wortsman et al., 2022); w = 1 is the model.

:func:`tune` searches the scalar with Optuna (TPE, the identity tried first, the same growing dev slices and
median pruning as the knob search) in a study of its own, so it resumes like the knob search (after a kill -9 too).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
import torch
from optuna.trial import TrialState
from torch import nn

from nvib.core.architectures import find_sites
from nvib.workflow.objectives import TrialResult
from nvib.workflow.search import MAX_FAILED_IN_A_ROW, record_objective
from nvib.workflow.settings import GRACE_PERIOD, HEARTBEAT_INTERVAL
from nvib.workflow.storage import open_storage, safe_url

__all__ = ["AttentionTemperature", "Baseline", "WiseFT", "summary", "tune"]

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class Baseline:
    """One scalar ``knob`` in [low, high] that changes the unconverted model; ``identity`` leaves it as it is."""

    name: str
    label: str
    knob: str
    identity: float

    def __init__(self, low: float, high: float):
        if not low < high or not low <= self.identity <= high:
            raise ValueError(f"{self.name} range [{low:g}, {high:g}] must hold its identity {self.identity:g}")
        self.low, self.high = float(low), float(high)

    def set(self, value: float) -> None:
        raise NotImplementedError

    def apply(self, knobs: Mapping[str, float]) -> None:
        """What :class:`nvib.workflow.objectives.DevObjective` calls: ``{knob: value}`` ({} = the identity)."""
        self.set(float(knobs.get(self.knob, self.identity)))

    def reset(self) -> None:
        self.set(self.identity)


class AttentionTemperature(Baseline):
    """Divide every attention score by ``t`` (each attention module's ``scaling`` / t)."""

    name, label, knob, identity = "temperature", "temperature", "temperature", 1.0

    def __init__(self, model: nn.Module, low: float = 0.5, high: float = 2.0):
        super().__init__(low, high)
        if low <= 0:
            raise ValueError(f"temperature range must be positive, got [{low:g}, {high:g}]")
        self.modules = [site.module for site in find_sites(model)]
        missing = [type(m).__name__ for m in self.modules if not isinstance(getattr(m, "scaling", None), float)]
        if missing:
            raise ValueError(
                f"the temperature baseline needs a float `scaling` on every attention module; {missing[0]} has none. "
                "Fix: set `baselines: {temperature: false}` in the run config"
            )
        self.scalings = [m.scaling for m in self.modules]

    def set(self, value: float) -> None:
        for module, scaling in zip(self.modules, self.scalings, strict=True):
            module.scaling = scaling / value


class WiseFT(Baseline):
    """Interpolate the model's weights towards those of ``pretrained`` (same architecture): w = 1 is the model."""

    name, label, knob, identity = "wise_ft", "WiSE-FT", "wise_ft", 1.0

    def __init__(self, model: nn.Module, pretrained: nn.Module, low: float = 0.0, high: float = 1.0):
        super().__init__(low, high)
        if low < 0 or high > 1:
            raise ValueError(f"wise_ft range must lie in [0, 1], got [{low:g}, {high:g}]")
        own, other = model.state_dict(), pretrained.state_dict()
        floating = {k: v for k, v in own.items() if v.is_floating_point()}
        bad = [k for k, v in floating.items() if k not in other or other[k].shape != v.shape]
        if bad:
            raise ValueError(
                f"the WiSE-FT model has no weight {bad[0]!r} of shape {tuple(floating[bad[0]].shape)} (or another "
                f"shape): it must be the same architecture as the run's model. Fix: point baselines.wise_ft at the "
                "checkpoint this model was fine-tuned from"
            )
        self.params = floating
        self.fine = {k: v.detach().clone() for k, v in floating.items()}
        self.pre = {k: other[k].detach().to(v.device, v.dtype).clone() for k, v in floating.items()}

    @torch.no_grad()
    def set(self, value: float) -> None:
        for k, p in self.params.items():
            p.copy_(self.fine[k] if value == 1.0 else torch.lerp(self.pre[k], self.fine[k], value))


def tune(
    baseline: Baseline,
    objective: Callable[[dict[str, float], int], TrialResult],
    *,
    n_trials: int,
    slices: Sequence[int],
    storage: str,
    study_name: str,
    seed: int,
    n_startup_trials: int = 5,
    on_trial: Callable[[int], None] | None = None,
    objective_info: Mapping[str, Any] | None = None,
    heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
    grace_period: int | None = GRACE_PERIOD,
) -> tuple[float, optuna.Study]:
    """The best value of ``baseline``'s scalar on ``objective`` (maximised, as :class:`DevObjective` returns it)
    after ``n_trials`` finished trials in total (a rerun resumes the stored study); the model is left at the identity.

    It resumes as the knob search does (:mod:`nvib.workflow.search`): running trials send a heartbeat, and one
    silent for ``grace_period`` s (its process was killed) is failed and asked again with the same value before any
    new trial (trials run one at a time: a tune waits while another process's trial runs); each trial's sampler is
    seeded by ``seed`` + the finished trials before it, so an interrupted tune ends where an uninterrupted one does.
    The study records ``objective_info`` with the range and slices, and a study made for another objective is
    refused (``ObjectiveMismatchError``)."""
    opened = open_storage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    study = optuna.create_study(
        study_name=study_name, storage=opened, load_if_exists=True, direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials),
    )  # fmt: skip
    wanted = {**dict(objective_info or {}), baseline.knob: [baseline.low, baseline.high], "slices": list(slices)}
    record_objective(study, wanted, safe_url(storage))
    if not study.trials:
        study.enqueue_trial({baseline.knob: baseline.identity}, skip_if_exists=True)
    ran: list[int] = []

    def trial_fn(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        if on_trial is not None:
            on_trial(trial.number)
        value = trial.suggest_float(baseline.knob, baseline.low, baseline.high)
        for n in slices:
            result = objective({baseline.knob: value}, n)
            trial.report(result.value, n)
            if result.reject:
                trial.set_user_attr("pruned_reason", result.reject)
                raise optuna.TrialPruned(result.reject)
            if n != slices[-1] and trial.should_prune():
                raise optuna.TrialPruned()
        return result.value

    failed_in_a_row = 0
    try:
        while failed_in_a_row < MAX_FAILED_IN_A_ROW:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            done = sum(t.state in _FINISHED for t in trials)
            if done >= n_trials:
                break
            if any(t.state == TrialState.RUNNING for t in trials):
                # one trial at a time: a trial left by a killed process is failed once its heartbeat is stale and
                # asked again before anything new, so the trials after it are those of an uninterrupted tune
                time.sleep(0.5)
                continue
            study.sampler = optuna.samplers.TPESampler(seed=seed + done, n_startup_trials=n_startup_trials)
            study.optimize(trial_fn, n_trials=1)
            state = next(t.state for t in study.get_trials(deepcopy=False) if t.number == ran[-1])
            failed_in_a_row = failed_in_a_row + 1 if state == TrialState.FAIL else 0
    finally:
        baseline.reset()
    best = study.best_trial if any(t.state == TrialState.COMPLETE for t in study.trials) else None
    return (baseline.identity if best is None else float(best.params[baseline.knob])), study


def summary(study: optuna.Study) -> dict[str, Any]:
    """The best value, the dev objective there (maximised form) and the trial counts of a baseline's study."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    best = study.best_trial if complete else None
    return {
        "value": None if best is None else next(iter(best.params.values())),
        "dev_objective": None if best is None else best.value,
        "trials": len(complete) + pruned,
        "pruned": pruned,
    }
