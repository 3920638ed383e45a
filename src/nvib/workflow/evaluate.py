"""Generate, score and compare: the unconverted model, the NV model at equivalence and the tuned NV model.

Tasks and their metrics: ``summarisation`` -> ROUGE-1/2/L (rouge-score, stemmed), ``translation`` ->
sacreBLEU BLEU and chrF, both also the mean token NLL of the references under teacher forcing (``nll``);
``lm`` -> teacher-forced perplexity (token-weighted over the whole set). Every metric is a
:class:`nvib.workflow.metrics.CorpusMetric`, so paired bootstrap intervals come from per-example statistics; for the
likelihood metrics the per-example "outputs" are ``(summed NLL, token count)`` rows. Generated outputs also
get their :class:`nvib.workflow.metrics.Diversity` recorded.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from nvib.core.config import NVConfig
from nvib.core.convert import VisiblePriorWarning, configure, convert, is_converted, unload
from nvib.core.diagnostics import record_prior_mass
from nvib.core.files import dumps, write_json, write_text
from nvib.workflow.data import DataError, Example, batches
from nvib.workflow.formatting import difference_parts, metric_unit
from nvib.workflow.metrics import (
    LIKELIHOOD_METRICS,
    LOWER_IS_BETTER,
    CorpusMetric,
    diversity,
    get_metric,
    paired_bootstrap,
)
from nvib.workflow.objectives import DEFAULT_MAX_LOGITS, DevObjective, Output, target_nll
from nvib.workflow.prompting import FewShotPrompt, SharedPrefix
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


def metric(name: str) -> CorpusMetric:
    """A task metric by name: any of :data:`nvib.workflow.metrics.METRICS` (``perplexity`` and ``nll`` included)."""
    return get_metric(name)


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


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _count_generated(rows: torch.Tensor, eos: int | None, pad: int | None) -> list[int]:
    """Generated tokens per row: up to and including the first EOS, else every non-pad token."""
    counts = []
    for row in rows.tolist():
        if eos is not None and eos in row:
            counts.append(row.index(eos) + 1)
        else:
            counts.append(sum(t != pad for t in row) if pad is not None else len(row))
    return counts


class Evaluator:
    """Runs one model over examples for one task; the model may change (convert/configure) between calls."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        task: str,
        generation: GenerationArgs,
        *,
        max_source_len: int,
        max_target_len: int,
        lm_separator: str = "\n",
        progress: Progress | None = None,
        max_logits: int = DEFAULT_MAX_LOGITS,
        prompt: FewShotPrompt | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        if prompt is not None and (task == "lm" or generation.num_beams != 1 or generation.kwargs):
            raise ValueError(
                "a few-shot prompt scores targets and decodes greedily (its prefix cache is shared). Fix: use task "
                "summarisation or translation, generation.num_beams 1 and no generation.kwargs, or drop the prompt"
            )
        self.model, self.tokenizer, self.task, self.generation = model, tokenizer, task, generation
        self.max_source_len, self.max_target_len, self.lm_separator = (
            max_source_len,
            max_target_len,
            lm_separator,
        )
        self.progress, self.max_logits, self.prompt = progress, max_logits, prompt
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        if prompt is not None and self.seq2seq:
            raise ValueError("a few-shot prompt is for decoder-only models. Fix: drop the prompt section")

    @property
    def metrics(self) -> tuple[str, ...]:
        return TASK_METRICS[self.task]

    def outputs(
        self,
        examples: Sequence[Example],
        description: str = "generate",
        *,
        generate: bool | None = None,
        score: bool = True,
    ) -> list[Output]:
        """One output per example, in order, made in batches of ``generation.batch_size``: the generated
        prediction (``generate``, default: unless the task is lm) and the teacher-forced NLL of the reference
        (``score``; lm always scores and never generates)."""
        generate = self.task != "lm" if generate is None else generate and self.task != "lm"
        score = score or self.task == "lm"
        if not (generate or score):
            raise ValueError("nothing to do: pass generate=True and/or score=True")
        if self.task != "lm":
            missing = [i for i, ex in enumerate(examples) if ex.target is None]
            if missing:
                raise DataError(
                    f"{description}: example {missing[0]} has no reference text. "
                    "Fix: load the data with a target column (data.target_column)."
                )

        def run(chunk: Sequence[Example]) -> list[Output]:
            gen = self._generate(chunk) if generate else [Output(None, 0)] * len(chunk)
            if not score:
                return gen
            nll = self._nll(chunk)
            if self.task == "lm":
                return nll
            return [Output(g.prediction, g.n_tokens, s.nll, s.nll_tokens) for g, s in zip(gen, nll, strict=True)]

        bar = self.progress
        task_id = bar.add_task(description, total=len(examples), info="") if bar is not None else None
        out: list[Output] = []
        self.model.eval()
        try:
            if self.prompt is not None:
                advance = (lambda n: bar.update(task_id, advance=n)) if bar is not None else None
                return self._prompted(examples, generate, score, advance)
            for chunk in _chunks(examples, self.generation.batch_size):
                with torch.inference_mode():
                    out += run(chunk)
                if bar is not None:
                    info = f"{sum(o.n_tokens for o in out)} tokens" if generate else ""
                    bar.update(task_id, advance=len(chunk), info=info)
        finally:
            if bar is not None:
                bar.remove_task(task_id)
        return out

    def _prompted(
        self, examples: Sequence[Example], generate: bool, score: bool, advance: Callable[[int], None] | None
    ) -> list[Output]:
        """Outputs behind the few-shot prompt's shared prefix (its cache made once for this call: the model may
        have changed since the last)."""
        engine = SharedPrefix(self.model, self.prompt, on_batch=advance)  # type: ignore[arg-type]
        items = [self.prompt.encode(ex) for ex in examples]  # type: ignore[union-attr]
        size = self.generation.batch_size
        if not generate:
            return [Output(None, 0, s.nll, s.n) for s in engine.nll(items, size)]
        scored, ids = engine.evaluate(items, self.generation.max_new_tokens, size, score=score)
        texts = [self.prompt.prediction(g) for g in ids]  # type: ignore[union-attr]
        if scored is None:
            return [Output(t, len(g)) for t, g in zip(texts, ids, strict=True)]
        return [Output(t, len(g), s.nll, s.n) for t, g, s in zip(texts, ids, scored, strict=True)]

    def _generate(self, chunk: Sequence[Example]) -> list[Output]:
        model, tok, gen = self.model, self.tokenizer, self.generation
        config = model.generation_config
        if self.seq2seq:
            enc = tok(
                [ex.source for ex in chunk],
                truncation=True,
                max_length=self.max_source_len,
                padding=True,
                return_tensors="pt",
            )
        else:  # decoder-only: the prompt is the source and the separator, padded on the left
            enc = tok(
                [ex.source + self.lm_separator for ex in chunk],
                truncation=True,
                max_length=self.max_source_len,
                padding=True,
                padding_side="left",
                return_tensors="pt",
            )
        device = next(model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        pad = config.pad_token_id if config.pad_token_id is not None else tok.pad_token_id
        eos = config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        sequences = model.generate(
            **enc,
            num_beams=gen.num_beams,
            max_new_tokens=gen.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            **dict(gen.kwargs),
        )
        new = sequences[:, 1:] if self.seq2seq else sequences[:, enc["input_ids"].shape[1] :]
        texts = tok.batch_decode(new, skip_special_tokens=True)
        counts = _count_generated(new, eos, pad)
        return [Output(text.strip(), n) for text, n in zip(texts, counts, strict=True)]

    def _nll(self, chunk: Sequence[Example]) -> list[Output]:
        kind = "seq2seq" if self.seq2seq else "lm"
        device = next(self.model.parameters()).device
        (batch,) = batches(
            chunk,
            self.tokenizer,
            len(chunk),
            self.max_source_len,
            self.max_target_len,
            kind,
            lm_separator=self.lm_separator,
        )
        nll, counts = target_nll(self.model, {k: v.to(device) for k, v in batch.items()}, max_logits=self.max_logits)
        lm = self.task == "lm"
        return [
            Output(None, int(n) if lm else 0, float(v), int(n))
            for v, n in zip(nll.tolist(), counts.tolist(), strict=True)
        ]

    def metric_inputs(self, outputs: Sequence[Output], name: str | None = None) -> list[Any]:
        """What metric ``name``'s CorpusMetric takes as predictions (default: the task's first metric):
        ``(summed NLL, tokens)`` rows for likelihood metrics, else the predicted texts."""
        name = name or self.metrics[0]
        if name in LIKELIHOOD_METRICS:
            if any(o.nll is None for o in outputs):
                raise ValueError(f"metric {name!r} needs the references' NLL: make the outputs with score=True")
            return [(o.nll, o.nll_tokens if o.nll_tokens is not None else o.n_tokens) for o in outputs]
        if any(o.prediction is None for o in outputs):
            raise ValueError(f"metric {name!r} needs predictions: make the outputs with generate=True")
        return [o.prediction for o in outputs]

    def scores(self, outputs: Sequence[Output], examples: Sequence[Example]) -> dict[str, float]:
        refs = [ex.target for ex in examples]
        return {name: metric(name)(self.metric_inputs(outputs, name), refs) for name in self.metrics}


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
