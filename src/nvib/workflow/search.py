"""Search the NV knobs with Optuna: TPE sampling, growing dev slices, median pruning, resumable.

Knobs: ``alpha_tau_{e,c,d}`` and ``stdev_tau_{e,c,d}`` for the site kinds encoder
self-attention (e), cross-attention (c) and decoder self-attention (d). Only the knobs of the
kinds a model has are searched.

Design choices:

- **Equivalence point outside the range.** The equivalence setting is ``alpha_tau = +∞`` (no prior
  component); Optuna's distributions are finite, so the study stores it as ``alpha_tau = 10``
  (:data:`EQUIVALENCE_ALPHA_TAU`) and :func:`knobs_of` reads that value back as +∞ (for the objective and in
  :func:`best_knobs`). It lies outside the default ``alpha_tau`` range. Each knob's distribution is the hull of its
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
  :class:`nvib.workflow.objectives.TrialResult` with ``reject`` set (e.g. outputs less diverse than half the
  unconverted model's): the trial is marked PRUNED with the reason in its ``pruned_reason`` user
  attribute, so it can never be the best trial, and TPE ranks it with the pruned ones. Pruning was chosen
  over Optuna's ``constraints_func`` because infeasible trials there still complete and carry a value.
- **Per-domain sampler seeds.** :func:`sampler_seed` derives the TPE seed from a name (the dev data's),
  so searches on different domains draw different candidate sequences instead of the same ones.
- **Resume and many workers.** The study lives in an Optuna RDB storage (SQLite file, PostgreSQL,
  ...); any number of processes started with the same storage URL and study name cooperate on it,
  and a rerun resumes it. ``n_trials`` is the study's total: a worker stops when that many trials
  are complete or pruned, and waits (rather than starting a surplus trial) while the last ones run
  elsewhere. The process that creates the study (creation is atomic in the database) records the
  objective (metric, dev data fingerprint, direction, knob ranges, slices) as a study user attribute
  after enqueueing the equivalence point and start points; every other worker waits for that record,
  refuses to join if its own objective differs, and re-enqueues only points with no live or finished
  trial (a failed or interrupted one is retried). A point enqueued twice by a race is still evaluated
  once: a trial popped from the queue whose parameters an earlier trial already runs or finished is
  skipped (state FAIL, user attribute ``skipped``).
- **Crashes.** Running trials send a heartbeat; a trial whose heartbeat is older than the grace period
  (its process was killed) is failed by whichever worker looks next and re-queued with the same
  parameters (``RetryHeartbeatStaleTrialCallback``), so a killed equivalence trial is evaluated after
  all. The sampler is seeded per trial (``seed + trial number``): workers starting together draw
  different points, and a resumed run does not replay the first run's draws.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from nvib.core.config import KNOBS
from nvib.core.config import SUFFIX as KIND_SUFFIX
from nvib.workflow.identity import changed_keys
from nvib.workflow.objectives import TrialResult
from nvib.workflow.settings import GRACE_PERIOD, HEARTBEAT_INTERVAL, SearchSpace
from nvib.workflow.storage import StorageError, load_study, open_storage, safe_url

__all__ = [
    "EQUIVALENCE_ALPHA_TAU",
    "EQUIVALENCE_STDEV_TAU",
    "KIND_SUFFIX",
    "KNOBS",
    "ObjectiveMismatchError",
    "SearchSpace",
    "StorageError",
    "best_knobs",
    "equivalence_point",
    "knob_names",
    "load_study",
    "open_storage",
    "MAX_FAILED_IN_A_ROW",
    "record_objective",
    "SearchFailedError",
    "knobs_of",
    "run_search",
    "sampler_seed",
]

EQUIVALENCE_ALPHA_TAU = 10.0
EQUIVALENCE_STDEV_TAU = 0.0
#: The study user attribute holding the objective a study was created for.
OBJECTIVE_ATTR = "objective"

Objective = Callable[[dict[str, float], int], Any]  # float, (float, n_tokens) or a TrialResult
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def sampler_seed(name: str, seed: int = 0) -> int:
    """A TPE seed for the search named ``name`` (e.g. the dev data's): stable across runs and machines,
    different for different names, and shifted by ``seed`` (a search seed)."""
    digest = hashlib.sha256(f"{name}\0{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class ObjectiveMismatchError(ValueError):
    """A stored study was created for another objective than the one asked for."""


def knob_names(kinds: set[str] | Sequence[str]) -> list[str]:
    """The knobs searched for a model with the given site kinds (``encoder``/``cross``/``decoder``)."""
    kinds = set(kinds)
    unknown = kinds - set(KIND_SUFFIX)
    if unknown:
        raise ValueError(f"unknown site kind(s) {sorted(unknown)}; kinds: {', '.join(KIND_SUFFIX)}")
    if not kinds:
        raise ValueError("no site kinds given: nothing to search")
    return [k for k in KNOBS if any(k.endswith("_" + KIND_SUFFIX[kind]) for kind in kinds)]


def knobs_of(params: Mapping[str, float]) -> dict[str, float]:
    """The NVConfig knobs of a trial's parameters: an ``alpha_tau`` at the stored equivalence value is +∞."""
    return {
        k: (math.inf if k.startswith("alpha_tau") and v == EQUIVALENCE_ALPHA_TAU else float(v))
        for k, v in params.items()
    }


def equivalence_point(
    kinds: set[str] | Sequence[str],
    alpha_tau: float = EQUIVALENCE_ALPHA_TAU,
    stdev_tau: float = EQUIVALENCE_STDEV_TAU,
) -> dict[str, float]:
    """The knobs of the equivalence setting for the given kinds."""
    return {k: (alpha_tau if k.startswith("alpha") else stdev_tau) for k in knob_names(kinds)}


# ----------------------------------------------------------------------------------------------
# the objective a study was created for


def _normalise(value: Any) -> Any:
    """JSON round trip: tuples become lists, keys strings (what the storage gives back)."""
    return json.loads(json.dumps(value, sort_keys=True))


def _check_objective(study: optuna.Study, wanted: dict[str, Any], where: str) -> None:
    stored = study.user_attrs.get(OBJECTIVE_ATTR)
    if stored is None:
        return
    if changed := sorted(changed_keys(stored, wanted), key=lambda k: k != "metric"):  # a changed metric first
        key = changed[0]
        raise ObjectiveMismatchError(
            f"the study {study.study_name!r} in {where} was created for {key}={stored.get(key)!r}, this run "
            f"asks for {key}={wanted.get(key)!r}; its trials are not comparable. Fix: use a new study name "
            "(search.study_name) or another run directory, or restore the original setting"
        )


def record_objective(study: optuna.Study, wanted: Mapping[str, Any], where: str) -> None:
    """Refuse (``ObjectiveMismatchError``, one line) a study recorded for another objective than ``wanted``; record
    ``wanted`` on a study that has none yet."""
    wanted = _normalise(dict(wanted))
    _check_objective(study, wanted, where)
    if OBJECTIVE_ATTR not in study.user_attrs:
        study.set_user_attr(OBJECTIVE_ATTR, wanted)


def _wait_for_objective(study: optuna.Study, timeout: float) -> dict[str, Any] | None:
    """The objective record of a study being set up by another worker (None if it never appears)."""
    deadline = time.monotonic() + timeout
    while True:
        stored = study.user_attrs.get(OBJECTIVE_ATTR)
        if stored is not None or time.monotonic() >= deadline:
            return stored
        if study.get_trials(deepcopy=False, states=_FINISHED):
            return None  # a study from before objectives were recorded: not being set up
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# the search


class _TrialSeededTPE(BaseSampler):
    """TPE whose random stream is seeded by ``seed + trial.number``: reproducible for one worker, and
    workers (or a resumed run) sharing a study never replay each other's draws."""

    def __init__(self, seed: int, **tpe_kwargs: Any):
        self._seed, self._kwargs = seed, tpe_kwargs
        self._tpe = TPESampler(seed=seed, **tpe_kwargs)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._tpe = TPESampler(seed=self._seed + trial.number, **self._kwargs)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()


class _Skipped(Exception):
    """A trial popped from the queue that must not be evaluated (duplicate or beyond the budget)."""


class SearchFailedError(ValueError):
    """Too many trials in a row failed: the search stops rather than run forever."""


#: failed trials in a row (objective not finite) after which a worker stops: failed trials do not count towards
#: n_trials, so without a bound a model that is NaN everywhere would be searched for ever
MAX_FAILED_IN_A_ROW = 5


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


def _queued_params(t: FrozenTrial) -> dict[str, Any]:
    return t.system_attrs.get("fixed_params", t.params)


def _enqueue(study: optuna.Study, params: dict[str, float], label: str) -> None:
    for t in study.get_trials(deepcopy=False, states=_LIVE):
        if _same_params(_queued_params(t), params):
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


def _skip_reason(study: optuna.Study, number: int, n_trials: int) -> str | None:
    """Why trial ``number`` must not run: an earlier trial already has its queued parameters, or the
    trials before it fill the budget (two workers raced past the check in the loop)."""
    trials = study.get_trials(deepcopy=False)
    mine = next(t for t in trials if t.number == number)
    earlier = [t for t in trials if t.number < number]
    if "fixed_params" in mine.system_attrs or "failed_trial" in mine.system_attrs:
        for t in earlier:
            if (
                t.state in _LIVE
                and t.state != TrialState.WAITING
                and _same_params(_queued_params(t), _queued_params(mine))
            ):
                return f"duplicate of trial {t.number}"
    if sum(t.state in _LIVE for t in earlier) >= n_trials:
        return f"beyond n_trials={n_trials}"
    return None


def run_search(
    objective: Objective,
    kinds: set[str],
    *,
    n_trials: int,
    storage: str | BaseStorage | None,
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
    objective_info: Mapping[str, Any] | None = None,
    heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
    grace_period: int | None = GRACE_PERIOD,
    setup_timeout: float = 30.0,
) -> optuna.Study:
    """Search the knobs of ``kinds`` until the study has ``n_trials`` finished (complete or pruned) trials.

    ``objective(knobs, n)`` returns the metric on the first ``n`` dev examples, or
    ``(metric, n_generated_tokens)``, or a :class:`nvib.workflow.objectives.TrialResult` (its ``attrs`` are stored
    on the trial; a ``reject`` reason prunes it, see the module notes). Each trial is evaluated on each of
    ``slices`` in turn
    (ascending), reporting intermediate values and possibly being pruned before the last; the
    trial's value is the metric on the last slice. The equivalence point (if ``equivalence``)
    and then ``start_points`` are tried first. ``storage`` is any Optuna RDB URL (e.g.
    ``sqlite:///run/study.db`` or ``postgresql://user@host/db``), a storage object, or None for
    in-memory; an existing study of the same name is resumed or joined (other processes may be
    working on it). ``objective_info`` (e.g. ``{"metric": "rougeL", "dev": <fingerprint>}``) is
    recorded with the direction, knob ranges and slices when the study is created, and a study
    created for another objective is refused (``ObjectiveMismatchError``). Running trials send a
    heartbeat every ``heartbeat_interval`` s; one silent for ``grace_period`` s is failed and
    re-queued. Per-trial user attributes: ``knobs``, ``metric``, ``slice_metrics``,
    ``n_examples``, ``wall_time_s``, ``worker``, ``n_tokens`` (if the objective reports them),
    ``pruned_reason`` (if rejected). ``seed``: the TPE seed (see :func:`sampler_seed` for one per domain).
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
    wanted = _normalise(
        {
            **dict(objective_info or {}),
            "direction": direction,
            "knobs": {n: list(space.range(n)) for n in names},
            "slices": slices,
        }
    )

    where = "memory"
    if isinstance(storage, str):
        where = safe_url(storage)
        storage = open_storage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    study_kwargs = dict(
        storage=storage,
        study_name=study_name,
        direction=direction,
        sampler=_TrialSeededTPE(seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=0),
    )
    try:
        # Creation is atomic (a unique study name in the database): exactly one worker creates it.
        study, created = optuna.create_study(**study_kwargs, load_if_exists=False), True
    except optuna.exceptions.DuplicatedStudyError:
        study, created = optuna.create_study(**study_kwargs, load_if_exists=True), False
    if study.direction != optuna.study.StudyDirection[direction.upper()]:
        raise ObjectiveMismatchError(
            f"the study {study_name!r} in {where} has direction {study.direction.name.lower()}, this run asks to "
            f"{direction}. Fix: use a new study name (search.study_name) or another run directory"
        )
    if not created:
        stored = _wait_for_objective(study, setup_timeout)
        if stored is not None:
            _check_objective(study, wanted, where)
        elif "metric" in study.user_attrs and "metric" in wanted and study.user_attrs["metric"] != wanted["metric"]:
            raise ObjectiveMismatchError(
                f"the study {study_name!r} in {where} optimised {study.user_attrs['metric']!r}, this run asks for "
                f"{wanted['metric']!r}. Fix: use a new study name (search.study_name) or another run directory"
            )
    dists = _distributions(study, names, space, [p for p, _ in points])
    # The creator enqueues the points, then records the objective (which joiners wait for); a joiner
    # re-enqueues only points whose trial failed or was interrupted.
    for params, label in points:
        _enqueue(study, params, label)
    if OBJECTIVE_ATTR not in study.user_attrs:
        study.set_user_attr(OBJECTIVE_ATTR, wanted)
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def trial_fn(trial: optuna.Trial) -> float:
        reason = _skip_reason(study, trial.number, n_trials)
        if reason is not None:
            trial.set_user_attr("skipped", reason)
            raise _Skipped(reason)
        trial.set_user_attr("worker", worker)
        knobs = {n: trial.suggest_float(n, dists[n].low, dists[n].high) for n in names}
        trial.set_user_attr("knobs", knobs)
        start = time.perf_counter()
        tokens: int | None = None
        slice_metrics: dict[str, float] = {}
        metric = math.nan
        for i, n_examples in enumerate(slices):
            result = _unpack(objective(knobs_of(knobs), n_examples))
            metric, n_tok = result.value, result.n_tokens
            if not math.isfinite(metric):
                reason = f"the objective was {metric} on {n_examples} dev examples"
                trial.set_user_attr("failed_reason", reason)
                failed.append((trial.number, knobs, reason))
                return math.nan  # Optuna fails the trial (±inf would complete)
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

    failed: list[tuple[int, dict, str]] = []  # this worker's failed trials, in order
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = None
    if progress:
        bar = tqdm(total=n_trials, desc="search", unit="trial")
    try:
        while deadline is None or time.monotonic() < deadline:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in _FINISHED for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if bar is not None:
                bar.update(min(finished, n_trials) - bar.n)
            if finished >= n_trials:
                break
            if finished + running >= n_trials:
                # The last trials run elsewhere (or in a killed process, failed once their heartbeat is stale).
                time.sleep(0.5)
                continue
            before = len(failed)
            study.optimize(trial_fn, n_trials=1, catch=(_Skipped,), show_progress_bar=False)
            if len(failed) == before:
                failed.clear()  # not failed: the count is of failures in a row
            elif len(failed) >= MAX_FAILED_IN_A_ROW:
                _, knobs, reason = failed[-1]
                shown = ", ".join(f"{k}={v:.3g}" for k, v in knobs.items())
                raise SearchFailedError(
                    f"search stopped: {len(failed)} trials in a row failed ({reason}, last at {shown}; trials "
                    f"{', '.join(str(n) for n, _, _ in failed)}). The model gives NaN or inf there: check the prior "
                    "(a statistic that overflows the model's dtype?), the data, or narrow search.ranges"
                )
    finally:
        if bar is not None:
            bar.close()
    return study


def best_knobs(study: optuna.Study) -> dict[str, float]:
    """The knobs of the best complete trial."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ValueError(f"study {study.study_name!r} has no complete trial yet")
    trial = study.best_trial
    return knobs_of(trial.user_attrs.get("knobs", trial.params))
