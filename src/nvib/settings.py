"""The run config schema: a YAML/TOML file -> :class:`RunConfig`, with one-line errors naming the fix.

Paths in a config are relative to the config file, and ``package:NAME/sub/path`` names a path inside an
installed Python package (:func:`resolve_path`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nvib.evaluate import DEFAULT_OBJECTIVE, TASK_METRICS, TASKS, GenerationArgs
from nvib.search import KNOBS, SearchSpace

__all__ = [
    "MODEL_KINDS",
    "ConfigError",
    "DataSection",
    "EvaluationSection",
    "ModelSection",
    "PriorSection",
    "RunConfig",
    "SearchSection",
    "describe_schema",
    "resolve_path",
]

MODEL_KINDS = ("auto", "seq2seq", "causal_lm", "bert2bert")
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
