"""The run: a config file -> prior -> knob search -> evaluation -> report, in one run directory.

A run directory holds ``config.json`` (the config it was started with), ``prior.safetensors``,
``study.db`` (the Optuna study), ``nv_config.json`` (the tuned knobs), ``predictions/``,
``scores.json``, ``report.md``, ``report.html`` and ``plots/``. Re-running reuses finished stages:
a complete prior is loaded, the study resumes where it stopped, evaluation and report are redone.

Config files are YAML or TOML (see :class:`RunConfig`); paths in them are relative to the config file,
and ``package:NAME/sub/path`` names a path inside an installed Python package.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import time
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from rich.console import Console
from rich.table import Table
from torch import nn

from nvib.config import NVConfig
from nvib.convert import convert, is_converted, nv_layers, unload
from nvib.data import Example, batches, load_examples
from nvib.evaluate import (
    DEFAULT_OBJECTIVE,
    LOWER_IS_BETTER,
    TASK_METRICS,
    TASKS,
    VARIANTS,
    DevObjective,
    Evaluation,
    Evaluator,
    GenerationArgs,
    evaluate_variants,
    new_progress,
)
from nvib.prior import EmpiricalPrior
from nvib.report import ReportPaths, write_report
from nvib.search import KNOBS, SearchSpace, best_knobs, run_search

__all__ = [
    "MODEL_KINDS",
    "ConfigError",
    "DataSection",
    "EvaluationSection",
    "ModelSection",
    "PriorSection",
    "Run",
    "RunConfig",
    "SearchSection",
    "describe_data",
    "describe_schema",
    "estimate_prior",
    "load_model",
    "parse_shard",
    "prior_stats",
    "resolve_path",
]

MODEL_KINDS = ("auto", "seq2seq", "causal_lm", "bert2bert")
PRIOR_FILE, STUDY_FILE, KNOBS_FILE, CONFIG_FILE = (
    "prior.safetensors",
    "study.db",
    "nv_config.json",
    "config.json",
)
DEMO_CONFIG = "demo.yaml"


class ConfigError(ValueError):
    """A problem with a run config; the message names the key and how to fix it."""


# ----------------------------------------------------------------------------------------------
# the config schema


@dataclass(frozen=True)
class ModelSection:
    """``path``: a local HF model directory (nothing is downloaded). ``kind``: ``seq2seq``,
    ``causal_lm``, ``bert2bert`` (warm-start an encoder-decoder from an encoder-only model, whose
    cross-attention is newly initialised with ``seed``) or ``auto`` (from the model's config)."""

    path: str
    kind: str = "auto"
    tokenizer: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class DataSection:
    """``train``: in-domain data the empirical prior is estimated on; ``dev``: what the knobs are tuned
    on; ``test``: name -> file of each test set. Files are JSONL/CSV/TSV or a ``save_to_disk`` directory."""

    train: str
    dev: str
    test: dict[str, str]
    source_column: str | None = None
    target_column: str | None = None
    max_source_len: int = 512
    max_target_len: int = 128
    lm_separator: str = "\n"
    train_limit: int | None = None
    dev_limit: int | None = None
    test_limit: int | None = None

    def __post_init__(self) -> None:
        if not self.test:
            raise ValueError("test must name at least one test set, e.g. test: {in_domain: test.jsonl}")
        for name in self.test:
            if not name or any(c in name for c in "/\\") or name.startswith("."):
                raise ValueError(f"test set name {name!r} must be a plain file-name-safe word")
        for name in ("max_source_len", "max_target_len", "train_limit", "dev_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class PriorSection:
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class SearchSection:
    """``slices``: growing dev prefixes each trial is scored on (clipped to the dev size); ``ranges``:
    ``alpha_tau`` / ``stdev_tau`` (every kind) or a single knob such as ``alpha_tau_c`` -> [low, high];
    ``start_points``: knob dicts tried first (after the equivalence point); ``storage``: an Optuna
    storage URL (default: ``sqlite:///RUN_DIR/study.db``); ``metric``: default per task."""

    n_trials: int = 30
    slices: tuple[int, ...] = (32, 128)
    metric: str | None = None
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    start_points: tuple[dict[str, float], ...] = ()
    storage: str | None = None
    study_name: str = "nvib"
    seed: int = 0
    timeout: float | None = None
    n_startup_trials: int = 5

    def __post_init__(self) -> None:
        if self.n_trials < 0:
            raise ValueError(f"n_trials must be >= 0, got {self.n_trials}")
        if not self.slices or any(s < 1 for s in self.slices) or sorted(set(self.slices)) != list(self.slices):
            raise ValueError(f"slices must be positive and strictly increasing, got {list(self.slices)}")
        for i, point in enumerate(self.start_points):
            unknown = sorted(set(point) - set(KNOBS))
            if unknown:
                raise ValueError(f"start_points[{i}] has unknown knobs {unknown}; knobs: {', '.join(KNOBS)}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        self.space().validate()

    def space(self) -> SearchSpace:
        ranges = dict(self.ranges)
        unknown = sorted(set(ranges) - {"alpha_tau", "stdev_tau", *KNOBS})
        if unknown:
            raise ValueError(
                f"ranges has unknown keys {unknown}; use alpha_tau, stdev_tau or a knob ({', '.join(KNOBS)})"
            )
        defaults = SearchSpace()
        return SearchSpace(
            alpha_tau=ranges.pop("alpha_tau", defaults.alpha_tau),
            stdev_tau=ranges.pop("stdev_tau", defaults.stdev_tau),
            overrides=ranges,
        )


@dataclass(frozen=True)
class EvaluationSection:
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bootstrap < 1:
            raise ValueError(f"bootstrap must be >= 1 resamples, got {self.bootstrap}")


@dataclass(frozen=True)
class RunConfig:
    """A run: ``model``, ``task`` (summarisation / translation / lm), ``data``, and optional ``prior``,
    ``generation``, ``search``, ``evaluation`` sections and ``run_dir`` (relative to the working
    directory; default ``runs/<config file name>``)."""

    model: ModelSection
    task: str
    data: DataSection
    prior: PriorSection = PriorSection()
    generation: GenerationArgs = GenerationArgs()
    search: SearchSection = SearchSection()
    evaluation: EvaluationSection = EvaluationSection()
    run_dir: str | None = None
    # not config keys: where relative paths start, and the file it came from
    base_dir: Path = field(default=Path("."), metadata={"internal": True})
    source: str = field(default="<config>", metadata={"internal": True})
    raw: Mapping[str, Any] = field(default_factory=dict, metadata={"internal": True}, compare=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.search.metric is not None and self.search.metric not in TASK_METRICS[self.task]:
            raise ValueError(
                f"search.metric {self.search.metric!r} is not computed for task {self.task!r}; "
                f"choose one of {', '.join(TASK_METRICS[self.task])}"
            )

    @property
    def metric(self) -> str:
        return self.search.metric or DEFAULT_OBJECTIVE[self.task]

    def path(self, value: str) -> Path:
        return resolve_path(value, self.base_dir)

    @classmethod
    def from_dict(cls, raw: Any, base_dir: str | Path = ".", source: str = "<config>") -> RunConfig:
        config = _build(cls, raw, "", source)
        return dataclasses.replace(config, base_dir=Path(base_dir), source=source, raw=dict(raw))

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}. Fix: check the path (a .yaml or .toml file)")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                raw = yaml.safe_load(text)
            elif path.suffix.lower() == ".toml":
                raw = tomllib.loads(text)
            else:
                raise ConfigError(f"{path}: unknown config format {path.suffix!r}. Fix: use a .yaml or .toml file")
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where} ({getattr(err, 'problem', err)})") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
        return cls.from_dict(raw, path.resolve().parent, str(path))

    @classmethod
    def demo(cls) -> RunConfig:
        """The embedded demo: the packaged MiniLM warm-started as BERT2BERT on a tiny docstring set."""
        demo_dir = Path(str(resources.files("nvib") / "demo_data"))
        return cls.load(demo_dir / DEMO_CONFIG)

    def default_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / Path(self.source).stem


def describe_schema() -> str:
    """The config keys with their defaults, one section a line (for ``--help``)."""

    def keys(cls: type) -> str:
        parts, types_ = [], typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal") or dataclasses.is_dataclass(types_[f.name]):
                continue
            if f.default is not dataclasses.MISSING:
                parts.append(f"{f.name}={f.default!r}")
            elif f.default_factory is not dataclasses.MISSING:
                parts.append(f"{f.name}={f.default_factory()!r}")
            else:
                parts.append(f"{f.name} (required)")
        return ", ".join(parts)

    hints = typing.get_type_hints(RunConfig)
    lines = [f"top level: {keys(RunConfig)} (task: {', '.join(TASKS)})"]
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{f.name}: {keys(hints[f.name])}")
    return "\n".join(lines)


def _build(cls: type, raw: Any, where: str, source: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and value types; errors name the key."""
    label = where or "the top level"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {label} must be a mapping of keys to values, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{source}: unknown key {_join(where, key)!r}{hint}. Fix: valid keys "
                f"{'in ' + where if where else 'at the top level'} are {', '.join(fields)}"
            )
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _value(hints[name], raw[name], _join(where, name), source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing key {_join(where, name)!r}. Fix: add it to the config")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{source}: {label}: {err}") from None


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _value(tp: Any, value: Any, where: str, source: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, value, where, source)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {where} must be {expected}, got {value!r}")

    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise bad("a mapping")
        return {str(k): _value(args[1], v, _join(where, k), source) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise bad("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_value(args[0], v, f"{where}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad(f"a list of {len(args)} values")
        return tuple(_value(a, v, f"{where}[{i}]", source) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    raise TypeError(f"config type {tp} is not supported")  # a schema bug, not a user error


def resolve_path(value: str | Path, base_dir: str | Path = ".") -> Path:
    """A path from a config: ``package:NAME/sub`` inside installed package NAME, else relative to base_dir."""
    text = str(value)
    if text.startswith("package:"):
        name, _, sub = text[len("package:") :].partition("/")
        try:
            spec = importlib.util.find_spec(name) if name else None
        except ImportError:  # a dotted name whose parent package is missing
            spec = None
        if spec is None or not (spec.submodule_search_locations or spec.origin):
            raise FileNotFoundError(
                f"{text}: Python package {name!r} is not installed. Fix: install it, or give a directory path"
            )
        root = Path(spec.submodule_search_locations[0]) if spec.submodule_search_locations else Path(spec.origin).parent
        return root / sub if sub else root
    path = Path(text).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


# ----------------------------------------------------------------------------------------------
# model, data, prior


def load_model(section: ModelSection, task: str | None = None, base_dir: str | Path = ".") -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) from local files only."""
    import transformers as tf

    path = resolve_path(section.path, base_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no model at {path} (expected a directory with config.json). "
            "Fix: set the model path to a local Hugging Face model directory; nothing is downloaded"
        )
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    kind = section.kind if section.kind != "auto" else _detect_kind(config, task, path)
    tok_path = resolve_path(section.tokenizer, base_dir) if section.tokenizer else path
    tokenizer = tf.AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models (GPT-2) ship without one
    if kind == "seq2seq":
        model = tf.AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True)
    elif kind == "causal_lm":
        model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(section.seed)
            model = tf.EncoderDecoderModel.from_encoder_decoder_pretrained(path, path, local_files_only=True)
        special = {
            "decoder_start_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if None in special.values():
            raise ValueError(
                f"{tok_path}: the tokenizer lacks [CLS]/[SEP]/[PAD] tokens needed for bert2bert. "
                "Fix: use a BERT-style model, or a seq2seq/causal_lm model kind"
            )
        for cfg in (model.config, model.generation_config):
            for key, token in special.items():
                setattr(cfg, key, token)
    model.config._name_or_path = str(path)
    return model.eval(), tokenizer


def _detect_kind(config: Any, task: str | None, path: Path) -> str:
    if getattr(config, "is_encoder_decoder", False) or config.model_type == "encoder-decoder":
        return "seq2seq"
    architectures = getattr(config, "architectures", None) or []
    if task == "lm" or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal_lm"
    raise ValueError(
        f"{path} is an encoder-only model ({config.model_type}) and cannot generate. "
        "Fix: set model kind to bert2bert to warm-start an encoder-decoder from it "
        "(its cross-attention is then untrained)"
    )


def batch_kind(model: nn.Module) -> str:
    return "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "lm"


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
    path: Path,
    columns: tuple[str | None, str | None],
    max_lens: tuple[int, int],
    limit: int | None,
    batch_size: int,
) -> str:
    """What a prior's ``data`` metadata says, so a run can tell whether its prior matches its config."""
    parts = [
        str(path.resolve()),
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
) -> EmpiricalPrior:
    """Estimate the empirical prior over ``examples``; with ``shard=(i, n)`` only over batches i, i+n, ...

    Shards of the same data and batch size merge (``EmpiricalPrior.merge``) into the full-data prior.
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
    kind = batch_kind(model)
    it = batches(examples, tokenizer, batch_size, max_source_len, max_target_len, kind, lm_separator=lm_separator)
    return EmpiricalPrior.estimate(model, it, data=description, total=n_batches, progress=progress)


def prior_stats(prior: EmpiricalPrior) -> dict[str, dict[str, Any]]:
    """The per-site statistics in the form `nvib.report.write_report` takes."""
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


# ----------------------------------------------------------------------------------------------
# the run


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
        self._prior: EmpiricalPrior | None = None

    # -- shared pieces

    @cached_property
    def loaded(self) -> tuple[nn.Module, Any]:
        cfg = self.config
        self.console.print(f"loading model [bold]{cfg.path(cfg.model.path)}[/bold]")
        model, tokenizer = load_model(cfg.model, cfg.task, cfg.base_dir)
        if cfg.model.kind == "bert2bert":
            self.console.print(
                f"[yellow]note:[/yellow] bert2bert warm start: the decoder's cross-attention is untrained "
                f"(initialised with seed {cfg.model.seed}); expect poor outputs"
            )
        return model, tokenizer

    def examples(self, split: str, name: str | None = None) -> list[Example]:
        d = self.config.data
        path = {"train": d.train, "dev": d.dev}.get(split) or d.test[name]
        limit = {"train": d.train_limit, "dev": d.dev_limit}.get(split, d.test_limit)
        return load_examples(self.config.path(path), d.source_column, d.target_column, limit=limit)

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
        )

    @property
    def storage(self) -> str:
        return self.config.search.storage or f"sqlite:///{(self.dir / STUDY_FILE).resolve()}"

    def _prior_description(self) -> str:
        d = self.config.data
        return describe_data(
            self.config.path(d.train),
            (d.source_column, d.target_column),
            (d.max_source_len, d.max_target_len),
            d.train_limit,
            self.config.prior.batch_size,
        )

    def _start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        record = {
            "source": self.config.source,
            "base_dir": str(self.config.base_dir),
            "config": self.config.raw,
        }
        (self.dir / CONFIG_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")

    # -- stages

    def prior(self, *, required: bool = False) -> EmpiricalPrior:
        """The run's prior: loaded if ``prior.safetensors`` is there and complete, else estimated, saved."""
        if self._prior is not None:
            return self._prior
        expected = self._prior_description()
        if self.prior_path.is_file():
            prior = EmpiricalPrior.load(self.prior_path)
            if prior.metadata.get("complete", True):
                if prior.metadata.get("data") != expected:
                    self.console.print(
                        f"[yellow]warning:[/yellow] {self.prior_path} was estimated on "
                        f"{prior.metadata.get('data')!r}, the config now gives {expected!r}; using it anyway "
                        "(delete it to re-estimate)"
                    )
                self.console.print(f"prior: reusing {self.prior_path} ({_tokens(prior)} tokens)")
                self._prior = prior
                return prior
            self.console.print(f"prior: {self.prior_path} is incomplete (interrupted); estimating again")
        elif required:
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
        prior = estimate_prior(
            model,
            tokenizer,
            self.examples("train"),
            batch_size=self.config.prior.batch_size,
            max_source_len=d.max_source_len,
            max_target_len=d.max_target_len,
            description=expected,
            lm_separator=d.lm_separator,
            progress=self.progress,
        )
        prior.save(self.prior_path)
        if not prior.metadata.get("complete", True):
            raise KeyboardInterrupt(f"prior interrupted after {_tokens(prior)} tokens; partial prior saved")
        seconds = time.perf_counter() - start
        self.console.print(f"prior: {_tokens(prior)} tokens in {seconds:.0f} s -> {self.prior_path}")
        self._prior = prior
        return prior

    def _nv_model(self, prior: EmpiricalPrior) -> nn.Module:
        model, _ = self.loaded
        if is_converted(model) and model.__dict__.get("nv_prior") is not prior:
            unload(model)
        if not is_converted(model):
            convert(model, NVConfig(), prior=prior)
        return model

    def search(self) -> optuna.Study:
        """Tune the knobs on the dev set (resuming a stored study); writes nv_config.json."""
        cfg, metric_name = self.config, self.config.metric
        prior = self.prior(required=True)
        model = self._nv_model(prior)
        self._start()
        dev = self.examples("dev")
        slices = sorted({min(s, len(dev)) for s in cfg.search.slices})
        if slices[-1] < max(cfg.search.slices):
            self.console.print(f"search: the dev set has {len(dev)} examples; slices clipped to {slices}")
        previous = _load_study(self.storage, cfg.search.study_name)
        if previous is not None and previous.user_attrs.get("metric", metric_name) != metric_name:
            raise ValueError(
                f"the study {cfg.search.study_name!r} in {self.storage} optimised "
                f"{previous.user_attrs['metric']!r}, the config asks for {metric_name!r}. "
                "Fix: use another run directory or search.study_name"
            )
        done = len(previous.get_trials(deepcopy=False, states=_FINISHED)) if previous is not None else 0
        remaining = max(self.n_trials - done, 0)
        if done:
            self.console.print(f"search: resuming study with {done} finished trials; {remaining} to run")
        kinds = {layer.kind for layer in nv_layers(model).values()}
        bar, start = new_progress(self.progress, self.console), time.perf_counter()
        with bar:
            trials = bar.add_task("search", total=remaining, info=metric_name)
            started = [0]

            def on_call(knobs: dict[str, float], n: int) -> None:
                if n == slices[0]:
                    bar.update(trials, completed=started[0], info=f"trial {started[0] + 1}/{remaining}")
                    started[0] += 1

            objective = DevObjective(self.evaluator(bar), dev, metric_name, on_call=on_call)
            study = run_search(
                objective,
                kinds,
                n_trials=self.n_trials,
                storage=self.storage,
                study_name=cfg.search.study_name,
                slices=slices,
                start_points=cfg.search.start_points,
                space=cfg.search.space(),
                seed=cfg.search.seed,
                timeout=cfg.search.timeout,
                progress=False,
                n_startup_trials=cfg.search.n_startup_trials,
            )
            bar.update(trials, completed=remaining)
        study.set_user_attr("metric", metric_name)
        tuned = NVConfig(**best_knobs(study))
        tuned.save(self.dir / KNOBS_FILE)
        sign = -1 if metric_name in LOWER_IS_BETTER else 1
        self.console.print(
            f"search: {started[0]} trials in {time.perf_counter() - start:.0f} s "
            f"({objective.n_generated} dev examples run); best {metric_name} {sign * study.best_value:.4f} "
            f"(trial #{study.best_trial.number}); knobs -> {self.dir / KNOBS_FILE}"
        )
        return study

    def tuned_knobs(self) -> NVConfig:
        path = self.dir / KNOBS_FILE
        if path.is_file():
            return NVConfig.load(path)
        study = _load_study(self.storage, self.config.search.study_name)
        if study is None:
            raise FileNotFoundError(f"no tuned knobs at {path} and no study. Fix: run `nvib search` first")
        return NVConfig(**best_knobs(study))

    def evaluate(self, knobs: NVConfig | None = None) -> Evaluation:
        """Evaluate unconverted / equivalence / tuned on every test set; write predictions, scores.json."""
        cfg = self.config
        prior = self.prior(required=True)
        tuned = knobs or self.tuned_knobs()
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
            )
        self.console.print(_results_table(evaluation))
        self.console.print(f"evaluation: {time.perf_counter() - start:.0f} s -> {self.dir / 'scores.json'}")
        return evaluation

    def report(self, evaluation: Evaluation | None = None) -> ReportPaths:
        cfg = self.config
        study = _load_study(self.storage, cfg.search.study_name)
        prior = self._prior or (EmpiricalPrior.load(self.prior_path) if self.prior_path.is_file() else None)
        notes = {
            "model": f"{cfg.path(cfg.model.path)} ({cfg.model.kind})",
            "task": cfg.task,
            "train (prior)": str(cfg.path(cfg.data.train)),
            "dev (search)": str(cfg.path(cfg.data.dev)),
            "search metric": cfg.metric
            + (" (the search maximises its negative)" if cfg.metric in LOWER_IS_BETTER else ""),
            "generation": ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg.generation).items()),
        }
        results = differences = mass = None
        if evaluation is not None:
            notes["equivalence"] = ", ".join(
                f"{name}: {'identical' if e['identical'] else 'NOT identical'}"
                for name, e in evaluation.equivalence.items()
            )
            for variant, sets in evaluation.tokens.items():
                what = "scored" if evaluation.task == "lm" else "generated"
                notes[f"{what} tokens, {VARIANTS[variant]}"] = ", ".join(f"{n}: {t}" for n, t in sets.items())
            results = {VARIANTS[v]: r for v, r in evaluation.results.items()}
            differences = {VARIANTS[v]: d for v, d in evaluation.differences.items()}
            single = len(evaluation.prior_mass) == 1
            mass = {
                (kind if single else f"{name}: {kind}"): value
                for name, per in evaluation.prior_mass.items()
                for kind, value in per.items()
            }
        paths = write_report(
            self.dir,
            title=f"NVIB run: {_model_name(cfg.path(cfg.model.path))} ({cfg.task})",
            study=study,
            results=results,
            differences=differences,
            baseline=VARIANTS["unconverted"],
            prior_stats=prior_stats(prior) if prior is not None else None,
            prior_mass=mass,
            notes=notes,
        )
        self.console.print(f"report: {paths.markdown} and {paths.html}")
        return paths

    def all(self) -> Evaluation:
        """prior -> search -> evaluate -> report."""
        self._start()
        self.prior()
        self.search()
        evaluation = self.evaluate()
        self.report(evaluation)
        return evaluation


_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _load_study(storage: str, name: str) -> optuna.Study | None:
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).is_file():
        return None  # do not create an empty database file just to look
    with suppress(KeyError):
        return optuna.load_study(study_name=name, storage=storage)
    return None


def _model_name(path: Path) -> str:
    return path.parent.name if path.name == "model" else path.name


def _tokens(prior: EmpiricalPrior) -> int:
    return max((s.count for s in prior.sites.values()), default=0)


def _results_table(evaluation: Evaluation) -> Table:
    table = Table(caption="(Δ vs unconverted; 95% bootstrap intervals in scores.json and report.md)")
    for column in ("test set", "metric", *VARIANTS.values()):
        table.add_column(column, justify="left" if column in ("test set", "metric") else "right")
    for name in evaluation.equivalence:
        for m in evaluation.metrics:
            cells = []
            for variant in VARIANTS:
                cell = f"{evaluation.results[variant][name][m]:.2f}"
                diff = evaluation.differences.get(variant, {}).get(name, {}).get(m)
                if diff is not None:
                    cell += f" ({diff.delta:+.2f})"
                cells.append(cell)
            table.add_row(name, m, *cells)
    return table
