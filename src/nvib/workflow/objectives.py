"""Search objectives: the likelihood of the dev references (the default) and generation metrics with an
output-diversity guard.

- :func:`target_nll`: per-example summed negative log-likelihood of the target tokens of one batch made by
  :func:`nvib.workflow.data.batches`, under teacher forcing (one forward pass, no generation). For decoder-only models
  only the target positions reach the LM head (``logits_to_keep`` as a boolean mask), so a 262k-token
  vocabulary never yields ``[batch, sequence, vocab]`` logits; logits are made in row chunks of at most
  ``max_logits`` elements.
- :func:`examples_nll`: the same over a list of examples, batched.
- :class:`DevObjective`: what :func:`nvib.workflow.search.run_search` calls: the metric on the first n dev examples at
  given knobs, cached per (knobs, example). For generation metrics it also measures the outputs'
  :class:`nvib.workflow.metrics.Diversity` and rejects (the search prunes) knobs whose outputs are less diverse than
  ``min_diversity`` × those of the model at equivalence (= the unconverted model) on the same examples.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import transformers
from torch import nn

from nvib.core.config import NVConfig
from nvib.core.convert import StdevClampWarning, VisiblePriorWarning, configure
from nvib.workflow.data import BatchKind, Example, batches
from nvib.workflow.metrics import LIKELIHOOD_METRICS, LOWER_IS_BETTER, Diversity, diversity, get_metric

__all__ = [
    "DEFAULT_MAX_LOGITS",
    "DevObjective",
    "Output",
    "OutputSource",
    "TrialResult",
    "examples_nll",
    "target_nll",
]

#: Largest logits tensor made at once (elements): 2**24 = 64 positions of a 262k vocabulary; the log-softmax is
#: taken in float64 (a float32 one over 262k logits is off by ~1e-5 relative), so ~12 bytes per element, 192 MiB.
DEFAULT_MAX_LOGITS = 2**24


@dataclass(frozen=True)
class TrialResult:
    """What an objective returns for one slice: ``value`` (maximised), generated tokens, extra values to
    record on the trial (``attrs``), and ``reject``: a reason to prune the trial, or None."""

    value: float
    n_tokens: int | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)
    reject: str | None = None


@dataclass(frozen=True)
class Output:
    """One example's output: a prediction (generation tasks) and/or the summed NLL of its reference over
    ``nll_tokens`` target tokens; ``n_tokens`` counts the generated tokens, or the scored tokens for lm."""

    prediction: str | None
    n_tokens: int
    nll: float | None = None
    nll_tokens: int | None = None


class OutputSource(Protocol):
    """What :class:`DevObjective` needs of an evaluator (:class:`nvib.workflow.evaluate.Evaluator` is one)."""

    model: nn.Module
    task: str

    @property
    def metrics(self) -> Sequence[str]: ...

    def outputs(
        self, examples: Sequence[Example], description: str, *, generate: bool, score: bool
    ) -> list[Output]: ...

    def metric_inputs(self, outputs: Sequence[Output], metric_name: str) -> Any: ...


# ----------------------------------------------------------------------------------------------
# likelihood


def _row_chunks(sizes: Sequence[int], budget: int) -> list[slice]:
    """Consecutive row ranges whose summed ``sizes`` stay within ``budget`` (a row alone may exceed it)."""
    out, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > budget:
            out.append(slice(start, i))
            start, total = i, 0
        total += size
    out.append(slice(start, len(sizes)))
    return out


# a boolean [B, L] `logits_to_keep` works in transformers 5.24 (tested) but not in 5.15 (IndexError in the model);
# older releases take the dense path: full logits in row chunks of at most `max_logits` elements
BOOLEAN_LOGITS_TO_KEEP = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return BOOLEAN_LOGITS_TO_KEEP and "logits_to_keep" in inspect.signature(model.forward).parameters


def _scatter_nll(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Summed NLL per row [n_rows] of ``targets`` [N] under ``logits`` [N, V] (log-softmax in float64);
    ``rows`` [N]: the row of each position."""
    nll = nn.functional.cross_entropy(logits.double(), targets, reduction="none")
    return torch.zeros(n_rows, dtype=torch.float64, device=nll.device).index_add_(0, rows, nll)


