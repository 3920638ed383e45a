"""Searches that survive SIGKILL, and many worker processes on one PostgreSQL study (real server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from postgres import create_database, missing, postgres_server
from runs import run_config, save_tiny_model, write_config
from typer.testing import CliRunner

from nvib.cli import app
from nvib.core.config import NVConfig
from nvib.workflow.run import Run
from nvib.workflow.search import equivalence_point, knobs_of
from nvib.workflow.settings import RunConfig

KINDS = {"encoder", "cross", "decoder"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# A worker that hangs inside its first evaluation (after writing MARKER), to be killed there.
HANGING_WORKER = """
import pathlib, sys, time
import nvib.workflow.evaluate
marker = pathlib.Path(sys.argv[1])
def hang(self, knobs, n):
    marker.write_text("evaluating")
    time.sleep(3600)
nvib.workflow.evaluate.DevObjective.__call__ = hang
from nvib.cli import app
app(sys.argv[2:], prog_name="nvib")
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bart")


def search_config(tmp: Path, model_dir: Path, **search) -> Path:
    settings = {"n_trials": 4, "slices": [4, 8], "n_startup_trials": 100, "heartbeat_interval": 1, "grace_period": 3}
    return write_config(tmp / "run.yaml", run_config(model_dir, search={**settings, **search}))


def nvib_search(config: Path, run_dir: Path, prior: Path, *, hang_marker: Path | None = None) -> subprocess.Popen:
    args = ["search", str(config), "--run-dir", str(run_dir), "--prior", str(prior), "--no-progress"]
    command = [sys.executable, "-c", HANGING_WORKER, str(hang_marker), *args] if hang_marker else [
        sys.executable, "-m", "nvib", *args
    ]  # fmt: skip
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    return out


def estimate_prior(config: Path, run_dir: Path) -> Path:
    run = Run(RunConfig.load(config), run_dir, progress=False)
    run.prior()
    return run.prior_path


def check_study(study: optuna.Study, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """n finished trials, each a distinct point, the equivalence point among them once, nothing left running;
    anything else is a skipped (never evaluated) queue entry or a trial failed by its dead worker."""
    trials = study.get_trials()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == n_trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    points = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(points)) == len(points), "a point was evaluated twice"
    eq = [t for t in done if t.params == equivalence_point(KINDS)]
    assert len(eq) == 1 and eq[0].state == TrialState.COMPLETE
    assert eq[0].user_attrs["start_point"] == "equivalence"
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert study.best_value == max(t.value for t in complete)
    return done


def test_search_killed_mid_trial_resumes_and_evaluates_the_equivalence_point(model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL inside trial 0 (the equivalence point) leaves it RUNNING; the rerun fails it and evaluates it."""
    config = search_config(tmp_path, model_dir)
    out = tmp_path / "out"
    prior = estimate_prior(config, out)
    marker = tmp_path / "hanging"
    worker = nvib_search(config, out, prior, hang_marker=marker)
    wait_for(marker, worker)
    storage = f"sqlite:///{out / 'study.db'}"
    before = optuna.load_study(study_name="nvib", storage=storage).trials
    # the equivalence point runs; the prior-only start points wait behind it
    assert [t.state for t in before] == [TrialState.RUNNING] + [TrialState.WAITING] * (len(before) - 1)
    assert before[0].params == equivalence_point(KINDS) and len(before) == 4
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    result = CliRunner().invoke(app, ["search", str(config), "--run-dir", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="nvib", storage=storage)
    done = check_study(study, n_trials=4)
    assert study.trials[0].state == TrialState.FAIL  # failed by its stale heartbeat, re-queued
    eq = [t for t in done if t.params == equivalence_point(KINDS)][0]
    assert eq.number > 0 and eq.system_attrs["failed_trial"] == 0


# ----------------------------------------------------------------------------------------------
# many workers on one PostgreSQL study


@pytest.fixture(scope="module")
def postgres() -> str:
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    with postgres_server() as url:
        yield url


def test_two_workers_share_one_study(postgres: str, model_dir: Path, tmp_path: Path) -> None:
    storage = create_database(postgres, "two_workers")
    n_trials = 8
    config = search_config(tmp_path, model_dir, storage=storage, study_name="shared", n_trials=n_trials)
    prior = estimate_prior(config, tmp_path / "prior")
    # started together: one creates the study and enqueues the equivalence point, the other joins
    workers = [nvib_search(config, tmp_path / f"w{i}", prior) for i in range(2)]
    for worker in workers:
        finish(worker)
    study = optuna.load_study(study_name="shared", storage=storage)
    done = check_study(study, n_trials)
    assert study.user_attrs["objective"]["metric"] == "nll"
    # started together, yet the equivalence point was enqueued once (only the study's creator enqueues)
    queued = [t.system_attrs.get("fixed_params", t.params) for t in study.trials]
    assert queued.count(equivalence_point(KINDS)) == 1
    assert {t.user_attrs["worker"] for t in done} <= {f"{os.uname().nodename}:{w.pid}" for w in workers}
    skipped = [t for t in study.trials if t.state == TrialState.FAIL]
    assert all("skipped" in t.user_attrs for t in skipped)  # only a race's surplus, never evaluated
    best = knobs_of(study.best_trial.user_attrs["knobs"])
    for i in range(2):
        saved = NVConfig.load(tmp_path / f"w{i}" / "nv_config.json")  # +inf is written as "inf"
        assert all(getattr(saved, k) == pytest.approx(v) for k, v in best.items())
    # a worker with another objective is refused, in one line
    raw = run_config(model_dir, search={"storage": storage, "study_name": "shared", "metric": "rouge1"})
    other = write_config(tmp_path / "other.yaml", raw)
    result = CliRunner().invoke(app, ["search", str(other), "--run-dir", str(tmp_path / "w2"), "--prior", str(prior)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "metric='nll', this run asks for metric='rouge1'" in " ".join(result.output.split())


def test_killed_worker_trial_is_requeued_by_another(postgres: str, model_dir: Path, tmp_path: Path) -> None:
    storage = create_database(postgres, "killed_worker")
    config = search_config(tmp_path, model_dir, storage=storage, study_name="shared", n_trials=5)
    prior = estimate_prior(config, tmp_path / "prior")
    marker = tmp_path / "hanging"
    doomed = nvib_search(config, tmp_path / "doomed", prior, hang_marker=marker)
    wait_for(marker, doomed)  # it created the study and is inside trial 0, the equivalence point
    survivor = nvib_search(config, tmp_path / "survivor", prior)
    time.sleep(2)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    finish(survivor)
    study = optuna.load_study(study_name="shared", storage=storage)
    done = check_study(study, n_trials=5)
    assert study.trials[0].state == TrialState.FAIL
    assert {t.user_attrs["worker"] for t in done} == {f"{os.uname().nodename}:{survivor.pid}"}


def test_server_down_is_one_line(postgres: str, model_dir: Path, tmp_path: Path) -> None:
    url = postgres.rsplit(":", 1)[0] + ":1/postgres"  # nothing listens on port 1
    config = search_config(tmp_path, model_dir, storage=url)
    prior = estimate_prior(config, tmp_path / "prior")
    result = CliRunner().invoke(app, ["search", str(config), "--run-dir", str(tmp_path / "o"), "--prior", str(prior)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot connect to the Optuna storage" in result.output and "Fix:" in result.output
