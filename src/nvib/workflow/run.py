"""The run: a config file -> prior -> knob search -> evaluation -> report, in one run directory.

A run directory holds ``config.json`` (the config it was started with), ``prior.safetensors``,
``study.db`` (the Optuna study), ``nv_config.json`` (the tuned knobs), ``predictions/``,
``scores.json``, ``report.md``, ``report.html`` and ``plots/``. Re-running reuses finished stages:
a complete prior is loaded, the study resumes where it stopped, evaluation and report are redone.
The config schema is :mod:`nvib.workflow.settings`; model loading is :mod:`nvib.workflow.models`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from nvib.core import files
from nvib.core.architectures import find_sites
from nvib.core.config import NVConfig
from nvib.core.convert import configure, convert, is_converted, nv_layers, unload
from nvib.core.prior import EmpiricalPrior
from nvib.workflow.baselines import AttentionTemperature, Baseline, WiseFT, summary, tune
from nvib.workflow.data import Example, batches, fingerprint, load_dataset_examples, load_examples
from nvib.workflow.evaluate import (
    LOWER_IS_BETTER,
    VARIANTS,
    DevObjective,
    Evaluation,
    Evaluator,
    evaluate_variants,
    new_progress,
)
from nvib.workflow.formatting import difference_parts, interval_decimals, metric_decimals, metric_label
from nvib.workflow.identity import check_identity, check_prior_weights, file_fingerprint, prior_digest
from nvib.workflow.limits import Lengths, fit_lengths
from nvib.workflow.metrics import LIKELIHOOD_METRICS
from nvib.workflow.models import batch_kind, load_model, model_location
from nvib.workflow.prompting import FewShotPrompt, SharedPrefix, check_sharing, draw_demonstrations, prompt_prior
from nvib.workflow.report import ReportPaths, write_report
from nvib.workflow.search import best_knobs, knob_names, load_study, run_search, sampler_seed
from nvib.workflow.settings import PRIOR_ONLY_ALPHA_TAUS, STDEV_RANGES, DatasetSection, RunConfig, SearchSpace

__all__ = [
    "Run",
    "check_start_points",
    "describe_data",
    "estimate_prior",
    "fit_config",
    "parse_shard",
    "prior_stats",
    "save_prior",
]

PRIOR_FILE, STUDY_FILE, KNOBS_FILE, CONFIG_FILE, IDENTITY_FILE, BASELINES_FILE, PROMPT_CHECK_FILE = (
    "prior.safetensors",
    "study.db",
    "nv_config.json",
    "config.json",
    "run.json",
    "baselines.json",
    "prompt_check.json",
)
#: The NV setting at which the few-shot prompt's sharing check runs (beside the stock model): a real prior weight
#: and noise, so the check covers the NV paths, not only the identity.
CHECK_KNOBS = {"alpha_tau": 0.0, "stdev_tau": 0.1}
CHECK_EXAMPLES = 3


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


def describe_data(
    path: Path | str,
    columns: tuple[str | None, str | None],
    max_lens: tuple[int, int],
    limit: int | None,
    batch_size: int,
) -> str:
    """What a prior's ``data`` metadata says, so a run can tell whether its prior matches its config."""
    parts = [
        str(path.resolve()) if isinstance(path, Path) else path,
        f"columns={columns[0] or 'auto'}/{columns[1] or 'auto'}",
        f"max_len={max_lens[0]}/{max_lens[1]}",
        f"batch_size={batch_size}",
    ]
    if limit is not None:
        parts.append(f"limit={limit}")
    return " ".join(parts)


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


def search_plan(cfg: RunConfig, model: nn.Module, n_trials: int) -> tuple[SearchSpace, list[dict[str, float]]]:
    """The knob ranges and start points of a run's search: stdev_tau's default range in the unit the model's sites
    use (spec §12), and the prior-only points (stdev_tau = 0, alpha_tau in `PRIOR_ONLY_ALPHA_TAUS`) after the
    config's start points, as many as the budget holds beside the equivalence point."""
    space = cfg.search.space()
    unit = cfg.search.stdev_unit or next(iter(nv_layers(model).values())).STDEV_UNIT
    if "stdev_tau" not in cfg.search.ranges:
        space = dataclasses.replace(space, stdev_tau=STDEV_RANGES[unit])
    names = knob_names({layer.kind for layer in nv_layers(model).values()})
    prior_only = [{k: (a if k.startswith("alpha") else 0.0) for k in names} for a in PRIOR_ONLY_ALPHA_TAUS]
    room = max(n_trials - 1 - len(cfg.search.start_points), 0)
    return space, [*cfg.search.start_points, *prior_only[:room]]


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


