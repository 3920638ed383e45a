"""Running one model over examples for one task: generated predictions (greedy or beam, or behind a few-shot
prompt's shared prefix) and the references' teacher-forced NLL, in batches, and the task's metrics over them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from nvib.workflow.data import DataError, Example, batches
from nvib.workflow.metrics import LIKELIHOOD_METRICS, CorpusMetric, get_metric
from nvib.workflow.objectives import DEFAULT_MAX_LOGITS, Output, target_nll
from nvib.workflow.prompting import FewShotPrompt, SharedPrefix
from nvib.workflow.settings import TASK_METRICS, TASKS, GenerationArgs

__all__ = ["Evaluator", "metric"]


def metric(name: str) -> CorpusMetric:
    """A task metric by name: any of :data:`nvib.workflow.metrics.METRICS` (``perplexity`` and ``nll`` included)."""
    return get_metric(name)


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
