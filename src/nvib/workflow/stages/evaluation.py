"""The evaluation stage: the unconverted model, the tuned baselines, NV at equivalence and NV at the tuned knobs
on every test set (`nvib.workflow.evaluate.evaluate_variants`); writes predictions/ and scores.json, and shows the
results table."""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from nvib.core.config import NVConfig
from nvib.core.prior import EmpiricalPrior
from nvib.workflow.baselines import Baseline
from nvib.workflow.evaluate import VARIANTS, Evaluation, evaluate_variants, new_progress
from nvib.workflow.formatting import difference_parts, interval_decimals, metric_decimals, metric_label
from nvib.workflow.stages.inputs import RunInputs
from nvib.workflow.stages.records import start_run

__all__ = ["evaluate_run", "results_table"]


def evaluate_run(
    inputs: RunInputs,
    run_dir: Path,
    prior: EmpiricalPrior,
    tuned: NVConfig,
    baselines: dict[str, tuple[Baseline, float]],
    best_baseline: str | None,
) -> Evaluation:
    """Evaluate every variant on every test set into ``run_dir``; returns the evaluation."""
    cfg = inputs.config
    start_run(run_dir, cfg)
    tests = {name: inputs.examples("test", name) for name in cfg.data.test}
    bar, start = new_progress(inputs.progress, inputs.console), time.perf_counter()
    with bar:
        evaluation = evaluate_variants(
            inputs.evaluator(bar),
            tests,
            prior,
            tuned,
            run_dir,
            bootstrap=cfg.evaluation.bootstrap,
            seed=cfg.evaluation.seed,
            log=bar.console.print,
            baselines=baselines,
            best_baseline=best_baseline,
            metric_name=cfg.metric,
        )
    inputs.console.print(results_table(evaluation))
    inputs.console.print(f"evaluation: {time.perf_counter() - start:.0f} s -> {run_dir / 'scores.json'}")
    return evaluation


def results_table(evaluation: Evaluation) -> Table:
    """Each test set's metrics per variant, with the difference to the unconverted model."""
    table = Table(caption="(Δ vs unconverted; 95% bootstrap intervals in scores.json and report.md)")
    for column in ("test set", "metric", *(VARIANTS[v] for v in evaluation.results)):
        table.add_column(column, justify="left" if column in ("test set", "metric") else "right")
    for name in evaluation.equivalence:
        for m in evaluation.metrics:
            diffs = {v: d[name][m] for v, d in evaluation.differences.items() if m in d.get(name, {})}
            places = max([metric_decimals(m)] + [interval_decimals(d.ci_low, d.ci_high) for d in diffs.values()])
            cells = []
            for variant in evaluation.results:
                cell = f"{evaluation.results[variant][name][m]:.{places}f}"
                if variant in diffs:
                    d = diffs[variant]
                    cell += f" ({difference_parts(d.delta, d.ci_low, d.ci_high, m)[0]})"
                cells.append(cell)
            table.add_row(name, metric_label(m), *cells)
    return table
