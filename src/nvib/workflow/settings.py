"""The run config schema: a YAML/TOML file -> :class:`RunConfig`, with one-line errors naming the fix.

Paths in a config are relative to the config file, and ``package:NAME/sub/path`` names a path inside an
installed Python package (:func:`resolve_path`). The sections are :mod:`nvib.workflow.sections`, the one-line
errors :mod:`nvib.workflow.config_errors`, the paths :mod:`nvib.workflow.config_paths`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic.json_schema import SkipJsonSchema

from nvib.workflow.config_errors import ConfigError, config_error, unknown_key
from nvib.workflow.config_paths import package_dir, resolve_path
from nvib.workflow.sections import (
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    MODEL_KINDS,
    PRIOR_ONLY_ALPHA_TAUS,
    SECTION_CONFIG,
    STDEV_RANGES,
    BaselinesSection,
    DataSection,
    DatasetSection,
    DemonstrationsSection,
    EvaluationSection,
    GenerationArgs,
    GenerationSection,
    ModelSection,
    PriorSection,
    PromptSection,
    SearchSection,
    SearchSpace,
    Str,
)

__all__ = [
    "DEFAULT_OBJECTIVE",
    "GRACE_PERIOD",
    "HEARTBEAT_INTERVAL",
    "MODEL_KINDS",
    "TASKS",
    "TASK_METRICS",
    "GenerationArgs",
    "SearchSpace",
    "STDEV_RANGES",
    "PRIOR_ONLY_ALPHA_TAUS",
    "BaselinesSection",
    "ConfigError",
    "DataSection",
    "DatasetSection",
    "DemonstrationsSection",
    "PromptSection",
    "EvaluationSection",
    "GenerationSection",
    "ModelSection",
    "PriorSection",
    "RunConfig",
    "SearchSection",
    "config_schema",
    "describe_schema",
    "package_dir",
    "resolve_path",
]

TASKS = ("summarisation", "translation", "lm")
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "summarisation": ("rouge1", "rouge2", "rougeL", "nll"),
    "translation": ("bleu", "chrf", "nll"),
    "lm": ("perplexity",),
}
#: The metric the knob search optimises unless the run config names another: the likelihood of the dev
#: references (generation metrics can be won by degenerate, input-independent outputs).
DEFAULT_OBJECTIVE = {"summarisation": "nll", "translation": "nll", "lm": "perplexity"}
Task = Literal["summarisation", "translation", "lm"]
assert typing.get_args(Task) == TASKS
TOUR_CONFIG = "demo.yaml"  # in demo_data/ of the nvib package (names kept: configs point at them)


_INTERNAL = ("base_dir", "source", "raw")


@dataclass(frozen=True, config=SECTION_CONFIG)
class RunConfig:
    """A run: ``model``, ``task`` (summarisation / translation / lm), ``data``, and optional ``prior``,
    ``generation``, ``search``, ``baselines``, ``evaluation``, ``prompt`` (few-shot, causal LMs) sections and
    ``run_dir`` (relative to the working directory; default ``runs/<config file name>``)."""

    model: ModelSection
    task: Task
    data: DataSection
    prior: PriorSection = PriorSection()
    generation: GenerationSection = GenerationSection()
    search: SearchSection = SearchSection()
    baselines: BaselinesSection = BaselinesSection()
    evaluation: EvaluationSection = EvaluationSection()
    prompt: PromptSection | None = None
    run_dir: Str | None = None
    # not config keys (_INTERNAL): where relative paths start, the file it came from, the raw mapping
    base_dir: SkipJsonSchema[Path] = Path(".")
    source: SkipJsonSchema[str] = "<config>"
    raw: SkipJsonSchema[dict[str, Any]] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.search.metric is not None and self.search.metric not in TASK_METRICS[self.task]:
            raise ValueError(
                f"search.metric {self.search.metric!r} is not computed for task {self.task!r}; "
                f"choose one of {', '.join(TASK_METRICS[self.task])}"
            )
        if self.prompt is not None and self.task == "lm":
            raise ValueError("prompt: a few-shot prompt scores targets; task lm has none. Fix: task summarisation "
                             "or translation, or drop the prompt section")  # fmt: skip
        if self.prompt is not None and (self.generation.num_beams != 1 or self.generation.kwargs):
            raise ValueError("prompt: generation behind a shared prefix is greedy. Fix: generation.num_beams 1 and "
                             "no generation.kwargs, or drop the prompt section")  # fmt: skip

    @property
    def metric(self) -> str:
        return self.search.metric or DEFAULT_OBJECTIVE[self.task]

    def path(self, value: str) -> Path:
        return resolve_path(value, self.base_dir)

    @classmethod
    def from_dict(cls, raw: Any, base_dir: str | Path = ".", source: str = "<config>") -> RunConfig:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping of keys to values, got {type(raw).__name__}")
        for key in raw:
            if key in _INTERNAL:
                raise unknown_key((key,), source, RunConfig, _INTERNAL)
        try:
            config = _ADAPTER.validate_python(raw)
        except ValidationError as err:
            raise config_error(err, source, RunConfig, _INTERNAL) from None
        return dataclasses.replace(config, base_dir=Path(base_dir), source=source, raw=dict(raw))

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}. Fix: check the path (a .yaml or .toml file)")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise ConfigError(
                f"{path}: byte {err.start} (line {line}) is 0x{data[err.start]:02x}, not UTF-8 text. Fix: save the "
                "file as UTF-8"
            ) from None
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
    def tour(cls) -> RunConfig:
        """The tour's embedded config (`nvib tour`): the packaged MiniLM warm-started as BERT2BERT on a tiny
        docstring set."""
        return cls.load(Path(str(resources.files("nvib") / "demo_data")) / TOUR_CONFIG)

    def default_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / Path(self.source).stem


_ADAPTER = TypeAdapter(RunConfig)


def config_schema() -> dict[str, Any]:
    """The JSON schema of a run config (for editors and ``nvib run --help``)."""
    return _ADAPTER.json_schema()


def describe_schema() -> str:
    """The config keys with their defaults, one section a line (for ``--help``), from the JSON schema."""
    schema = config_schema()
    defs = schema.get("$defs", {})

    def keys(section: dict[str, Any]) -> str:
        parts, required = [], set(section.get("required", ()))
        for name, prop in section["properties"].items():
            if "$ref" in prop:
                continue
            if name in required:
                parts.append(f"{name} (required)")
            elif "default" in prop:
                parts.append(f"{name}={prop['default']!r}")
            else:
                parts.append(f"{name}={{}}" if prop.get("type") == "object" else name)
        return ", ".join(parts)

    lines = [f"top level: {keys(schema)} (task: {', '.join(TASKS)})"]
    for name, prop in schema["properties"].items():
        ref = prop.get("$ref") or next((p["$ref"] for p in prop.get("anyOf", ()) if "$ref" in p), None)
        if ref is not None:  # a section, or an optional one (prompt: null by default)
            optional = " (optional)" if "anyOf" in prop else ""
            lines.append(f"{name}{optional}: {keys(defs[ref.rsplit('/', 1)[-1]])}")
    return "\n".join(lines)