def fit_config(config: RunConfig, model: nn.Module, prefix: int = 0) -> tuple[RunConfig, list[str]]:
    """``config`` with data.max_source_len / max_target_len and generation.max_new_tokens made to fit the model's
    positions (`nvib.workflow.limits.fit_lengths`: lengths the config sets are refused if too long, defaults
    lowered), and the notes of what was lowered. ``prefix``: a few-shot prompt's tokens before each source."""
    d, g = config.data, config.generation
    given = {k for k in ("max_source_len", "max_target_len") if k in (config.raw.get("data") or {})}
    fitted, notes = fit_lengths(
        model,
        Lengths(d.max_source_len, d.max_target_len, g.max_new_tokens),
        names={"source": "data.max_source_len", "target": "data.max_target_len",
               "new_tokens": "generation.max_new_tokens"},
        explicit={{"max_source_len": "source", "max_target_len": "target"}[k] for k in given},
        prefix=prefix,
    )  # fmt: skip
    data = dataclasses.replace(d, max_source_len=fitted.source, max_target_len=fitted.target)
    generation = dataclasses.replace(g, max_new_tokens=fitted.new_tokens)
    return dataclasses.replace(config, data=data, generation=generation), notes


def check_start_points(config: RunConfig, model: nn.Module) -> None:
    """Refuse (one line) a search start point that sets a knob of an attention kind the model lacks."""
    kinds = {site.kind for site in find_sites(model)}
    names = knob_names(kinds)
    for i, point in enumerate(config.search.start_points):
        extra = sorted(set(point) - set(names))
        if extra:
            raise ValueError(
                f"search.start_points[{i}] sets {', '.join(extra)}, but {type(model).__name__} has only "
                f"{', '.join(sorted(kinds))} attention (knobs: {', '.join(names)}). Fix: drop those knobs"
            )


