"""Tests for nvib.workflow.search."""

from __future__ import annotations

import sys
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nvib.workflow.objectives import TrialResult
from nvib.workflow.search import (
    KNOBS,
    ObjectiveMismatchError,
    SearchSpace,
    StorageError,
    best_knobs,
    equivalence_point,
    knob_names,
    knobs_of,
    open_storage,
    run_search,
    sampler_seed,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def peaked(knobs: dict[str, float], n: int) -> float:
    """Smooth, its maximum 0 at alpha_tau_e = -3, stdev_tau_e = 0.2 (the identity, alpha_tau = inf, read as 10)."""
    return -(((min(knobs["alpha_tau_e"], 10.0) + 3) / 4) ** 2) - ((knobs["stdev_tau_e"] - 0.2) / 0.1) ** 2


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


def test_knob_names_and_equivalence() -> None:
    assert knob_names({"encoder", "cross", "decoder"}) == list(KNOBS)
    assert knob_names({"decoder"}) == ["alpha_tau_d", "stdev_tau_d"]
    assert equivalence_point({"encoder", "cross"}) == {
        "alpha_tau_e": 10.0,
        "alpha_tau_c": 10.0,
        "stdev_tau_e": 0.0,
        "stdev_tau_c": 0.0,
    }
    with pytest.raises(ValueError, match="unknown site kind"):
        knob_names({"self"})
    with pytest.raises(ValueError, match="no site kinds"):
        knob_names(set())


def test_search_space_validation() -> None:
    assert SearchSpace(overrides={"alpha_tau_c": (-5, 0)}).range("alpha_tau_c") == (-5.0, 0.0)
    assert SearchSpace().range("stdev_tau_d") == (0.0, 0.5)
    with pytest.raises(ValueError, match="unknown knob"):
        SearchSpace(overrides={"alpha_tau_x": (0, 1)}).validate()
    with pytest.raises(ValueError, match="low <= high"):
        SearchSpace(alpha_tau=(1, -1)).validate()
    with pytest.raises(ValueError, match=">= 0"):
        SearchSpace(stdev_tau=(-0.1, 0.5)).validate()


def test_finds_known_optimum() -> None:
    study = run_search(
        peaked,
        {"encoder"},
        n_trials=60,
        storage=None,
        study_name="peak",
        slices=[8, 16],
        progress=False,
        seed=0,
    )
    best = best_knobs(study)
    assert set(best) == {"alpha_tau_e", "stdev_tau_e"}
    assert best["alpha_tau_e"] == pytest.approx(-3, abs=1.0)
    assert best["stdev_tau_e"] == pytest.approx(0.2, abs=0.05)
    assert study.best_value > -0.1
    # The equivalence point ran first, outside the configured alpha range, without warnings.
    first = study.trials[0]
    assert first.params == {"alpha_tau_e": 10.0, "stdev_tau_e": 0.0}
    assert first.user_attrs["start_point"] == "equivalence"
    # Sampled trials cover the configured range; the distribution is the hull with 10.
    assert first.distributions["alpha_tau_e"].low == -15 and first.distributions["alpha_tau_e"].high == 10
    assert all(t.distributions == first.distributions for t in study.trials)


def test_no_out_of_range_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_search(peaked, {"encoder"}, n_trials=3, storage=None, study_name="w", slices=[4], progress=False)


def test_start_points_enqueued_and_user_attrs() -> None:
    calls: list[tuple[dict[str, float], int]] = []

    def objective(knobs: dict[str, float], n: int) -> tuple[float, int]:
        calls.append((knobs, n))
        return peaked(knobs, n), 10 * n

    start = [{"alpha_tau_e": -2.0, "stdev_tau_e": 0.1}, {"alpha_tau_e": 7.5}]
    study = run_search(
        objective,
        {"encoder"},
        n_trials=4,
        storage=None,
        study_name="s",
        slices=[2, 5],
        start_points=start,
        progress=False,
    )
    assert [t.params["alpha_tau_e"] for t in study.trials[:3]] == [10.0, -2.0, 7.5]
    assert study.trials[1].params["stdev_tau_e"] == 0.1
    assert 0 <= study.trials[2].params["stdev_tau_e"] <= 0.5  # left out: sampled
    assert [n for _, n in calls[:2]] == [2, 5]
    t = study.trials[1]
    assert t.user_attrs["knobs"] == {"alpha_tau_e": -2.0, "stdev_tau_e": 0.1}
    assert t.user_attrs["metric"] == pytest.approx(t.value)
    assert t.user_attrs["n_tokens"] == 70  # 10 * (2 + 5)
    assert t.user_attrs["slice_metrics"].keys() == {"2", "5"}
    assert t.user_attrs["wall_time_s"] >= 0
    assert t.intermediate_values.keys() == {2, 5}
    with pytest.raises(ValueError, match="not searched"):
        run_search(
            objective, {"encoder"}, n_trials=1, storage=None, study_name="x", slices=[2],
            start_points=[{"alpha_tau_d": 0.0}], progress=False,
        )  # fmt: skip


def test_kinds_subset_only_searches_present_knobs() -> None:
    seen: list[set[str]] = []

    def objective(knobs: dict[str, float], n: int) -> float:
        seen.append(set(knobs))
        return 0.0

    study = run_search(
        objective,
        {"encoder", "decoder"},
        n_trials=5,
        storage=None,
        study_name="k",
        slices=[3],
        progress=False,
    )
    expected = {"alpha_tau_e", "alpha_tau_d", "stdev_tau_e", "stdev_tau_d"}
    assert all(s == expected for s in seen) and len(seen) == 5
    assert all(set(t.params) == expected for t in study.trials)


def test_overrides_constrain_sampled_values() -> None:
    space = SearchSpace(overrides={"alpha_tau_d": (-1.0, 0.0)}, stdev_tau=(0.1, 0.2))
    study = run_search(
        lambda k, n: 0.0, {"decoder"}, n_trials=12, storage=None, study_name="o", slices=[1],
        space=space, equivalence=False, progress=False,
    )  # fmt: skip
    for t in study.trials:
        assert -1.0 <= t.params["alpha_tau_d"] <= 0.0
        assert 0.1 <= t.params["stdev_tau_d"] <= 0.2


def test_resume_after_interruption(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/study.db"
    seen_first: list[dict[str, float]] = []

    def interrupted(knobs: dict[str, float], n: int) -> float:
        if len(seen_first) == 5 * 2:  # 5 trials x 2 slices done: interrupt trial 6
            raise KeyboardInterrupt
        seen_first.append(knobs)
        return peaked(knobs, n)

    kwargs = dict(
        kinds={"encoder", "cross"}, n_trials=12, storage=storage, study_name="resume", slices=[4, 8],
        progress=False, n_startup_trials=100,  # no pruning here: every trial uses both slices
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_search(interrupted, **kwargs)
    study = optuna.load_study(study_name="resume", storage=storage)
    assert states(study) == ["COMPLETE"] * 5 + ["FAIL"]

    seen_second: list[dict[str, float]] = []

    def resumed(knobs: dict[str, float], n: int) -> float:
        seen_second.append(knobs)
        return peaked(knobs, n)

    study = run_search(resumed, **kwargs)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 12
    assert len(seen_second) == 2 * (12 - 5)
    first_knobs = seen_first[::2]
    assert not any(k in first_knobs for k in seen_second)
    # The equivalence point ran once (trial 0) and is not repeated on resume.
    eq = [t for t in done if t.user_attrs.get("start_point") == "equivalence"]
    assert len(eq) == 1 and eq[0].number == 0
    # Running again with the target reached runs nothing.
    study = run_search(resumed, **kwargs)
    assert len(seen_second) == 2 * (12 - 5)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 12


def test_equivalence_retried_if_interrupted(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/study.db"

    def boom(knobs: dict[str, float], n: int) -> float:
        raise KeyboardInterrupt

    kwargs = dict(kinds={"decoder"}, n_trials=3, storage=storage, study_name="eq", slices=[2], progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_search(boom, **kwargs)
    study = run_search(lambda k, n: -abs(min(k["alpha_tau_d"], 10.0)), **kwargs)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 3
    assert done[0].params == {"alpha_tau_d": 10.0, "stdev_tau_d": 0.0}


def test_pruning_prunes_bad_trials() -> None:
    calls: dict[int, int] = {}

    def objective(knobs: dict[str, float], n: int) -> float:
        calls[n] = calls.get(n, 0) + 1
        return peaked(knobs, n) + 0.001 * n

    study = run_search(
        objective, {"encoder"}, n_trials=30, storage=None, study_name="p", slices=[4, 8, 16], progress=False
    )
    s = states(study)
    assert s.count("PRUNED") >= 5
    assert s.count("COMPLETE") + s.count("PRUNED") == 30
    assert calls[16] < calls[4] == 30  # pruned trials never reached the largest slice
    for t in study.trials:
        if t.state == TrialState.PRUNED:
            assert max(t.intermediate_values) < 16


def test_minimize_direction() -> None:
    study = run_search(
        lambda k, n: (min(k["alpha_tau_c"], 10.0) - 1) ** 2, {"cross"}, n_trials=40, storage=None, study_name="m",
        slices=[1], direction="minimize", progress=False,
    )  # fmt: skip
    assert best_knobs(study)["alpha_tau_c"] == pytest.approx(1, abs=1.0)


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match="slices"):
        run_search(peaked, {"encoder"}, n_trials=1, storage=None, study_name="a", slices=[8, 4], progress=False)
    with pytest.raises(ValueError, match="no complete trial"):
        best_knobs(optuna.create_study())


def test_rejected_trials_are_pruned_with_their_reason() -> None:
    """The unconstrained optimum (alpha_tau_e = -3) is rejected: the best trial must be a permitted one."""

    def objective(knobs: dict[str, float], n: int) -> TrialResult:
        value = peaked(knobs, n)
        reject = "too uniform" if knobs["alpha_tau_e"] < 0 and n == 16 else None
        return TrialResult(value, 7, {"diversity": {"distinct": 0.1 if reject else 1.0}}, reject)

    study = run_search(
        objective, {"encoder"}, n_trials=30, storage=None, study_name="r", slices=[8, 16], progress=False
    )
    rejected = [t for t in study.trials if "pruned_reason" in t.user_attrs]
    assert rejected and all(t.state == TrialState.PRUNED for t in rejected)
    assert all(t.user_attrs["pruned_reason"] == "[16 examples] too uniform" for t in rejected)
    assert all(t.user_attrs["diversity"] == {"distinct": 0.1} for t in rejected)
    assert all(t.params["alpha_tau_e"] < 0 for t in rejected)
    assert best_knobs(study)["alpha_tau_e"] >= 0
    assert study.best_trial.user_attrs["n_tokens"] == 14 and study.best_trial.user_attrs["diversity"]["distinct"] == 1


def test_sampler_seed_per_domain() -> None:
    seeds = {sampler_seed(name) for name in ("debian", "docstrings", "wiki", "wikipara")}
    assert len(seeds) == 4 and all(0 <= s < 2**31 for s in seeds)
    assert sampler_seed("wiki") == sampler_seed("wiki") != sampler_seed("wiki", 1)
    # different seeds -> different TPE candidates (the failure mode: every domain tried the same points)
    first = [
        run_search(peaked, {"encoder"}, n_trials=4, storage=None, study_name=d, slices=[1], progress=False,
                   seed=sampler_seed(d)).trials[1].params
        for d in ("docstrings", "wiki")
    ]  # fmt: skip
    assert first[0] != first[1]


def test_objective_recorded_at_creation_and_checked_on_join(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/study.db"
    kwargs = dict(kinds={"decoder"}, storage=storage, study_name="obj", slices=[2, 4], progress=False)
    info = {"metric": "rougeL", "dev": "abc123"}
    run_search(lambda k, n: 0.0, n_trials=0, objective_info=info, **kwargs)
    # recorded before any trial ran
    study = optuna.load_study(study_name="obj", storage=storage)
    assert study.trials[0].state == TrialState.WAITING
    assert study.user_attrs["objective"] == {
        "metric": "rougeL",
        "dev": "abc123",
        "direction": "maximize",
        "knobs": {"alpha_tau_d": [-15.0, 5.0], "stdev_tau_d": [0.0, 0.5]},
        "slices": [2, 4],
    }
    with pytest.raises(ObjectiveMismatchError, match=r"metric='rougeL', this run asks for metric='rouge1'.*Fix"):
        run_search(lambda k, n: 0.0, n_trials=2, objective_info={**info, "metric": "rouge1"}, **kwargs)
    with pytest.raises(ObjectiveMismatchError, match="dev='abc123'"):
        run_search(lambda k, n: 0.0, n_trials=2, objective_info={**info, "dev": "other"}, **kwargs)
    with pytest.raises(ObjectiveMismatchError, match="knobs="):
        run_search(lambda k, n: 0.0, n_trials=2, objective_info=info, space=SearchSpace(alpha_tau=(-5, 5)), **kwargs)
    with pytest.raises(ObjectiveMismatchError, match="slices="):
        run_search(lambda k, n: 0.0, n_trials=2, objective_info=info, **{**kwargs, "slices": [4]})
    with pytest.raises(ObjectiveMismatchError, match="direction"):
        run_search(lambda k, n: 0.0, n_trials=2, objective_info=info, direction="minimize", **kwargs)
    # refused joins ran nothing; the same objective resumes
    assert len(optuna.load_study(study_name="obj", storage=storage).trials) == 1
    study = run_search(lambda k, n: -abs(min(k["alpha_tau_d"], 10.0)), n_trials=2, objective_info=info, **kwargs)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2


def test_point_enqueued_twice_is_evaluated_once(tmp_path: Path) -> None:
    """Two workers racing to enqueue the same point: the second copy is skipped when popped."""
    storage = f"sqlite:///{tmp_path}/study.db"
    kwargs = dict(kinds={"decoder"}, storage=storage, study_name="dup", slices=[2], progress=False)
    calls: list[dict[str, float]] = []

    def objective(knobs: dict[str, float], n: int) -> float:
        calls.append(knobs)
        return -abs(min(knobs["alpha_tau_d"], 10.0))

    run_search(objective, n_trials=0, **kwargs)
    eq = equivalence_point({"decoder"})
    optuna.load_study(study_name="dup", storage=storage).enqueue_trial(eq, user_attrs={"start_point": "equivalence"})
    study = run_search(objective, n_trials=3, **kwargs)
    assert sum(k == knobs_of(eq) for k in calls) == 1 and len(calls) == 3
    skipped = [t for t in study.trials if "skipped" in t.user_attrs]
    assert len(skipped) == 1 and skipped[0].state == TrialState.FAIL
    assert skipped[0].user_attrs["skipped"] == "duplicate of trial 0"
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3


def test_workers_draw_different_points(tmp_path: Path) -> None:
    """Seeded per trial: two runs of the same seed on one study never repeat a sampled point."""
    storage = f"sqlite:///{tmp_path}/study.db"
    kwargs = dict(kinds={"encoder"}, storage=storage, study_name="seed", slices=[1], progress=False, seed=3)
    run_search(peaked, n_trials=4, **kwargs)
    study = run_search(peaked, n_trials=8, **kwargs)
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(params) == 8 and len(set(params)) == 8
    # and the same seed on a fresh study reproduces the same draws
    again = run_search(peaked, n_trials=8, **{**kwargs, "study_name": "seed2"})
    assert [t.params for t in again.trials] == [t.params for t in study.trials]


def test_missing_driver_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg (SQLAlchemy's PostgreSQL default) were missing
    with pytest.raises(
        StorageError,
        match=r"driver 'psycopg'.*Fix: pip install 'psycopg\[binary\]' \(or pip install 'nvib\[postgres\]'\)",
    ) as err:
        open_storage("postgresql://nvib:secret@127.0.0.1:5432/nvib")
    assert "secret" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(StorageError, match="unknown database dialect"):
        open_storage("nosuchdb://host/db")


def test_unreachable_server_is_one_line() -> None:
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (pip install 'nvib[postgres]')")
    with pytest.raises(StorageError, match=r"cannot connect to the Optuna storage .*Fix: start the database server"):
        open_storage("postgresql://nvib@127.0.0.1:1/nvib")


def test_grace_period_must_exceed_heartbeat(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="grace_period"):
        open_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=5, grace_period=5)


def test_joiner_waits_for_the_creator_and_does_not_enqueue(tmp_path: Path) -> None:
    """A worker that finds the study created but not yet set up waits for the objective record, then
    finds the points already queued: each point is in the study once."""
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(storage=storage, study_name="setup", direction="maximize")
    eq = equivalence_point({"decoder"})
    objective = {"direction": "maximize", "knobs": {"alpha_tau_d": [-15.0, 5.0], "stdev_tau_d": [0.0, 0.5]}}

    def creator_finishes_setup() -> None:
        time.sleep(1.0)
        study.enqueue_trial(eq, user_attrs={"start_point": "equivalence"})
        study.set_user_attr("objective", {**objective, "slices": [1]})  # last, as run_search does

    thread = threading.Thread(target=creator_finishes_setup)
    thread.start()
    started = time.monotonic()
    done = run_search(
        lambda k, n: -abs(min(k["alpha_tau_d"], 10.0)), {"decoder"}, n_trials=2, storage=storage, study_name="setup",
        slices=[1], progress=False,
    )  # fmt: skip
    thread.join()
    assert time.monotonic() - started >= 1.0
    assert [t.params == eq for t in done.trials] == [True, False]
    assert all(t.state == TrialState.COMPLETE for t in done.trials)
