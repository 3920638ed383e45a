"""The prior stage: a run's empirical prior from a file the user gave, the run directory's complete one, or
estimated on the train data and saved there; and the pieces (`estimate_prior`, `save_prior`) `nvib prior` uses."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from torch import nn

from nvib.core.prior import EmpiricalPrior
from nvib.workflow.data import Example, batches
from nvib.workflow.identity import check_prior_weights
from nvib.workflow.models import batch_kind
from nvib.workflow.prompting import FewShotPrompt, prompt_prior
from nvib.workflow.stages.inputs import RunInputs
from nvib.workflow.stages.records import PRIOR_FILE, start_run

__all__ = [
    "estimate_prior",
    "estimate_run_prior",
    "load_given_prior",
    "prior_stats",
    "prior_tokens",
    "reuse_prior",
    "save_prior",
    "stored_prior",
]


def estimate_prior(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_source_len: int,
    max_target_len: int,
    description: str,
    shard: tuple[int, int] | None = None,
    lm_separator: str = "\n",
    progress: bool = True,
    prompt: FewShotPrompt | None = None,
) -> EmpiricalPrior:
    """Estimate the empirical prior over ``examples``; with ``shard=(i, n)`` only over batches i, i+n, ...

    Shards of the same data and batch size merge (``EmpiricalPrior.merge``) into the full-data prior. With a
    few-shot ``prompt``, each example is seen as the prompt uses it (prefix, suffix and target), the prefix's
    cache shared (`prompt_prior`).
    """
    n_batches = math.ceil(len(examples) / batch_size)
    if shard is not None:
        i, n = shard
        chosen = range(i, n_batches, n)
        if not chosen:
            raise ValueError(
                f"shard {i}/{n} has no batches: the data makes only {n_batches} batches of {batch_size}. "
                "Fix: use fewer shards or a smaller batch size"
            )
        # only the last batch of all may be short, so re-batching the concatenation gives the same batches
        examples = [ex for j in chosen for ex in examples[j * batch_size : (j + 1) * batch_size]]
        description += f" shard={i}/{n}"
        n_batches = len(chosen)
    estimate = {"data": description, "total": n_batches, "progress": progress, "shard": shard}
    if prompt is not None:
        return prompt_prior(model, prompt, examples, batch_size, **estimate)
    kind = batch_kind(model)
    it = batches(examples, tokenizer, batch_size, max_source_len, max_target_len, kind, lm_separator=lm_separator)
    return EmpiricalPrior.estimate(model, it, **estimate)


def save_prior(prior: EmpiricalPrior, path: Path) -> Path:
    """Write ``prior`` to ``path`` (atomically) and return where it went: a partial prior (its estimate interrupted)
    never replaces a complete one, it goes beside it to ``<name>.partial<suffix>`` instead."""
    path = Path(path)
    if not prior.metadata.get("complete", True) and _complete_prior_at(path):
        path = path.with_name(f"{path.stem}.partial{path.suffix}")
    prior.save(path)
    return path


def _complete_prior_at(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return bool(EmpiricalPrior.load(path).metadata.get("complete", True))
    except ValueError:  # not a prior: nothing complete to keep
        return False


def prior_stats(prior: EmpiricalPrior) -> dict[str, dict[str, Any]]:
    """The per-site statistics in the form `nvib.workflow.report.write_report` takes."""
    return {
        name: {
            "mean": s.mean,
            "var": s.var,
            "log_alpha_mean": s.log_alpha_mean.mean(),  # key space: averaged over heads
            "log_alpha_std": s.log_alpha_std.mean(),
            "count": s.count,
        }
        for name, s in prior.sites.items()
    }


def prior_tokens(prior: EmpiricalPrior) -> int:
    """The tokens the prior was estimated on (its busiest site's count)."""
    return max((s.count for s in prior.sites.values()), default=0)


def _check_weights(inputs: RunInputs, prior: EmpiricalPrior, path: Path, allow_foreign: bool) -> None:
    warning = check_prior_weights(prior, inputs.unconverted_model(), str(path), allow_foreign)
    if warning is not None:
        inputs.console.print(f"[yellow]warning:[/yellow] {warning}")


def load_given_prior(inputs: RunInputs, path: Path, allow_foreign: bool) -> EmpiricalPrior:
    """The prior file the user passed (`--prior`: read, never written): refused if incomplete or, unless
    ``allow_foreign``, estimated on other weights."""
    prior = EmpiricalPrior.load(path)
    if not prior.metadata.get("complete", True):
        raise ValueError(
            f"the prior {path} is incomplete (its estimate was interrupted) and nvib does not "
            "write to a file you pass. Fix: estimate it again with `nvib prior ... -o FILE`, or drop --prior "
            "to estimate one in the run directory"
        )
    _check_weights(inputs, prior, path, allow_foreign)
    return prior


def stored_prior(run_dir: Path, console: Console) -> EmpiricalPrior | None:
    """The run directory's prior file, or None where there is none or it cannot be read as a prior (a file
    torn by a kill during an older version's write, a damaged copy): that one is estimated again, with a note."""
    path = run_dir / PRIOR_FILE
    if not path.is_file():
        return None
    try:
        return EmpiricalPrior.load(path)
    except ValueError as err:
        reason = " ".join(str(err).split())
        console.print(f"[yellow]note:[/yellow] prior: {escape(reason)}; estimating it again")
        return None


def reuse_prior(
    inputs: RunInputs, run_dir: Path, prior: EmpiricalPrior, description: str, allow_foreign: bool
) -> EmpiricalPrior:
    """The run directory's complete ``prior``, checked against the model's weights (a warning where it was
    estimated on other data than ``description`` says); starts the run directory."""
    path = run_dir / PRIOR_FILE
    if prior.metadata.get("data") != description:
        inputs.console.print(
            f"[yellow]warning:[/yellow] {path} was estimated on {prior.metadata.get('data')!r}, the config now "
            f"gives {description!r}; using it anyway (delete it to re-estimate)"
        )
    start_run(run_dir, inputs.config)  # a run directory of another model says so first
    _check_weights(inputs, prior, path, allow_foreign)
    inputs.console.print(f"prior: reusing {path} ({prior_tokens(prior)} tokens)")
    return prior


def estimate_run_prior(inputs: RunInputs, run_dir: Path, description: str) -> EmpiricalPrior:
    """Estimate the prior on the train data (less the prompt's demonstrations) with the unconverted model and save
    it in the run directory; an interrupted estimate is saved partial and raises KeyboardInterrupt."""
    start_run(run_dir, inputs.config)
    path = run_dir / PRIOR_FILE
    model = inputs.unconverted_model()
    _, tokenizer = inputs.loaded
    d = inputs.config.data
    start = time.perf_counter()
    train = inputs.examples("train")
    if inputs.prompt is not None:  # the demonstrations are in every prompt already
        demonstrations = set(inputs.prompt.demonstrations)
        train = [e for e in train if e not in demonstrations]
    prior = estimate_prior(
        model,
        tokenizer,
        train,
        batch_size=inputs.config.prior.batch_size,
        max_source_len=d.max_source_len,
        max_target_len=d.max_target_len,
        description=description,
        lm_separator=d.lm_separator,
        progress=inputs.progress,
        prompt=inputs.prompt,
    )
    prior.save(path)
    if not prior.metadata.get("complete", True):
        raise KeyboardInterrupt(
            f"prior interrupted after {prior_tokens(prior)} tokens; the partial prior is kept in {path}, "
            "and rerunning the same command estimates the prior again from the start"
        )
    seconds = time.perf_counter() - start
    inputs.console.print(f"prior: {prior_tokens(prior)} tokens in {seconds:.0f} s -> {path}")
    return prior
