"""The report stage: report.md, report.html and plots/ from the study, the prior's statistics and the evaluation
(`nvib.workflow.report.write_report`), with notes of what the run used."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console

from nvib.core.prior import EmpiricalPrior
from nvib.workflow.evaluate import LOWER_IS_BETTER, VARIANTS, Evaluation
from nvib.workflow.metrics import LIKELIHOOD_METRICS
from nvib.workflow.models import model_location
from nvib.workflow.report import ReportPaths, write_report
from nvib.workflow.settings import RunConfig
from nvib.workflow.stages.prior import prior_stats
from nvib.workflow.stages.records import data_name
from nvib.workflow.stages.studies import run_sampler_seed, storage_url, stored_study

__all__ = ["report_run", "run_notes"]


def run_notes(config: RunConfig, evaluation: Evaluation | None) -> dict[str, str]:
    """The report's notes: the model, task, data, search settings and, with an evaluation, what it measured
    beside the results (baselines, equivalence, tokens)."""
    cfg = config
    notes = {
        "model": f"{model_location(cfg.model.path, cfg.base_dir)} ({cfg.model.kind})",
        "task": cfg.task,
        "train (prior)": data_name(cfg, cfg.data.train),
        "dev (search)": data_name(cfg, cfg.data.dev),
        "search metric": cfg.metric + (" (the search maximises its negative)" if cfg.metric in LOWER_IS_BETTER else ""),
        "diversity guard": "not needed (likelihood objective)"
        if cfg.metric in LIKELIHOOD_METRICS
        else (
            f"trials whose dev outputs are less diverse (distinct predictions or distinct-2) than "
            f"{cfg.search.min_diversity:g} × the unconverted model's are pruned"
            if cfg.search.min_diversity is not None
            else "off (search.min_diversity: null)"
        ),
        "sampler seed": f"{run_sampler_seed(cfg)} (from the dev data's name and search.seed={cfg.search.seed})",
        "generation": ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg.generation).items()),
    }
    if evaluation is not None:
        for name, value in evaluation.baselines.items():
            notes[f"baseline {VARIANTS[name]}"] = f"{value:.4g} (tuned like the knobs: same objective and dev data)"
        notes["equivalence"] = ", ".join(
            f"{name}: {'identical' if e['identical'] else 'NOT identical'}"
            for name, e in evaluation.equivalence.items()
        )
        for variant, sets in evaluation.tokens.items():
            what = "scored" if evaluation.task == "lm" else "generated"
            notes[f"{what} tokens, {VARIANTS[variant]}"] = ", ".join(f"{n}: {t}" for n, t in sets.items())
    return notes


def report_run(
    config: RunConfig, run_dir: Path, console: Console, evaluation: Evaluation | None, prior: EmpiricalPrior | None
) -> ReportPaths:
    """Write the run's report into ``run_dir`` (what is there: the study, ``prior``, ``evaluation``)."""
    cfg = config
    study = stored_study(storage_url(cfg, run_dir), cfg.search.study_name)
    results = differences = mass = diversity = verdicts = against = None
    if evaluation is not None:
        verdicts = list(evaluation.verdicts.values())
        if evaluation.best_baseline is not None:
            against = (VARIANTS[evaluation.best_baseline], evaluation.against_baseline)
        results = {VARIANTS[v]: r for v, r in evaluation.results.items()}
        diversity = {VARIANTS[v]: d for v, d in evaluation.diversity.items()} or None
        differences = {VARIANTS[v]: d for v, d in evaluation.differences.items()}
        single = len(evaluation.prior_mass) == 1
        mass = {
            (kind if single else f"{name}: {kind}"): value
            for name, per in evaluation.prior_mass.items()
            for kind, value in per.items()
        }
    paths = write_report(
        run_dir,
        title=f"NVIB run: {_model_name(model_location(cfg.model.path, cfg.base_dir))} ({cfg.task})",
        study=study,
        results=results,
        differences=differences,
        baseline=VARIANTS["unconverted"],
        prior_stats=prior_stats(prior) if prior is not None else None,
        prior_mass=mass,
        notes=run_notes(cfg, evaluation),
        diversity=diversity,
        verdicts=verdicts,
        against=against,
    )
    console.print(f"report: {paths.markdown} and {paths.html}")
    return paths


def _model_name(path: Path | str) -> str:
    if isinstance(path, str):  # a hub id
        return path
    return path.parent.name if path.name == "model" else path.name
