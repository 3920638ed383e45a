"""Search the NV knobs with Optuna: TPE sampling, growing dev slices, median pruning, resumable.

Knobs: ``alpha_tau_{e,c,d}`` and ``stdev_tau_{e,c,d}`` for the site kinds encoder
self-attention (e), cross-attention (c) and decoder self-attention (d). Only the knobs of the
kinds a model has are searched.

Design choices:

- **Equivalence point outside the range.** The equivalence setting (``alpha_tau = 10``) lies
  outside the default ``alpha_tau`` range. Each knob's distribution is the hull of its
  configured range and every enqueued point (and of the ranges already stored in a resumed
  study), so enqueued trials are ordinary in-range trials that TPE learns from, the
  distributions are identical across trials (multivariate TPE needs that) and Optuna never
  warns about out-of-range fixed parameters. The cost is a slightly wider range for that knob.
- **Pruner: MedianPruner.** Each trial is evaluated on growing prefixes of the dev set
  (``slices``), and the value on prefix *n* is reported at step *n*. Every trial sees the same
  examples at the same step, so values are directly comparable, and the median rule is
  rank-based (indifferent to the metric's scale). It waits for ``n_startup_trials`` finished
  trials before pruning, where successive halving would cull from the second trial on in an
  order-dependent way on very noisy small slices; with only a handful of rungs and a few dozen
  trials the median rule is the steadier choice.
- **Degenerate outputs are pruned, not scored.** An objective may return a
  :class:`nvib.objectives.TrialResult` with ``reject`` set (e.g. outputs less diverse than half the
  unconverted model's): the trial is marked PRUNED with the reason in its ``pruned_reason`` user
  attribute, so it can never be the best trial, and TPE ranks it with the pruned ones. Pruning was chosen
  over Optuna's ``constraints_func`` because infeasible trials there still complete and carry a value.
- **Per-domain sampler seeds.** :func:`sampler_seed` derives the TPE seed from a name (the dev data's),
  so searches on different domains draw different candidate sequences instead of the same ones.
- **Resume.** ``load_if_exists=True``; COMPLETE and PRUNED trials count toward ``n_trials``,
  so a rerun only runs what is left. Enqueued points are not re-enqueued if a trial with the
  same parameters is complete, pruned, waiting or running (a failed/interrupted one is
  retried; Optuna's own ``skip_if_exists`` would skip it). The sampler's seed is offset by
  the number of stored trials so a resumed run does not replay the first run's samples.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from nvib.objectives import TrialResult

__all__ = [
    "EQUIVALENCE_ALPHA_TAU",
    "EQUIVALENCE_STDEV_TAU",
    "KIND_SUFFIX",
    "KNOBS",
    "SearchSpace",
    "best_knobs",
    "equivalence_point",
    "knob_names",
    "run_search",
    "sampler_seed",
]

#: Site kind -> knob suffix.
KIND_SUFFIX: dict[str, str] = {"encoder": "e", "cross": "c", "decoder": "d"}
#: All six knob names.
KNOBS: tuple[str, ...] = tuple(f"{p}_{s}" for p in ("alpha_tau", "stdev_tau") for s in KIND_SUFFIX.values())
EQUIVALENCE_ALPHA_TAU = 10.0
EQUIVALENCE_STDEV_TAU = 0.0

Objective = Callable[[dict[str, float], int], Any]  # float, (float, n_tokens) or a TrialResult


def sampler_seed(name: str, seed: int = 0) -> int:
    """A TPE seed for the search named ``name`` (e.g. the dev data's): stable across runs and machines,
    different for different names, and shifted by ``seed`` (a search seed)."""
    digest = hashlib.sha256(f"{name}\0{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass
class SearchSpace:
    """Ranges of the knobs: one for every ``alpha_tau_*``, one for every ``stdev_tau_*``, and
    per-knob ``overrides`` such as ``{"alpha_tau_c": (-5.0, 5.0)}``."""

    alpha_tau: tuple[float, float] = (-15.0, 5.0)
    stdev_tau: tuple[float, float] = (0.0, 0.5)
    overrides: dict[str, tuple[float, float]] = field(default_factory=dict)

    def range(self, knob: str) -> tuple[float, float]:
        """The configured (low, high) of ``knob``."""
        if knob not in KNOBS:
            raise ValueError(f"unknown knob {knob!r}; knobs: {', '.join(KNOBS)}")
        low, high = self.overrides.get(knob, self.alpha_tau if knob.startswith("alpha") else self.stdev_tau)
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ValueError(f"bad range for {knob}: ({low}, {high}); need finite low <= high")
        if knob.startswith("stdev") and low < 0:
            raise ValueError(f"bad range for {knob}: stdev_tau must be >= 0, got low={low}")
        return low, high

    def validate(self) -> None:
        """Raise ValueError on unknown override names or bad ranges."""
        unknown = set(self.overrides) - set(KNOBS)
        if unknown:
            raise ValueError(f"unknown knob(s) in overrides: {sorted(unknown)}; knobs: {', '.join(KNOBS)}")
        for knob in KNOBS:
            self.range(knob)


def knob_names(kinds: set[str] | Sequence[str]) -> list[str]:
    """The knobs searched for a model with the given site kinds (``encoder``/``cross``/``decoder``)."""
    kinds = set(kinds)
    unknown = kinds - set(KIND_SUFFIX)
    if unknown:
        raise ValueError(f"unknown site kind(s) {sorted(unknown)}; kinds: {', '.join(KIND_SUFFIX)}")
    if not kinds:
        raise ValueError("no site kinds given: nothing to search")
    return [k for k in KNOBS if any(k.endswith("_" + KIND_SUFFIX[kind]) for kind in kinds)]


def equivalence_point(
    kinds: set[str] | Sequence[str],
    alpha_tau: float = EQUIVALENCE_ALPHA_TAU,
    stdev_tau: float = EQUIVALENCE_STDEV_TAU,
) -> dict[str, float]:
    """The knobs of the equivalence setting for the given kinds."""
    return {k: (alpha_tau if k.startswith("alpha") else stdev_tau) for k in knob_names(kinds)}


def _distributions(
    study: optuna.Study, names: Sequence[str], space: SearchSpace, points: Sequence[Mapping[str, float]]
) -> dict[str, FloatDistribution]:
    """Per knob: hull of the configured range, the enqueued points and ranges already in the study."""
    out: dict[str, FloatDistribution] = {}
    stored = study.get_trials(deepcopy=False)
    for name in names:
        low, high = space.range(name)
        values = [float(p[name]) for p in points if name in p]
        values += [
            bound
            for t in stored
            if isinstance(t.distributions.get(name), FloatDistribution)
            for bound in (t.distributions[name].low, t.distributions[name].high)
        ]
        out[name] = FloatDistribution(min([low, *values]), max([high, *values]))
    return out


def _same_params(a: Mapping[str, Any], b: Mapping[str, float]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(float(a[k]), float(b[k]), abs_tol=1e-12) for k in b)


def _enqueue(study: optuna.Study, params: dict[str, float], label: str) -> None:
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING, TrialState.RUNNING)
    for t in study.get_trials(deepcopy=False, states=live):
        if _same_params(t.system_attrs.get("fixed_params", t.params), params):
            return
    study.enqueue_trial(params, user_attrs={"start_point": label})


def _unpack(value: Any) -> TrialResult:
    """An objective's return value as a TrialResult: a number, (number, n_tokens) or a TrialResult."""
    if isinstance(value, TrialResult):
        return value
    if isinstance(value, tuple | list):
        metric, n_tokens = value
        return TrialResult(float(metric), int(n_tokens))
    return TrialResult(float(value))


def _record_slice(trial: optuna.Trial, result: TrialResult, n_examples: int) -> None:
    """Store a slice's extra values (e.g. ``diversity``) on the trial; prune it if the objective rejected it."""
    for key, value in result.attrs.items():
        trial.set_user_attr(key, value)
    if result.reject is not None:
        trial.set_user_attr("pruned_reason", f"[{n_examples} examples] {result.reject}")
        raise optuna.TrialPruned(result.reject)


def run_search(
    objective: Objective,
    kinds: set[str],
    *,
    n_trials: int,
    storage: str | None,
    study_name: str,
    slices: Sequence[int],
    start_points: Sequence[Mapping[str, float]] = (),
    space: SearchSpace | None = None,
    seed: int = 0,
    direction: str = "maximize",
    timeout: float | None = None,
    progress: bool = True,
    equivalence: bool = True,
    n_startup_trials: int = 5,
) -> optuna.Study:
    """Search the knobs of ``kinds`` for ``n_trials`` finished (complete or pruned) trials.

    ``objective(knobs, n)`` returns the metric on the first ``n`` dev examples, or
    ``(metric, n_generated_tokens)``, or a :class:`nvib.objectives.TrialResult` (its ``attrs`` are stored
    on the trial; a ``reject`` reason prunes it, see the module notes). Each trial is evaluated on each of
    ``slices`` in turn (ascending), reporting intermediate values and possibly being pruned before the last; the
    trial's value is the metric on the last slice. The equivalence point (if ``equivalence``)
    and then ``start_points`` are tried first. ``storage`` is any Optuna RDB URL (e.g.
    ``sqlite:///run/study.db``) or None for in-memory; an existing study of the same name is
    resumed. Per-trial user attributes: ``knobs``, ``metric``, ``slice_metrics``,
    ``n_examples``, ``wall_time_s``, ``n_tokens`` (if the objective reports them), ``pruned_reason``
    (if rejected). ``seed``: the TPE seed (see :func:`sampler_seed` for one per domain).
    """
    space = space or SearchSpace()
    space.validate()
    names = knob_names(kinds)
    slices = [int(s) for s in slices]
    if not slices or any(s < 1 for s in slices) or sorted(set(slices)) != slices:
        raise ValueError(f"slices must be positive and strictly increasing, got {slices}")
    if n_trials < 0:
        raise ValueError(f"n_trials must be >= 0, got {n_trials}")
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    points: list[tuple[dict[str, float], str]] = []
    if equivalence:
        points.append((equivalence_point(kinds), "equivalence"))
    for i, p in enumerate(start_points):
        extra = set(p) - set(names)
        if extra:
            raise ValueError(f"start point {i} has knobs {sorted(extra)} not searched for kinds {sorted(kinds)}")
        # Knobs a start point leaves out are sampled by TPE.
        points.append(({k: float(v) for k, v in p.items()}, f"start_{i}"))

    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction=direction,
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=0),
    )
    if study.direction != optuna.study.StudyDirection[direction.upper()]:
        raise ValueError(f"study {study_name!r} in storage has direction {study.direction.name.lower()}")
    n_stored = len(study.get_trials(deepcopy=False))
    if n_stored:
        # A resumed run must not replay the random stream of the first run (its startup trials
        # would repeat points already evaluated): offset the seed by the trials stored.
        study.sampler = optuna.samplers.TPESampler(seed=seed + n_stored)
    dists = _distributions(study, names, space, [p for p, _ in points])
    for params, label in points:
        _enqueue(study, params, label)

    def trial_fn(trial: optuna.Trial) -> float:
        knobs = {n: trial.suggest_float(n, dists[n].low, dists[n].high) for n in names}
        trial.set_user_attr("knobs", knobs)
        start = time.perf_counter()
        tokens: int | None = None
        slice_metrics: dict[str, float] = {}
        metric = math.nan
        for i, n_examples in enumerate(slices):
            result = _unpack(objective(dict(knobs), n_examples))
            metric, n_tok = result.value, result.n_tokens
            if n_tok is not None:
                tokens = (tokens or 0) + n_tok
            slice_metrics[str(n_examples)] = metric
            trial.set_user_attr("slice_metrics", slice_metrics)
            trial.set_user_attr("n_examples", n_examples)
            trial.set_user_attr("metric", metric)
            trial.set_user_attr("wall_time_s", time.perf_counter() - start)
            if tokens is not None:
                trial.set_user_attr("n_tokens", tokens)
            trial.report(metric, step=n_examples)
            _record_slice(trial, result, n_examples)
            if i < len(slices) - 1 and trial.should_prune():
                raise optuna.TrialPruned()
        return metric

    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    remaining = n_trials - done
    if remaining > 0:
        study.optimize(trial_fn, n_trials=remaining, timeout=timeout, show_progress_bar=progress)
    return study


def best_knobs(study: optuna.Study) -> dict[str, float]:
    """The knobs of the best complete trial."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ValueError(f"study {study.study_name!r} has no complete trial yet")
    trial = study.best_trial
    return {k: float(v) for k, v in trial.user_attrs.get("knobs", trial.params).items()}
