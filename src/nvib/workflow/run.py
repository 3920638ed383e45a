"""The run: a config file -> prior -> knob search -> evaluation -> report, in one run directory.

A run directory holds ``config.json`` (the config it was started with), ``prior.safetensors``,
``study.db`` (the Optuna study), ``nv_config.json`` (the tuned knobs), ``predictions/``,
``scores.json``, ``report.md``, ``report.html`` and ``plots/``. Re-running reuses finished stages:
a complete prior is loaded, the study resumes where it stopped, evaluation and report are redone.
`Run` is the pipeline; each stage is a function of :mod:`nvib.workflow.stages`. The config schema is
:mod:`nvib.workflow.settings`; model loading is :mod:`nvib.workflow.models`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console
from torch import nn

from nvib.core.config import NVConfig
from nvib.core.prior import EmpiricalPrior
from nvib.workflow.baselines import Baseline
from nvib.workflow.data import Example
from nvib.workflow.evaluate import Evaluation, Evaluator
from nvib.workflow.prompting import FewShotPrompt
from nvib.workflow.report import ReportPaths
from nvib.workflow.settings import DatasetSection, RunConfig
from nvib.workflow.stages import records, studies
from nvib.workflow.stages.baselines import tune_baselines
from nvib.workflow.stages.evaluation import evaluate_run
from nvib.workflow.stages.inputs import RunInputs
from nvib.workflow.stages.prior import (
    estimate_prior,
    estimate_run_prior,
    load_given_prior,
    prior_stats,
    reuse_prior,
    save_prior,
    stored_prior,
)
from nvib.workflow.stages.prompt_check import check_prompt
from nvib.workflow.stages.records import PRIOR_FILE, describe_data, prior_description, start_run
from nvib.workflow.stages.report import report_run
from nvib.workflow.stages.search import search_knobs, search_plan, tuned_knobs
from nvib.workflow.stages.validation import check_start_points, fit_config, validate

__all__ = [
    "Run",
    "check_start_points",
    "describe_data",
    "estimate_prior",
    "fit_config",
    "parse_shard",
    "prior_stats",
    "save_prior",
    "search_plan",
]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n) -> (i, n); None stays None."""
    if text is None:
        return None
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} is not of the form i/n. Fix: e.g. --shard 0/4 ... --shard 3/4") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= i < n. Fix: shards of n are numbered 0/n ... {n - 1}/n")
    return i, n


