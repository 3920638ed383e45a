"""Generate, score and compare: the unconverted model, the NV model at equivalence and the tuned NV model.

Tasks and their metrics: ``summarisation`` -> ROUGE-1/2/L (rouge-score, stemmed), ``translation`` ->
sacreBLEU BLEU and chrF, both also the mean token NLL of the references under teacher forcing (``nll``);
``lm`` -> teacher-forced perplexity (token-weighted over the whole set). Every metric is a
:class:`nvib.workflow.metrics.CorpusMetric`, so paired bootstrap intervals come from per-example statistics; for the
likelihood metrics the per-example "outputs" are ``(summed NLL, token count)`` rows. Generated outputs also
get their :class:`nvib.workflow.metrics.Diversity` recorded. Running a model over examples is
:class:`nvib.workflow.evaluator.Evaluator`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nvib.core.config import NVConfig
from nvib.core.convert import VisiblePriorWarning, configure, convert, is_converted, unload
from nvib.core.diagnostics import record_prior_mass
from nvib.core.files import dumps, write_json, write_text
from nvib.workflow.data import Example
from nvib.workflow.evaluator import Evaluator, metric
from nvib.workflow.formatting import difference_parts, metric_unit
from nvib.workflow.metrics import (
    LIKELIHOOD_METRICS,
    LOWER_IS_BETTER,
    diversity,
    paired_bootstrap,
)
from nvib.workflow.objectives import DevObjective, Output
from nvib.workflow.settings import DEFAULT_OBJECTIVE, TASK_METRICS, TASKS, GenerationArgs

__all__ = [
    "TASKS",
    "TASK_METRICS",
    "VARIANTS",
    "DEFAULT_OBJECTIVE",
    "LOWER_IS_BETTER",
    "DevObjective",
    "Evaluation",
    "Evaluator",
    "GenerationArgs",
    "Output",
    "evaluate_variants",
    "metric",
    "new_progress",
]

#: Variant key -> label in the report (the baselines only where a run tunes them).
VARIANTS = {
    "unconverted": "unconverted", "temperature": "temperature", "wise_ft": "WiSE-FT",
    "nv_equivalence": "NV equivalence", "nv_tuned": "NV tuned",
}  # fmt: skip
BASELINES = ("temperature", "wise_ft")


def new_progress(enabled: bool = True, console=None) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
        console=console,
    )


@dataclass
class Evaluation:
    """Everything `evaluate_variants` measured; ``to_json()`` is what scores.json holds."""

    task: str
    metrics: tuple[str, ...]
    tuned: dict[str, float]
    results: dict[str, dict[str, dict[str, float]]]  # variant -> test set -> metric -> value
    differences: dict[str, dict[str, dict[str, Any]]]  # variant -> test set -> metric -> BootstrapResult
    equivalence: dict[str, dict[str, Any]]  # test set -> {identical, ...}
    tokens: dict[str, dict[str, int]]  # variant -> test set -> generated tokens (lm: scored tokens)
    seconds: dict[str, dict[str, float]]
    prior_mass: dict[str, dict[str, float]]  # test set -> site kind -> mass at the tuned knobs
    generation: dict[str, Any]
    predictions: dict[str, dict[str, str]]  # variant -> test set -> file name
    diversity: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # variant -> test set -> stats
    baselines: dict[str, float] = field(default_factory=dict)  # baseline -> its tuned value
    best_baseline: str | None = None  # the baseline with the best dev objective
    against_baseline: dict[str, dict[str, Any]] = field(default_factory=dict)  # test set -> metric -> NV − best
    verdicts: dict[str, str] = field(default_factory=dict)  # test set -> one plain sentence

    @property
    def identical(self) -> bool:
        return all(e["identical"] for e in self.equivalence.values())

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["differences"] = {
            v: {ts: {m: asdict(r) for m, r in per.items()} for ts, per in sets.items()}
            for v, sets in self.differences.items()
        }
        out["against_baseline"] = {
            ts: {m: asdict(r) for m, r in per.items()} for ts, per in self.against_baseline.items()
        }
        out["equivalence_identical"] = self.identical
        return out


LM_TOLERANCE = 1e-5  # relative perplexity difference that float32 round-off explains


def _equivalence_check(task: str, a: Sequence[Output], b: Sequence[Output], scores_a, scores_b) -> dict:
    """Generation: identical iff every prediction and text score is (the reference NLL's relative difference
    is reported too: it also moves when the prior keeps a tiny weight at equivalence, e.g. in random-weight
    models); lm: iff the perplexities agree to round-off."""
    likelihood = [m for m in scores_a if m in LIKELIHOOD_METRICS]
    rel = max((abs(scores_b[m] - scores_a[m]) / max(abs(scores_a[m]), 1e-300) for m in likelihood), default=0.0)
    close = {"max_relative_difference": rel, "tolerance": LM_TOLERANCE}
    if task == "lm":
        return {"identical": bool(rel <= LM_TOLERANCE), **close}
    differing = sum(x.prediction != y.prediction for x, y in zip(a, b, strict=True))
    same_text = all(scores_a[m] == scores_b[m] for m in scores_a if m not in LIKELIHOOD_METRICS)
    identical = differing == 0 and same_text
    return {"identical": identical, "differing_predictions": differing, **(close if likelihood else {})}


def _outcome(result: Any, metric_name: str) -> int:
    """+1 if the 95% interval of a difference lies on the better side of 0, -1 on the worse side, 0 if it holds 0."""
    sign = -1 if metric_name in LOWER_IS_BETTER else 1
    low, high = sorted((sign * result.ci_low, sign * result.ci_high))
    return 1 if low > 0 else -1 if high < 0 else 0


def verdict(test: str, metric_name: str, vs_unconverted: Any, vs_baseline: Any | None, label: str | None) -> str:
    """One plain sentence: whether NV tuned beat the unconverted model and the best baseline on ``test``."""
    words = {1: "beat", 0: "did not beat", -1: "was worse than"}

    unit = f" {metric_unit(metric_name)}" if metric_unit(metric_name) else ""

    def part(what: str, r: Any) -> str:
        delta, interval = difference_parts(r.delta, r.ci_low, r.ci_high, metric_name)
        return f"{words[_outcome(r, metric_name)]} {what} ({metric_name} Δ {delta}{unit}, 95% interval {interval})"

    text = f"{test}: NV tuned {part('the unconverted model', vs_unconverted)}"
    if vs_baseline is not None:
        text += f" and {part(f'the best baseline, {label}', vs_baseline)}"
    return text + "."


def _write_predictions(path: Path, examples: Sequence[Example], outputs: Sequence[Output]) -> None:
    lines = []
    for ex, o in zip(examples, outputs, strict=True):
        row: dict[str, Any] = {"source": ex.source, "reference": ex.target}
        if o.prediction is not None:
            row["prediction"] = o.prediction
            row["generated_tokens"] = o.n_tokens
        if o.nll is not None:
            tokens = o.nll_tokens if o.nll_tokens is not None else o.n_tokens
            row.update(nll=o.nll, tokens=tokens, perplexity=math.exp(o.nll / max(tokens, 1)))
        lines.append(dumps(row, ensure_ascii=False) + "\n")
    write_text(path, "".join(lines))


def evaluate_variants(
    evaluator: Evaluator,
    test_sets: Mapping[str, Sequence[Example]],
    prior: Any,
    tuned: NVConfig,
    out_dir: str | Path,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    log: Callable[[str], None] = print,
    baselines: Mapping[str, tuple[Any, float]] | None = None,
    best_baseline: str | None = None,
    metric_name: str | None = None,
) -> Evaluation:
    """Evaluate the unconverted model, each baseline at its tuned value, the NV model at equivalence and at
    ``tuned`` on every test set.

    ``baselines``: name (``temperature``, ``wise_ft``) -> (:class:`nvib.workflow.baselines.Baseline` of the unconverted
    model, tuned value); ``best_baseline`` (the one with the best dev objective) is what NV tuned is also compared
    with, and ``metric_name`` (default: the task's likelihood metric) what the one-sentence verdicts read. One model
    object throughout: an NV model is unloaded first, each baseline set and reset, then the model is converted (with
    ``prior``) and reconfigured; it is left converted at ``tuned``. Writes ``predictions/<variant>.<test set>.jsonl``
    and ``scores.json`` under ``out_dir``.
    """
    model = evaluator.model
    out = Path(out_dir)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    if is_converted(model):
        unload(model)
    baselines = dict(baselines or {})
    if best_baseline is not None and best_baseline not in baselines:
        raise ValueError(f"best_baseline {best_baseline!r} is not among the baselines {sorted(baselines)}")
    present = [v for v in VARIANTS if v not in BASELINES or v in baselines]
    outputs: dict[str, dict[str, list[Output]]] = {v: {} for v in present}
    seconds: dict[str, dict[str, float]] = {v: {} for v in present}
    mass: dict[str, dict[str, float]] = {}

    def run(variant: str) -> None:
        for name, examples in test_sets.items():
            start = time.perf_counter()
            if variant == "nv_tuned":
                with record_prior_mass(model) as m:
                    outputs[variant][name] = evaluator.outputs(examples, f"{variant} · {name}")
                mass[name] = dict(m)
            else:
                outputs[variant][name] = evaluator.outputs(examples, f"{variant} · {name}")
            seconds[variant][name] = time.perf_counter() - start

    run("unconverted")
    for name, (baseline, value) in baselines.items():
        baseline.set(value)
        try:
            run(name)
        finally:
            baseline.reset()
    convert(model, NVConfig(), prior=prior)
    run("nv_equivalence")
    with warnings.catch_warnings():  # the tuned knobs are meant to differ from the pretrained model
        warnings.simplefilter("ignore", VisiblePriorWarning)
        configure(model, tuned)
    run("nv_tuned")

    results: dict[str, dict[str, dict[str, float]]] = {v: {} for v in present}
    differences: dict[str, dict[str, dict[str, Any]]] = {v: {} for v in present if v != "unconverted"}
    against: dict[str, dict[str, Any]] = {}
    equivalence: dict[str, dict[str, Any]] = {}
    files: dict[str, dict[str, str]] = {v: {} for v in present}

    def compare(a: str, b: str, name: str, refs: list) -> dict[str, Any]:
        """metric(b) − metric(a) on test set `name`, paired bootstrap, per metric."""
        return {
            m: paired_bootstrap(
                metric(m),
                evaluator.metric_inputs(outputs[a][name], m),
                evaluator.metric_inputs(outputs[b][name], m),
                refs,
                n=bootstrap,
                seed=seed,
            )
            for m in evaluator.metrics
        }

    verdict_metric = metric_name or next(
        (m for m in evaluator.metrics if m in LIKELIHOOD_METRICS), evaluator.metrics[0]
    )
    verdicts: dict[str, str] = {}
    for name, examples in test_sets.items():
        refs = [ex.target for ex in examples]
        for variant in present:
            results[variant][name] = evaluator.scores(outputs[variant][name], examples)
            file = f"{variant}.{name}.jsonl"
            _write_predictions(out / "predictions" / file, examples, outputs[variant][name])
            files[variant][name] = f"predictions/{file}"
        for variant in differences:
            differences[variant][name] = compare("unconverted", variant, name, refs)
        if best_baseline is not None:
            against[name] = compare(best_baseline, "nv_tuned", name, refs)
        verdicts[name] = verdict(
            name, verdict_metric, differences["nv_tuned"][name][verdict_metric],
            against[name][verdict_metric] if best_baseline is not None else None,
            VARIANTS[best_baseline] if best_baseline is not None else None,
        )  # fmt: skip
        log(verdicts[name])
        equivalence[name] = _equivalence_check(
            evaluator.task,
            outputs["unconverted"][name],
            outputs["nv_equivalence"][name],
            results["unconverted"][name],
            results["nv_equivalence"][name],
        )
        same = "identical" if equivalence[name]["identical"] else "NOT identical"
        log(f"equivalence on {name}: NV model at equivalence is {same} to the unconverted model")
    evaluation = Evaluation(
        task=evaluator.task,
        metrics=evaluator.metrics,
        tuned=tuned.to_dict(),
        results=results,
        differences=differences,
        equivalence=equivalence,
        tokens={v: {n: sum(o.n_tokens for o in outs) for n, outs in sets.items()} for v, sets in outputs.items()},
        seconds=seconds,
        prior_mass=mass,
        generation={**asdict(evaluator.generation), "kwargs": dict(evaluator.generation.kwargs)},
        predictions=files,
        baselines={n: float(v) for n, (_, v) in baselines.items()},
        best_baseline=best_baseline,
        against_baseline=against,
        verdicts=verdicts,
        diversity={
            v: {n: diversity([o.prediction for o in outs]).as_dict() for n, outs in sets.items()}
            for v, sets in outputs.items()
        }
        if evaluator.task != "lm"
        else {},
    )
    write_json(out / "scores.json", evaluation.to_json())
    return evaluation