class Run:
    """The stages of a run over one model object (loaded once, on first use)."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path | None = None,
        *,
        console: Console | None = None,
        progress: bool = True,
        n_trials: int | None = None,
    ):
        self.config = config
        self.dir = Path(run_dir) if run_dir is not None else config.default_run_dir()
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.progress = progress
        self.n_trials = config.search.n_trials if n_trials is None else n_trials
        if self.n_trials < 0:
            raise ValueError(f"n_trials must be >= 0, got {self.n_trials}")
        self.prior_path = self.dir / PRIOR_FILE
        self.given_prior: Path | None = None  # a prior file the user passed (`--prior`): read only, never written
        self._prior: EmpiricalPrior | None = None
        self._prompt_check: dict[str, Any] | None = None
        self.allow_foreign_prior = config.prior.allow_foreign  # `--foreign-prior`: use a prior of other weights
        self._validated = False
        self._examples: dict[tuple[str, str | None], list[Example]] = {}

    # -- shared pieces

    @cached_property
    def loaded(self) -> tuple[nn.Module, Any]:
        cfg = self.config
        self.console.print(f"loading model [bold]{model_location(cfg.model.path, cfg.base_dir)}[/bold]")
        model, tokenizer = load_model(cfg.model, cfg.task, cfg.base_dir)
        if cfg.model.kind == "bert2bert":
            self.console.print(
                f"[yellow]note:[/yellow] bert2bert warm start: the decoder's cross-attention is untrained "
                f"(initialised with seed {cfg.model.seed}); expect poor outputs"
            )
        return model, tokenizer

    def examples(self, split: str, name: str | None = None) -> list[Example]:
        """The examples of ``split`` (train, dev, or the test set ``name``), read once."""
        if (split, name) not in self._examples:
            d = self.config.data
            data = {"train": d.train, "dev": d.dev}.get(split) or d.test[name]
            limit = {"train": d.train_limit, "dev": d.dev_limit}.get(split, d.test_limit)
            self._examples[split, name] = self._read(data, limit)
        return self._examples[split, name]

    def validate(self) -> None:
        """What can be checked before the first forward pass, once: the lengths against the model's positions
        (`fit_config`; the config is replaced by the lengths used), the start points' knobs against its attention
        kinds, that the dev and test data load, and that a few-shot prompt fits a sliding window."""
        if self._validated:
            return
        model, _ = self.loaded
        self.config, notes = fit_config(self.config, model, self._prompt_overhead())
        self.__dict__.pop("prompt", None)  # built again with the lengths used
        for note in notes:
            self.console.print(f"[yellow]warning:[/yellow] {note}")
        check_start_points(self.config, model)
        sets = [self.examples("dev"), *(self.examples("test", name) for name in self.config.data.test)]
        if self.prompt is not None:
            items = [self.prompt.encode(e) for examples in sets for e in examples]
            SharedPrefix(model, self.prompt).check_window(items, self.config.generation.max_new_tokens)
        self._validated = True

    def _prompt_overhead(self) -> int:
        """Tokens of a few-shot prompt before and around each source: its prefix and template pieces (0 without)."""
        if self.prompt is None:
            return 0
        return len(self.prompt.prefix) + len(self.prompt.encode(Example("")).suffix)

    def _read(self, data: str | DatasetSection, limit: int | None) -> list[Example]:
        if isinstance(data, DatasetSection):
            return load_dataset_examples(data.spec(self.config.base_dir), limit=limit)
        d = self.config.data
        return load_examples(self.config.path(data), d.source_column, d.target_column, limit=limit)

    @cached_property
    def prompt(self) -> FewShotPrompt | None:
        """The config's few-shot prompt for this run's tokenizer (demonstrations drawn), or None."""
        section = self.config.prompt
        if section is None:
            return None
        _, tokenizer = self.loaded
        demos: list[Example] = []
        if (given := section.demonstrations) is not None:
            demos = draw_demonstrations(self._read(given.data, given.pool), given.k, given.seed, given.source_words)
        d = self.config.data
        return FewShotPrompt(
            tokenizer, section.template, prefix=section.prefix, demonstrations=demos, separator=section.separator,
            stop=section.stop, bos=section.bos, max_source_tokens=d.max_source_len, max_target_tokens=d.max_target_len,
        )  # fmt: skip

    def check_prompt(self) -> dict[str, Any] | None:
        """The few-shot prompt's start-up check, once per run: on the first dev examples, the shared prefix gives
        the unshared NLL (1e-4 nats/token) and the same greedy outputs, for the stock model and for NV at
        `CHECK_KNOBS`. Leaves the model converted at the identity knobs; writes prompt_check.json."""
        cfg = self.config
        if self.prompt is None or not cfg.prompt.check or self._prompt_check is not None:
            return self._prompt_check
        model, _ = self.loaded
        items = [self.prompt.encode(e) for e in self.examples("dev")[:CHECK_EXAMPLES]]
        engine, new = SharedPrefix(model, self.prompt), cfg.generation.max_new_tokens
        if is_converted(model):
            unload(model)
        result = {"prefix_tokens": len(self.prompt.prefix), "stock": check_sharing(engine, items, new)}
        model = self._nv_model(self.prior(required=True))
        kinds = {layer.kind for layer in nv_layers(model).values()}
        knobs = {k: CHECK_KNOBS["alpha_tau" if k.startswith("alpha") else "stdev_tau"] for k in knob_names(kinds)}
        with warnings.catch_warnings():  # a clamped stdev_tau (spec §12) is no news: the user did not choose it
            warnings.simplefilter("ignore", UserWarning)
            configure(model, self.base_knobs.replace(**knobs))
        try:
            result["nv"] = {"knobs": knobs, **check_sharing(engine, items, new)}
        finally:
            configure(model, self.base_knobs)
        self._start()
        files.write_json(self.dir / PROMPT_CHECK_FILE, result)
        gaps = max(result[s][g] for s in ("stock", "nv") for g in ("nll_gap", "evaluate_nll_gap"))
        self.console.print(
            f"prompt: {len(self.prompt.demonstrations)} demonstrations, prefix of {len(self.prompt.prefix)} tokens "
            f"shared; check on {len(items)} dev examples, stock and NV: NLL gap {gaps:.1e} nats/token, greedy "
            "outputs identical"
        )
        self._prompt_check = result
        return result

    def data_name(self, data: str | DatasetSection) -> str:
        """A data entry as the run's records name it: the resolved file path, or the dataset's name, config, split."""
        if isinstance(data, DatasetSection):
            return str(data.spec(self.config.base_dir))
        return str(self.config.path(data).resolve())

    def evaluator(self, progress) -> Evaluator:
        model, tokenizer = self.loaded
        d = self.config.data
        return Evaluator(
            model,
            tokenizer,
            self.config.task,
            self.config.generation,
            max_source_len=d.max_source_len,
            max_target_len=d.max_target_len,
            lm_separator=d.lm_separator,
            progress=progress,
            prompt=self.prompt,
        )

    @property
    def storage(self) -> str:
        return self.config.search.storage or f"sqlite:///{(self.dir / STUDY_FILE).resolve()}"

    def _prior_description(self) -> str:
        d = self.config.data
        text = describe_data(
            self.data_name(d.train),
            (d.source_column, d.target_column),
            (d.max_source_len, d.max_target_len),
            d.train_limit,
            self.config.prior.batch_size,
        )
        return text if self.config.prompt is None else f"{text} prompt={self._prompt_digest()}"

    def _prompt_digest(self) -> str:
        """A short hash of the prompt section, its demonstrations' data by contents (a file's fingerprint, however
        the config names it): a prior or a run made with another prompt is told apart."""
        section = dataclasses.asdict(self.config.prompt)  # type: ignore[arg-type]
        given = self.config.prompt.demonstrations  # type: ignore[union-attr]
        if given is not None:
            data = given.data
            section["demonstrations"]["data"] = (
                self.data_name(data) if isinstance(data, DatasetSection) else file_fingerprint(self.config.path(data))
            )
        return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def study_identity(self, prior: EmpiricalPrior | None, model: nn.Module) -> dict[str, Any]:
        """What changes a trial's value beside the metric, the dev data, the knob ranges and the slices (which
        `run_search` records itself): the prior, the stdev unit, the lengths, the prompt and, for a generation
        metric, the generation settings and the diversity guard. A resumed study refuses any other."""
        cfg = self.config
        generating = cfg.metric not in LIKELIHOOD_METRICS
        g = cfg.generation
        return {
            "prior": prior_digest(prior) if prior is not None else None,
            "stdev_unit": (cfg.search.stdev_unit or next(iter(nv_layers(model).values())).STDEV_UNIT)
            if is_converted(model)
            else None,
            "lengths": [cfg.data.max_source_len, cfg.data.max_target_len],
            "prompt": self._prompt_digest() if cfg.prompt is not None else None,
            "max_new_tokens": g.max_new_tokens if generating else None,
            "num_beams": g.num_beams if generating else None,
            "generation_kwargs": dict(g.kwargs) if generating else None,
            "min_diversity": cfg.search.min_diversity if generating else None,
        }

    def identity(self) -> dict[str, Any]:
        """What this run's results depend on (`nvib.workflow.identity`): a rerun resumes only the same."""
        cfg, d = self.config, self.config.data
        model = model_location(cfg.model.path, cfg.base_dir)
        tokenizer = model_location(cfg.model.tokenizer, cfg.base_dir) if cfg.model.tokenizer else model
        files = {k: v for k, v in (("model", model), ("tokenizer", tokenizer)) if isinstance(v, Path)}
        hub = {f"{k} hub id": v for k, v in (("model", model), ("tokenizer", tokenizer)) if isinstance(v, str)}
        datasets = {k: v for k, v in (("train", d.train), ("dev", d.dev)) if isinstance(v, DatasetSection)}
        files.update({k: cfg.path(v) for k, v in (("train", d.train), ("dev", d.dev)) if k not in datasets})
        return {
            **{f"{k} files": f"{Path(p).name} {file_fingerprint(Path(p))}" for k, p in files.items()}, **hub,
            **{f"{k} dataset": self.data_name(v) for k, v in datasets.items()},
            "model kind": cfg.model.kind, "gguf_file": cfg.model.gguf_file, "seed": cfg.model.seed,
            "task": cfg.task, "columns": [d.source_column, d.target_column], "limits": [d.train_limit, d.dev_limit],
            "lengths": [d.max_source_len, d.max_target_len], "lm_separator": d.lm_separator,
            **({"prompt": self._prompt_digest()} if cfg.prompt is not None else {}),
        }  # fmt: skip

    def _start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        check_identity(
            self.dir / IDENTITY_FILE, self.identity(),
            "use a new run directory (-o/--run-dir), or delete this one to start over",
        )  # fmt: skip
        record = {
            "source": self.config.source,
            "base_dir": str(self.config.base_dir),
            "config": self.config.raw,
        }
        files.write_json(self.dir / CONFIG_FILE, record, default=str)

    # -- stages

    def prior(self, *, required: bool = False) -> EmpiricalPrior:
        """The run's prior: loaded if ``prior.safetensors`` is there and complete, else estimated, saved."""
        if self._prior is not None:
            return self._prior
        self.validate()
        if self.given_prior is not None:
            prior = EmpiricalPrior.load(self.given_prior)
            if not prior.metadata.get("complete", True):
                raise ValueError(
                    f"the prior {self.given_prior} is incomplete (its estimate was interrupted) and nvib does not "
                    "write to a file you pass. Fix: estimate it again with `nvib prior ... -o FILE`, or drop --prior "
                    "to estimate one in the run directory"
                )
            self._check_weights(prior, self.given_prior)
            self._prior = prior
            return prior
        expected = self._prior_description()
        prior = self._stored_prior()
        if prior is not None:
            if prior.metadata.get("complete", True):
                if prior.metadata.get("data") != expected:
                    self.console.print(
                        f"[yellow]warning:[/yellow] {self.prior_path} was estimated on "
                        f"{prior.metadata.get('data')!r}, the config now gives {expected!r}; using it anyway "
                        "(delete it to re-estimate)"
                    )
                self._start()  # a run directory of another model says so first
                self._check_weights(prior, self.prior_path)
                self.console.print(f"prior: reusing {self.prior_path} ({_tokens(prior)} tokens)")
                self._prior = prior
                return prior
            self.console.print(f"prior: {self.prior_path} is incomplete (interrupted); estimating again")
        elif required and not self.prior_path.is_file():
            raise FileNotFoundError(
                f"no prior at {self.prior_path}. "
                f"Fix: run `nvib run` first, or `nvib prior MODEL DATA -o {self.prior_path}`"
            )
        self._start()
        model, tokenizer = self.loaded
        if is_converted(model):
            unload(model)
        d = self.config.data
        start = time.perf_counter()
        train = self.examples("train")
        if self.prompt is not None:  # the demonstrations are in every prompt already
            demonstrations = set(self.prompt.demonstrations)
            train = [e for e in train if e not in demonstrations]
        prior = estimate_prior(
            model,
            tokenizer,
            train,
            batch_size=self.config.prior.batch_size,
            max_source_len=d.max_source_len,
            max_target_len=d.max_target_len,
            description=expected,
            lm_separator=d.lm_separator,
            progress=self.progress,
            prompt=self.prompt,
        )
        prior.save(self.prior_path)
        if not prior.metadata.get("complete", True):
            raise KeyboardInterrupt(
                f"prior interrupted after {_tokens(prior)} tokens; the partial prior is kept in {self.prior_path}, "
                "and rerunning the same command estimates the prior again from the start"
            )
        seconds = time.perf_counter() - start
        self.console.print(f"prior: {_tokens(prior)} tokens in {seconds:.0f} s -> {self.prior_path}")
        self._prior = prior
        return prior

    def _check_weights(self, prior: EmpiricalPrior, path: Path) -> None:
        model, _ = self.loaded
        if is_converted(model):
            unload(model)
        warning = check_prior_weights(prior, model, str(path), self.allow_foreign_prior)
        if warning is not None:
            self.console.print(f"[yellow]warning:[/yellow] {warning}")

    def _stored_prior(self) -> EmpiricalPrior | None:
        """The run directory's prior file, or None where there is none or it cannot be read as a prior (a file
        torn by a kill during an older version's write, a damaged copy): that one is estimated again, with a note."""
        if not self.prior_path.is_file():
            return None
        try:
            return EmpiricalPrior.load(self.prior_path)
        except ValueError as err:
            reason = " ".join(str(err).split())
            self.console.print(f"[yellow]note:[/yellow] prior: {escape(reason)}; estimating it again")
            return None

    def _nv_model(self, prior: EmpiricalPrior) -> nn.Module:
        model, _ = self.loaded
        if is_converted(model) and model.__dict__.get("nv_prior") is not prior:
            unload(model)
        if not is_converted(model):
            convert(model, NVConfig(), prior=prior)
        return model

    def search(self) -> optuna.Study:
        """Tune the knobs on the dev set (resuming a stored study); writes nv_config.json."""
        self.validate()
        cfg, metric_name = self.config, self.config.metric
        prior = self.prior(required=True)
        self.check_prompt()
        model = self._nv_model(prior)
        self._start()
        dev = self.examples("dev")
        slices = self.dev_slices(dev)
        if slices[-1] < max(cfg.search.slices):
            self.console.print(f"search: the dev set has {len(dev)} examples; slices clipped to {slices}")
        previous = _load_study(self.storage, cfg.search.study_name)
        done = len(previous.get_trials(deepcopy=False, states=_FINISHED)) if previous is not None else 0
        remaining = max(self.n_trials - done, 0)
        if done:
            self.console.print(f"search: resuming study with {done} finished trials; {remaining} to run")
        kinds = {layer.kind for layer in nv_layers(model).values()}
        space, start_points = search_plan(cfg, model, self.n_trials)
        bar, start = new_progress(self.progress, self.console), time.perf_counter()
        with bar:
            trials = bar.add_task("search", total=remaining, info=metric_name)
            started = [0]

            def on_call(knobs: dict[str, float], n: int) -> None:
                if n == slices[0]:
                    bar.update(trials, completed=started[0], info=f"trial {started[0] + 1}/{remaining}")
                    started[0] += 1

            objective = DevObjective(
                self.evaluator(bar),
                dev,
                metric_name,
                on_call=on_call,
                min_diversity=cfg.search.min_diversity,
                config=self.base_knobs,
            )
            study = run_search(
                objective,
                kinds,
                n_trials=self.n_trials,
                storage=self.storage,
                study_name=cfg.search.study_name,
                slices=slices,
                start_points=start_points,
                space=space,
                seed=self.sampler_seed,
                timeout=cfg.search.timeout,
                progress=False,
                n_startup_trials=cfg.search.n_startup_trials,
                objective_info={
                    "metric": metric_name,
                    "dev": fingerprint(dev[: slices[-1]]),
                    **self.study_identity(prior, model),
                },  # fmt: skip
                heartbeat_interval=cfg.search.heartbeat_interval,
                grace_period=cfg.search.grace_period,
            )
            bar.update(trials, completed=remaining)
        study.set_user_attr("metric", metric_name)
        study.set_user_attr("sampler_seed", self.sampler_seed)
        tuned = self.base_knobs.replace(**best_knobs(study))
        tuned.save(self.dir / KNOBS_FILE)
        sign = -1 if metric_name in LOWER_IS_BETTER else 1
        seconds = time.perf_counter() - start
        per_trial = f" ({seconds / started[0]:.1f} s per trial)" if started[0] else ""
        rejected = sum("pruned_reason" in t.user_attrs for t in study.get_trials(deepcopy=False))
        self.console.print(
            f"search: {started[0]} trials in {seconds:.0f} s{per_trial} "
            f"({objective.n_generated} dev examples run); best {metric_name} {sign * study.best_value:.4f} "
            f"(trial #{study.best_trial.number}); knobs -> {self.dir / KNOBS_FILE}"
            + (f"; {rejected} trials pruned for low output diversity" if rejected else "")
        )
        return study

    @property
    def base_knobs(self) -> NVConfig:
        """What every trial shares: the identity knobs in the config's stdev unit."""
        return NVConfig(stdev_unit=self.config.search.stdev_unit)

    @property
    def sampler_seed(self) -> int:
        """The TPE seed: derived from the dev data's name (its file and folder) and shifted by search.seed."""
        dev = self.config.data.dev
        name = (
            self.data_name(dev) if isinstance(dev, DatasetSection) else "/".join(Path(self.data_name(dev)).parts[-2:])
        )
        return sampler_seed(name, self.config.search.seed)

    def dev_slices(self, dev: Sequence[Example]) -> list[int]:
        return sorted({min(s, len(dev)) for s in self.config.search.slices})

    def baselines(self) -> tuple[dict[str, tuple[Baseline, float]], str | None]:
        """Tune the configured baselines on the unconverted model (resuming their studies): name -> (baseline,
        tuned value), and the name of the one with the best dev objective. Writes baselines.json."""
        cfg = self.config
        made: dict[str, Baseline] = {}
        if cfg.baselines.temperature or cfg.baselines.wise_ft:
            model, _ = self.loaded
            if is_converted(model):
                unload(model)
            if cfg.baselines.temperature:
                made["temperature"] = AttentionTemperature(model, *cfg.baselines.temperature_range)
            if cfg.baselines.wise_ft:
                section = dataclasses.replace(cfg.model, path=cfg.baselines.wise_ft, gguf_file=None)
                where = model_location(section.path, cfg.base_dir)
                self.console.print(f"WiSE-FT: loading the pre-fine-tuning model {where}")
                pretrained, _ = load_model(section, cfg.task, cfg.base_dir)
                made["wise_ft"] = WiseFT(model, pretrained, *cfg.baselines.wise_ft_range)
                del pretrained
        if not made:
            return {}, None
        self._start()
        dev = self.examples("dev")
        tuned, summaries = {}, {}
        bar = new_progress(self.progress, self.console)
        with bar:
            for name, baseline in made.items():
                task = bar.add_task(f"baseline {baseline.label}", total=self.n_trials, info=self.config.metric)
                objective = DevObjective(
                    self.evaluator(bar), dev, self.config.metric, min_diversity=cfg.search.min_diversity,
                    apply=baseline.apply,
                )  # fmt: skip
                slices = self.dev_slices(dev)
                identity = self.study_identity(None, model)
                del identity["prior"], identity["stdev_unit"]  # the baselines run the unconverted model
                if name == "wise_ft":
                    identity["pretrained"] = str(model_location(cfg.baselines.wise_ft, cfg.base_dir))
                value, study = tune(
                    baseline, objective, n_trials=self.n_trials, slices=slices, storage=self.storage,
                    study_name=f"{cfg.search.study_name}-{name}", seed=self.sampler_seed,
                    n_startup_trials=cfg.search.n_startup_trials,
                    on_trial=lambda n, task=task: bar.update(task, completed=n, info=f"trial {n + 1}"),
                    objective_info={"metric": cfg.metric, "dev": fingerprint(dev[: slices[-1]]), **identity},
                    heartbeat_interval=cfg.search.heartbeat_interval, grace_period=cfg.search.grace_period,
                )  # fmt: skip
                bar.update(task, completed=self.n_trials)
                tuned[name], summaries[name] = (baseline, value), summary(study)
        scored = {n: s["dev_objective"] for n, s in summaries.items() if s["dev_objective"] is not None}
        best = max(scored, key=scored.get) if scored else None
        record = {"metric": self.config.metric, "best": best, "baselines": summaries}
        files.write_json(self.dir / BASELINES_FILE, record)
        sign = -1 if self.config.metric in LOWER_IS_BETTER else 1  # the studies maximise
        for name, s in summaries.items():
            found = "no complete trial" if s["value"] is None else f"{s['value']:.4g}"
            dev = "" if s["value"] is None else f" (dev {self.config.metric} {sign * s['dev_objective']:.4f})"
            self.console.print(f"baseline {VARIANTS[name]}: {found} after {s['trials']} trials{dev}")
        return tuned, best

    def tuned_knobs(self) -> NVConfig:
        path = self.dir / KNOBS_FILE
        if path.is_file():
            return NVConfig.load(path)
        study = _load_study(self.storage, self.config.search.study_name)
        if study is None:
            raise FileNotFoundError(f"no tuned knobs at {path} and no study. Fix: run `nvib search` first")
        return self.base_knobs.replace(**best_knobs(study))

    def evaluate(self, knobs: NVConfig | None = None) -> Evaluation:
        """Evaluate unconverted / equivalence / tuned on every test set; write predictions, scores.json."""
        self.validate()
        cfg = self.config
        prior = self.prior(required=True)
        tuned = knobs or self.tuned_knobs()
        self.check_prompt()
        baselines, best = self.baselines()
        self._start()
        tests = {name: self.examples("test", name) for name in cfg.data.test}
        bar, start = new_progress(self.progress, self.console), time.perf_counter()
        with bar:
            evaluation = evaluate_variants(
                self.evaluator(bar),
                tests,
                prior,
                tuned,
                self.dir,
                bootstrap=cfg.evaluation.bootstrap,
                seed=cfg.evaluation.seed,
                log=bar.console.print,
                baselines=baselines,
                best_baseline=best,
                metric_name=cfg.metric,
            )
        self.console.print(_results_table(evaluation))
        self.console.print(f"evaluation: {time.perf_counter() - start:.0f} s -> {self.dir / 'scores.json'}")
        return evaluation

    def report(self, evaluation: Evaluation | None = None) -> ReportPaths:
        cfg = self.config
        study = _load_study(self.storage, cfg.search.study_name)
        path = self.given_prior or self.prior_path
        prior = self._prior or (EmpiricalPrior.load(path) if path.is_file() else None)
        notes = {
            "model": f"{model_location(cfg.model.path, cfg.base_dir)} ({cfg.model.kind})",
            "task": cfg.task,
            "train (prior)": self.data_name(cfg.data.train),
            "dev (search)": self.data_name(cfg.data.dev),
            "search metric": cfg.metric
            + (" (the search maximises its negative)" if cfg.metric in LOWER_IS_BETTER else ""),
            "diversity guard": "not needed (likelihood objective)"
            if cfg.metric in LIKELIHOOD_METRICS
            else (
                f"trials whose dev outputs are less diverse (distinct predictions or distinct-2) than "
                f"{cfg.search.min_diversity:g} × the unconverted model's are pruned"
                if cfg.search.min_diversity is not None
                else "off (search.min_diversity: null)"
            ),
            "sampler seed": f"{self.sampler_seed} (from the dev data's name and search.seed={cfg.search.seed})",
            "generation": ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg.generation).items()),
        }
        results = differences = mass = diversity = verdicts = against = None
        if evaluation is not None:
            verdicts = list(evaluation.verdicts.values())
            if evaluation.best_baseline is not None:
                against = (VARIANTS[evaluation.best_baseline], evaluation.against_baseline)
            for name, value in evaluation.baselines.items():
                notes[f"baseline {VARIANTS[name]}"] = f"{value:.4g} (tuned like the knobs: same objective and dev data)"
            notes["equivalence"] = ", ".join(
                f"{name}: {'identical' if e['identical'] else 'NOT identical'}"
                for name, e in evaluation.equivalence.items()
            )
            for variant, sets in evaluation.tokens.items():
                what = "scored" if evaluation.task == "lm" else "generated"
                notes[f"{what} tokens, {VARIANTS[variant]}"] = ", ".join(f"{n}: {t}" for n, t in sets.items())
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
            self.dir,
            title=f"NVIB run: {_model_name(model_location(cfg.model.path, cfg.base_dir))} ({cfg.task})",
            study=study,
            results=results,
            differences=differences,
            baseline=VARIANTS["unconverted"],
            prior_stats=prior_stats(prior) if prior is not None else None,
            prior_mass=mass,
            notes=notes,
            diversity=diversity,
            verdicts=verdicts,
            against=against,
        )
        self.console.print(f"report: {paths.markdown} and {paths.html}")
        return paths

    def all(self) -> Evaluation:
        """validation -> prior -> search -> baselines and evaluation -> report."""
        self.validate()
        self._start()
        self.prior()
        self.search()
        evaluation = self.evaluate()
        self.report(evaluation)
        return evaluation


_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _load_study(storage: str, name: str) -> optuna.Study | None:
    """The stored study, or None; storage problems (missing driver, server down) are one-line errors."""
    return load_study(storage, name, heartbeat_interval=None, grace_period=None)


def _model_name(path: Path | str) -> str:
    if isinstance(path, str):  # a hub id
        return path
    return path.parent.name if path.name == "model" else path.name


def _tokens(prior: EmpiricalPrior) -> int:
    return max((s.count for s in prior.sites.values()), default=0)


def _results_table(evaluation: Evaluation) -> Table:
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
