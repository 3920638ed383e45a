"""The commands over a run config: `nvib search`, `evaluate`, `run`, `schema` and `tour`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from nvib.cli.common import (
    ConfigArg,
    ConfigHelpCommand,
    ForeignPriorOpt,
    MetricOpt,
    PriorOpt,
    ProgressOpt,
    RunDirOpt,
    TrialsOpt,
    app,
    friendly_errors,
    open_run,
    stderr_console,
    with_metric,
)


@app.command("search", cls=ConfigHelpCommand)
@friendly_errors
def search_cmd(
    config: ConfigArg,
    run_dir: RunDirOpt = None,
    n_trials: TrialsOpt = None,
    metric: MetricOpt = None,
    prior: PriorOpt = None,
    foreign_prior: ForeignPriorOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Tune the NV knobs on the dev set (resumes the study in RUN_DIR); writes RUN_DIR/nv_config.json."""
    from nvib.workflow.settings import RunConfig

    open_run(with_metric(RunConfig.load(config), metric), run_dir, n_trials, progress, prior, foreign_prior).search()


@app.command("evaluate", cls=ConfigHelpCommand)
@friendly_errors
def evaluate_cmd(
    config: ConfigArg,
    run_dir: RunDirOpt = None,
    knobs: Annotated[
        Path | None, typer.Option(help="NVConfig JSON of the tuned knobs (default: RUN_DIR/nv_config.json).")
    ] = None,
    prior: PriorOpt = None,
    foreign_prior: ForeignPriorOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Evaluate the unconverted model, the baselines (tuned first if needed), NV at equivalence and tuned NV on
    every test set; write the report."""
    from nvib.core.config import NVConfig
    from nvib.workflow.settings import RunConfig

    run = open_run(RunConfig.load(config), run_dir, None, progress, prior, foreign_prior)
    if knobs is not None and not knobs.is_file():
        raise FileNotFoundError(f"no knobs file at {knobs}. Fix: pass the nv_config.json written by `nvib search`")
    evaluation = run.evaluate(NVConfig.load(knobs) if knobs is not None else None)
    run.report(evaluation)


@app.command("run", cls=ConfigHelpCommand)
@friendly_errors
def run_cmd(
    config: Annotated[
        Path | None,
        typer.Argument(help="Run config file (.yaml or .toml); omit with --tour.", show_default=False),
    ] = None,
    tour: Annotated[
        bool, typer.Option("--tour", help="Use the tour's embedded toy config (packaged MiniLM, see `nvib tour`).")
    ] = False,
    demo: Annotated[bool, typer.Option("--demo", hidden=True, help="Old name of --tour.")] = False,
    run_dir: RunDirOpt = None,
    n_trials: TrialsOpt = None,
    metric: MetricOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Prior -> search -> baselines -> evaluate -> report in one run directory; rerunning reuses finished stages."""
    from nvib.workflow.settings import RunConfig

    if demo:
        stderr_console().print(Text("note: `nvib run --demo` is now `nvib run --tour`", style="yellow"))
        tour = True
    if (config is None) == (not tour):
        raise ValueError(
            "give a config file or --tour (not both). Fix: e.g. `nvib run my_run.yaml` or `nvib run --tour`"
        )
    run_config = with_metric(RunConfig.tour() if tour else RunConfig.load(config), metric)
    run = open_run(run_config, run_dir, n_trials, progress)
    run.all()
    stderr_console().print(f"done: {run.dir}")


@app.command("schema")
def schema_cmd() -> None:
    """Print the JSON schema of run config files (for editors: YAML/TOML language servers validate with it)."""
    from nvib.workflow.settings import config_schema

    typer.echo(json.dumps(config_schema(), indent=2))


@app.command("tour")
@friendly_errors
def tour_cmd(run_dir: RunDirOpt = None, n_trials: TrialsOpt = None, progress: ProgressOpt = True) -> None:
    """A tour of the pipeline on toy data, same as `nvib run --tour` (what `make tour` runs; 2-4 minutes on two
    CPU cores): the packaged MiniLM warm-started as BERT2BERT (its decoder is untrained, so the outputs are poor:
    it shows the steps, not quality) on tiny docstring data; writes runs/tour/report.html."""
    from nvib.workflow.settings import RunConfig

    run = open_run(RunConfig.tour(), run_dir, n_trials, progress)
    run.all()
    stderr_console().print(f"done: {run.dir}")


@app.command("demo", hidden=True)
def demo_cmd(run_dir: RunDirOpt = None, n_trials: TrialsOpt = None, progress: ProgressOpt = True) -> None:
    """Old name of `nvib tour`."""
    stderr_console().print(Text("note: `nvib demo` is now `nvib tour`", style="yellow"))
    tour_cmd(run_dir, n_trials, progress)