class Run:
    """A run's pipeline over one model object (loaded once, on first use): it calls the stages of
    :mod:`nvib.workflow.stages` in order and decides what to reuse (a loaded or complete prior, a stored study)."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path | None = None,
        *,
        console: Console | None = None,
        progress: bool = True,
        n_trials: int | None = None,
    ):
        self.dir = Path(run_dir) if run_dir is not None else config.default_run_dir()
        self.inputs = RunInputs(config, console or Console(stderr=True, soft_wrap=True), progress)
        self.n_trials = config.search.n_trials if n_trials is None else n_trials
        if self.n_trials < 0:
            raise ValueError(f"n_trials must be >= 0, got {self.n_trials}")
        self.prior_path = self.dir / PRIOR_FILE
        self.given_prior: Path | None = None  # a prior file the user passed (`--prior`): read only, never written
        self.allow_foreign_prior = config.prior.allow_foreign  # `--foreign-prior`: use a prior of other weights
        self._prior: EmpiricalPrior | None = None
        self._prompt_check: dict[str, Any] | None = None
        self._validated = False

    # -- what the stages share (`RunInputs`, `nvib.workflow.stages.records`, `nvib.workflow.stages.studies`)

    @property
    def config(self) -> RunConfig:
        """The run config (after `validate`: with the lengths fitted to the model)."""
        return self.inputs.config

    @property
    def console(self) -> Console:
        return self.inputs.console

    @property
    def progress(self) -> bool:
        return self.inputs.progress

    @property
    def loaded(self) -> tuple[nn.Module, Any]:
        return self.inputs.loaded

    @property
    def prompt(self) -> FewShotPrompt | None:
        return self.inputs.prompt

    def examples(self, split: str, name: str | None = None) -> list[Example]:
        return self.inputs.examples(split, name)

    def evaluator(self, progress) -> Evaluator:
        return self.inputs.evaluator(progress)

    def data_name(self, data: str | DatasetSection) -> str:
        return records.data_name(self.config, data)

    def identity(self) -> dict[str, Any]:
        return records.run_identity(self.config)

    @property
    def storage(self) -> str:
        return studies.storage_url(self.config, self.dir)

    @property
    def base_knobs(self) -> NVConfig:
        return studies.base_knobs(self.config)

    @property
    def sampler_seed(self) -> int:
        return studies.run_sampler_seed(self.config)

    def dev_slices(self, dev: Sequence[Example]) -> list[int]:
        return studies.dev_slices(self.config, dev)

    def study_identity(self, prior: EmpiricalPrior | None, model: nn.Module) -> dict[str, Any]:
        return studies.study_identity(self.config, prior, model)

    def tuned_knobs(self) -> NVConfig:
        return tuned_knobs(self.config, self.dir)

    # -- the stages

    def validate(self) -> None:
        """The start-up checks (`nvib.workflow.stages.validation.validate`), once."""
        if not self._validated:
            validate(self.inputs)
            self._validated = True

    def prior(self, *, required: bool = False) -> EmpiricalPrior:
        """The run's prior: the one passed (`given_prior`), else ``prior.safetensors`` if it is there and complete,
        else estimated and saved there; ``required``: refuse to estimate one where there is no file at all."""
        if self._prior is not None:
            return self._prior
        self.validate()
        if self.given_prior is not None:
            self._prior = load_given_prior(self.inputs, self.given_prior, self.allow_foreign_prior)
            return self._prior
        expected = prior_description(self.config)
        stored = stored_prior(self.dir, self.console)
        if stored is not None and stored.metadata.get("complete", True):
            self._prior = reuse_prior(self.inputs, self.dir, stored, expected, self.allow_foreign_prior)
            return self._prior
        if stored is not None:
            self.console.print(f"prior: {self.prior_path} is incomplete (interrupted); estimating again")
        elif required and not self.prior_path.is_file():
            raise FileNotFoundError(
                f"no prior at {self.prior_path}. "
                f"Fix: run `nvib run` first, or `nvib prior MODEL DATA -o {self.prior_path}`"
            )
        self._prior = estimate_run_prior(self.inputs, self.dir, expected)
        return self._prior

    def check_prompt(self) -> dict[str, Any] | None:
        """The few-shot prompt's start-up check (`nvib.workflow.stages.prompt_check`), once per run; None without
        a prompt or with its check off."""
        if self.prompt is None or not self.config.prompt.check or self._prompt_check is not None:
            return self._prompt_check
        self._prompt_check = check_prompt(self.inputs, self.dir, self.prior(required=True))
        return self._prompt_check

    def search(self) -> optuna.Study:
        """Tune the knobs on the dev set (resuming a stored study); writes nv_config.json."""
        self.validate()
        prior = self.prior(required=True)
        self.check_prompt()
        return search_knobs(self.inputs, self.dir, prior, self.n_trials)

    def baselines(self) -> tuple[dict[str, tuple[Baseline, float]], str | None]:
        """Tune the configured baselines on the unconverted model (resuming their studies): name -> (baseline,
        tuned value), and the name of the one with the best dev objective. Writes baselines.json."""
        return tune_baselines(self.inputs, self.dir, self.n_trials)

    def evaluate(self, knobs: NVConfig | None = None) -> Evaluation:
        """Evaluate unconverted / baselines / equivalence / tuned on every test set; write predictions, scores.json."""
        self.validate()
        prior = self.prior(required=True)
        tuned = knobs or self.tuned_knobs()
        self.check_prompt()
        baselines, best = self.baselines()
        return evaluate_run(self.inputs, self.dir, prior, tuned, baselines, best)

    def report(self, evaluation: Evaluation | None = None) -> ReportPaths:
        """Write report.md, report.html and plots/ from what the run directory holds."""
        path = self.given_prior or self.prior_path
        prior = self._prior or (EmpiricalPrior.load(path) if path.is_file() else None)
        return report_run(self.config, self.dir, self.console, evaluation, prior)

    def all(self) -> Evaluation:
        """validation -> prior -> search -> baselines and evaluation -> report."""
        self.validate()
        start_run(self.dir, self.config)
        self.prior()
        self.search()
        evaluation = self.evaluate()
        self.report(evaluation)
        return evaluation