def target_nll(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    max_logits: int = DEFAULT_MAX_LOGITS,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed target-token NLL per example [B] (float64, nats) and target-token counts [B] (long).

    ``batch``: ``input_ids``, ``attention_mask`` [B, L] and ``labels`` (-100 where not scored), as
    :func:`nvib.workflow.data.batches` makes them (``seq2seq``: labels [B, T] are the decoder's targets; ``lm``: labels
    [B, L] equal ``input_ids`` on the target and -100 on prompt and padding). A decoder-only model scores the
    token at position t+1 from position t; only positions whose next label is a target reach the LM head.
    ``forward_kwargs`` go to every forward call; rows are split into chunks of at most ``max_logits`` logits,
    so anything batch-shaped in them must allow that (or pass a ``max_logits`` that keeps the batch whole).
    Call under ``torch.inference_mode()``; the model should be in eval mode.
    """
    for key in ("input_ids", "attention_mask", "labels"):
        if key not in batch:
            raise ValueError(
                f"batch has no {key!r}. Fix: make it with nvib.workflow.data.batches(kind='seq2seq' or 'lm')"
            )
    if max_logits < 1:
        raise ValueError(f"max_logits must be >= 1, got {max_logits}")
    device = next(model.parameters()).device
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    extra = dict(forward_kwargs or {})
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else 1
    n_rows = ids.shape[0]
    nll = torch.zeros(n_rows, dtype=torch.float64, device=device)
    if getattr(model.config, "is_encoder_decoder", False):
        counts = (labels != -100).sum(-1)
        for rows in _row_chunks([labels.shape[1] * vocab] * n_rows, max_logits):
            lab = labels[rows]
            if hasattr(model, "prepare_decoder_input_ids_from_labels"):
                decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=lab)
                out = model(input_ids=ids[rows], attention_mask=mask[rows], decoder_input_ids=decoder_ids, **extra)
            else:  # the model shifts the labels into decoder inputs itself
                out = model(input_ids=ids[rows], attention_mask=mask[rows], labels=lab, use_cache=False, **extra)
            keep = lab != -100
            where = keep.nonzero()[:, 0] + rows.start
            nll += _scatter_nll(out.logits[keep], lab[keep], where, n_rows)
        return nll, counts.cpu()
    # decoder-only: position t predicts labels[:, t + 1]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    targets_all = labels[:, 1:][keep[:, :-1]]
    counts = keep.sum(-1)
    sparse = _accepts_logits_to_keep(model)
    sizes = (counts * vocab).tolist() if sparse else [ids.shape[1] * vocab] * n_rows
    offset = 0
    for rows in _row_chunks(sizes, max_logits):
        k = keep[rows]
        n = int(k.sum())
        if n == 0:
            continue
        targets, where = targets_all[offset : offset + n], k.nonzero()[:, 0] + rows.start
        offset += n
        if sparse:
            logits = model(input_ids=ids[rows], attention_mask=mask[rows], logits_to_keep=k, **extra).logits
            if tuple(logits.shape[:-1]) != (n,):
                raise RuntimeError(
                    f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for a boolean "
                    f"logits_to_keep mask of {n} positions; expected ({n}, vocab)"
                )
        else:
            logits = model(input_ids=ids[rows], attention_mask=mask[rows], **extra).logits[k]
        nll += _scatter_nll(logits, targets, where, n_rows)
    return nll, counts.cpu()


def examples_nll(
    model: nn.Module,
    tokenizer: Any,
    examples: Iterable[Example],
    *,
    batch_size: int = 16,
    max_source_len: int = 512,
    max_target_len: int = 128,
    lm_separator: str = "\n",
    max_logits: int = DEFAULT_MAX_LOGITS,
) -> list[tuple[float, int]]:
    """(summed target NLL, target tokens) per example, in order; the mean token NLL of a set is
    ``sum(nll) / sum(tokens)`` (:data:`nvib.workflow.metrics.NLL`). Decoder-only targets follow the prompt
    ``source + lm_separator`` and end with EOS (see :func:`nvib.workflow.data.batches`)."""
    kind: BatchKind = "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "lm"
    out: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    try:
        for batch in batches(
            examples, tokenizer, batch_size, max_source_len, max_target_len, kind, lm_separator=lm_separator
        ):
            with torch.inference_mode():
                nll, counts = target_nll(model, batch, max_logits=max_logits)
            out += [(float(v), int(c)) for v, c in zip(nll.tolist(), counts.tolist(), strict=True)]
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------
# the dev objective


def _key(config: NVConfig) -> tuple[tuple[str, float], ...]:
    """Cache key: the full NVConfig, so a partial knob dict and its defaults share outputs."""
    return tuple(sorted(config.to_dict().items()))


class DevObjective:
    """The knob-search objective: ``objective(knobs, n)`` -> :class:`TrialResult` on the first n dev examples.

    Outputs are cached per (knobs, example index), so a trial's growing slices only run the new examples.
    Lower-is-better metrics (``nll``, ``perplexity``) are negated: the search always maximises. Likelihood
    metrics run forward passes only. Generation metrics also record the outputs' diversity and, when
    ``min_diversity`` is set, reject knobs whose outputs are less diverse (distinct predictions or distinct-2)
    than ``min_diversity`` × the equivalence model's on the same n examples (computed once, cached). The knobs
    replace those of ``config`` (its other fields, e.g. ``stdev_unit``, hold for every trial); with ``apply``, the
    knobs are handed to it instead (a baseline's scalar, :mod:`nvib.workflow.baselines`; ``{}`` = the model as is).
    """

    def __init__(
        self,
        evaluator: OutputSource,
        examples: Sequence[Example],
        metric_name: str = "nll",
        on_call: Callable[[dict[str, float], int], None] | None = None,
        *,
        min_diversity: float | None = 0.5,
        config: NVConfig = NVConfig(),  # noqa: B008 (frozen)
        apply: Callable[[Mapping[str, float]], None] | None = None,
    ):
        if metric_name not in evaluator.metrics:
            raise ValueError(
                f"metric {metric_name!r} is not computed for task {evaluator.task!r}; "
                f"choose one of {', '.join(evaluator.metrics)}"
            )
        if min_diversity is not None and not 0 < min_diversity <= 1:
            raise ValueError(f"min_diversity must be in (0, 1] or None, got {min_diversity}")
        self.evaluator, self.examples, self.metric_name = evaluator, list(examples), metric_name
        self.likelihood = metric_name in LIKELIHOOD_METRICS
        self.min_diversity = None if self.likelihood else min_diversity
        self.sign = -1.0 if metric_name in LOWER_IS_BETTER else 1.0
        self.cache: dict[tuple[tuple[str, float], ...], dict[int, Output]] = {}
        self.on_call, self.config, self.apply = on_call, config, apply
        self.n_generated = 0  # examples run through the model, over all calls
        self.clamp_said = False  # the stdev_tau clamp warning is said once per objective (one search)

    def outputs(self, knobs: Mapping[str, float], n: int) -> tuple[list[Output], int]:
        """Outputs on the first n dev examples at ``knobs`` (cached) and the tokens generated to make them."""
        if not 1 <= n <= len(self.examples):
            raise ValueError(f"slice of {n} examples asked, but the dev set has {len(self.examples)}")
        if self.apply is None:
            config = self.config.replace(**{k: float(v) for k, v in knobs.items()})
            key = _key(config)
        else:
            key = tuple(sorted((k, float(v)) for k, v in knobs.items()))
        done = self.cache.setdefault(key, {})
        missing = [i for i in range(n) if i not in done]
        new_tokens = 0
        if missing:
            if self.apply is None:
                self.configure(config)
            else:
                self.apply(knobs)
            outputs = self.evaluator.outputs(
                [self.examples[i] for i in missing],
                f"dev [{n}]",
                generate=not self.likelihood,
                score=self.likelihood,
            )
            done.update(zip(missing, outputs, strict=True))
            new_tokens = sum(o.n_tokens for o in outputs)
            self.n_generated += len(missing)
        return [done[i] for i in range(n)], new_tokens

    def configure(self, config: NVConfig) -> None:
        """Set the trial's knobs. The search chose them, so a finite alpha_tau's visible prior is no news, and a
        clamped stdev_tau (above some mixture's largest spread, docs/method.md §12) is said for the first trial only:
        later trials that reach the clamp compute the clamped point, as designed, and a warning per trial is noise."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            configure(self.evaluator.model, config)
        for w in caught:
            if issubclass(w.category, VisiblePriorWarning) or (
                issubclass(w.category, StdevClampWarning) and self.clamp_said
            ):
                continue
            message = w.message
            if issubclass(w.category, StdevClampWarning):
                self.clamp_said = True
                message = f"{message} (said once per search; later trials are clamped alike)"
            warnings.warn_explicit(message, w.category, w.filename, w.lineno)

    def reference_diversity(self, n: int) -> Diversity:
        """Diversity of the equivalence model's (= the unconverted model's) outputs on the first n examples."""
        outputs, _ = self.outputs({}, n)
        return diversity([o.prediction or "" for o in outputs])

    def __call__(self, knobs: dict[str, float], n: int) -> TrialResult:
        if self.on_call is not None:
            self.on_call(knobs, n)
        outputs, new_tokens = self.outputs(knobs, n)
        refs = [ex.target for ex in self.examples[:n]]
        value = get_metric(self.metric_name)(self.evaluator.metric_inputs(outputs, self.metric_name), refs)
        if self.likelihood:  # nothing generated: no token count to record
            return TrialResult(self.sign * value)
        div = diversity([o.prediction or "" for o in outputs])
        reject = None
        if self.min_diversity is not None:
            reject = div.below(self.reference_diversity(n), self.min_diversity)
        return TrialResult(self.sign * value, new_tokens, {"diversity": div.as_dict()}, reject)
