"""The sections of a run config (:mod:`nvib.workflow.settings`): what the run reads (``model``, ``data``,
``prompt``, ``prior``) and how it tunes and scores (``generation``, ``search``, ``baselines``, ``evaluation``),
each a validated, frozen pydantic dataclass; the strict field types they are made of; the search's knob ranges and
the generation arguments they validate."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from annotated_types import Ge, Gt, Le
from pydantic import BeforeValidator, ConfigDict, Field, Strict
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from nvib.core.config import KNOBS, bounds
from nvib.workflow.choices import MODEL_KINDS, ModelKind
from nvib.workflow.config_paths import resolve_path

if TYPE_CHECKING:  # imported where used: the schema (and `nvib run --help`) needs no torch
    from nvib.workflow.data import HubDataset

__all__ = [
    "GRACE_PERIOD",
    "HEARTBEAT_INTERVAL",
    "MODEL_KINDS",
    "PRIOR_ONLY_ALPHA_TAUS",
    "SECTION_CONFIG",
    "STDEV_RANGES",
    "BaselinesSection",
    "DataSection",
    "DatasetSection",
    "DemonstrationsSection",
    "EvaluationSection",
    "GenerationArgs",
    "GenerationSection",
    "ModelSection",
    "PriorSection",
    "PromptSection",
    "SearchSection",
    "SearchSpace",
    "Str",
]

STDEV_RANGES = {"prior": (0.0, 0.5), "bias": (0.0, 2.0)}
#: alpha_tau_* of the prior-only start points (stdev_tau = 0): the prior's own effect is always measured
PRIOR_ONLY_ALPHA_TAUS = (-2.0, 0.0, 2.0)
#: Default heartbeat of running trials and the silence after which a trial counts as dead (seconds).
HEARTBEAT_INTERVAL, GRACE_PERIOD = 10, 60


@dataclasses.dataclass
class SearchSpace:
    """Ranges of the knobs: one for every ``alpha_tau_*``, one for every ``stdev_tau_*``, and
    per-knob ``overrides`` such as ``{"alpha_tau_c": (-5.0, 5.0)}``."""

    alpha_tau: tuple[float, float] = (-15.0, 5.0)
    stdev_tau: tuple[float, float] = (0.0, 0.5)
    overrides: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def range(self, knob: str) -> tuple[float, float]:
        """The configured (low, high) of ``knob``."""
        if knob not in KNOBS:
            raise ValueError(f"unknown knob {knob!r}; knobs: {', '.join(KNOBS)}")
        low, high = self.overrides.get(knob, self.alpha_tau if knob.startswith("alpha") else self.stdev_tau)
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ValueError(f"bad range for {knob}: ({low}, {high}); need finite low <= high")
        if knob.startswith("stdev") and low < 0:
            raise ValueError(f"bad range for {knob}: stdev_tau must be >= 0, got low={low}")
        return low, high

    def validate(self) -> None:
        """Raise ValueError on unknown override names or bad ranges."""
        unknown = set(self.overrides) - set(KNOBS)
        if unknown:
            raise ValueError(f"unknown knob(s) in overrides: {sorted(unknown)}; knobs: {', '.join(KNOBS)}")
        for knob in KNOBS:
            self.range(knob)


@dataclasses.dataclass(frozen=True)
class GenerationArgs:
    """How predictions are made. ``kwargs`` go to ``model.generate`` as they are (e.g. length_penalty)."""

    num_beams: int = 1
    max_new_tokens: int = 64
    batch_size: int = 16
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if "do_sample" in self.kwargs:
            raise ValueError("kwargs may not set do_sample: evaluation decodes deterministically (greedy or beam)")
        reserved = {"num_beams", "max_new_tokens", "input_ids", "attention_mask"} & set(self.kwargs)
        if reserved:
            raise ValueError(f"kwargs may not set {sorted(reserved)}: use the generation fields of the same name")


# ----------------------------------------------------------------------------------------------
# the sections (pydantic dataclasses: keyword or positional construction, validated, frozen)

#: What every section is validated with: unknown keys and non-finite numbers refused
SECTION_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
Int = Annotated[int, Strict()]
PositiveInt = Annotated[int, Strict(), Ge(1)]
NonNegativeInt = Annotated[int, Strict(), Ge(0)]
Float = Annotated[float, Strict()]
Str = Annotated[str, Strict()]


def _two_values(value: Any) -> Any:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise PydanticCustomError("expected", "must be {expected}", {"expected": "a list of 2 values [low, high]"})
    return value


Range = Annotated[tuple[Float, Float], BeforeValidator(_two_values)]


@dataclass(frozen=True, config=SECTION_CONFIG)
class ModelSection:
    """``path``: a local HF model directory (relative to the config), or a hub id such as
    ``facebook/bart-large-xsum`` where no such directory exists (from the hub, or its cache under
    ``HF_HUB_OFFLINE=1``); ``tokenizer`` likewise. ``kind``: ``seq2seq``,
    ``causal_lm``, ``bert2bert`` (warm-start an encoder-decoder from an encoder-only model, whose
    cross-attention is newly initialised with ``seed``) or ``auto`` (from the model's config).
    ``gguf_file``: a GGUF file inside ``path`` to load the weights (and tokenizer) from. ``device``: where the
    model runs (``auto``: the first CUDA device if there is one, else the CPU; or a torch device such as ``cuda:1``)."""

    path: Str
    kind: ModelKind = "auto"
    tokenizer: Str | None = None
    seed: Int = 0
    gguf_file: Str | None = None
    device: Str = "auto"

    def __post_init__(self) -> None:
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(
                    f"device {self.device!r} is not a torch device. Fix: auto, cpu, cuda or cuda:N"
                ) from None


@dataclass(frozen=True, config=SECTION_CONFIG)
class DatasetSection:
    """A dataset by name, loaded with ``datasets.load_dataset(dataset, config, split=split)``: a hub id as its
    dataset card gives it, or a local folder of data files. Columns: ``source`` and ``target``, or ``translation``:
    [source language, target language] for a ``translation`` column of {language: text} rows."""

    dataset: Str
    split: Str
    config: Str | None = None
    source: Str | None = None
    target: Str | None = None
    translation: Annotated[tuple[Str, Str], BeforeValidator(_two_values)] | None = None

    def __post_init__(self) -> None:
        if self.translation is not None and (self.source or self.target):
            raise ValueError("give either translation: [source language, target language] or source/target, not both")
        if self.target is not None and self.source is None:
            raise ValueError("target was given without source. Fix: name the source column too")

    def spec(self, base_dir: str | Path = ".") -> HubDataset:
        """The loader's view; a ``./``- or ``../``-relative name is a local folder relative to ``base_dir``."""
        name = self.dataset
        if name.startswith(("./", "../")):
            name = str(resolve_path(name, base_dir))
        from nvib.workflow.data import HubDataset

        return HubDataset(name, self.split, self.config, self.source, self.target, self.translation)


Data = Str | DatasetSection
#: What a test set's name may not hold (it names files: predictions/<variant>.<name>.jsonl), beside control
#: characters, and its longest UTF-8 length (file names hold 255 bytes, less the variant and extension)
_NOT_IN_FILE_NAMES, MAX_TEST_NAME = '/\\<>:"|?*', 200


@dataclass(frozen=True, config=SECTION_CONFIG)
class DataSection:
    """``train``: in-domain data the empirical prior is estimated on; ``dev``: what the knobs are tuned
    on; ``test``: name -> data of each test set. Each is a file (JSONL/CSV/TSV or a ``save_to_disk`` directory) or
    a dataset by name (:class:`DatasetSection`: ``{dataset, config, split, source, target}``)."""

    train: Data
    dev: Data
    test: dict[Str, Data]
    source_column: Str | None = None
    target_column: Str | None = None
    max_source_len: PositiveInt = 512
    max_target_len: PositiveInt = 128
    lm_separator: Str = "\n"
    train_limit: PositiveInt | None = None
    dev_limit: PositiveInt | None = None
    test_limit: PositiveInt | None = None

    def __post_init__(self) -> None:
        if not self.test:
            raise ValueError("test must name at least one test set, e.g. test: {in_domain: test.jsonl}")
        for name in self.test:
            bad = sorted({c for c in name if c in _NOT_IN_FILE_NAMES or ord(c) < 32})
            if not name or bad or name.startswith(".") or len(name.encode("utf-8")) > MAX_TEST_NAME:
                what = (
                    f"holds {', '.join(map(repr, bad))}" if bad else "starts with '.'" if name.startswith(".")
                    else f"has {len(name.encode('utf-8'))} bytes (at most {MAX_TEST_NAME})" if name else "is empty"
                )  # fmt: skip
                raise ValueError(
                    f"test set name {name[:40]!r}{'...' if len(name) > 40 else ''} {what}: it names the test set's "
                    "files. Fix: a short plain word such as in_domain"
                )


@dataclass(frozen=True, config=SECTION_CONFIG)
class DemonstrationsSection:
    """``k`` demonstrations drawn with ``seed`` from ``data`` (a file or a dataset, read with the data section's
    columns): among its first ``pool`` examples (all if null) whose source has ``source_words`` = [low, high]
    words (any if null)."""

    data: Data
    k: PositiveInt = 3
    seed: Int = 0
    pool: PositiveInt | None = None
    source_words: Annotated[tuple[NonNegativeInt, NonNegativeInt], BeforeValidator(_two_values)] | None = None


@dataclass(frozen=True, config=SECTION_CONFIG)
class PromptSection:
    """A few-shot prompt for a causal LM (:mod:`nvib.workflow.prompting`): every example is ``template`` with its
    ``{source}`` and ``{target}`` (only the target is scored), after a prefix shared by all: BOS (``bos``), the
    literal ``prefix`` text, and the ``demonstrations`` each followed by ``separator``. The prefix's KV cache is
    computed once per knob setting; ``check`` holds shared against unshared at start-up (1e-4 nats/token,
    identical greedy outputs). Generation is greedy and ends at ``stop`` (or EOS); the prediction is the text
    before it. Sources and targets are cut to ``data.max_source_len`` / ``max_target_len`` tokens."""

    template: Str = "{source}\n{target}"
    prefix: Str = ""
    demonstrations: DemonstrationsSection | None = None
    separator: Str = "\n\n"
    stop: Str | None = "\n"
    bos: bool = True
    check: bool = True

    def __post_init__(self) -> None:
        from nvib.workflow.prompting import Template

        Template.parse(self.template)


@dataclass(frozen=True, config=SECTION_CONFIG)
class PriorSection:
    """``batch_size``: examples per batch of the estimate; ``allow_foreign``: use a prior (``--prior``) estimated on
    other weights than the run's model, with a warning (refused otherwise: its statistics describe another model)."""

    batch_size: PositiveInt = 16
    allow_foreign: bool = False


@dataclass(frozen=True, config=SECTION_CONFIG)
class GenerationSection(GenerationArgs):
    """:class:`GenerationArgs`, validated: ``kwargs`` go to ``model.generate`` as they are."""

    num_beams: PositiveInt = 1
    max_new_tokens: PositiveInt = 64
    batch_size: PositiveInt = 16
    kwargs: dict[Str, Any] = Field(default_factory=dict)


@dataclass(frozen=True, config=SECTION_CONFIG)
class SearchSection:
    """``slices``: growing dev prefixes each trial is scored on (clipped to the dev size); ``ranges``:
    ``alpha_tau`` / ``stdev_tau`` (every kind) or a single knob such as ``alpha_tau_c`` -> [low, high];
    ``start_points``: knob dicts tried first (after the equivalence point); ``storage``: an Optuna
    storage URL (default: ``sqlite:///RUN_DIR/study.db``; runs started with the same URL and
    ``study_name`` share the study); ``metric``: default per task (``nll``, the likelihood of the dev
    references, for summarisation and translation); ``min_diversity``: a search on a generation metric
    prunes knobs whose dev outputs are less diverse than this fraction of the unconverted model's (null: no
    guard); ``seed``: shifts the TPE seed, which is derived from the dev data's name so different domains
    draw different candidates; ``heartbeat_interval`` / ``grace_period``: seconds between heartbeats of a
    running trial / of silence after which it is failed and re-queued (its process died); ``stdev_unit``: the unit
    of ``stdev_tau`` (docs/method.md §12: ``prior`` = σ/s_0, ``bias`` = nats of score-bias spread; default: z-space
    sites ``prior``, key-space sites ``bias``), which also picks the default ``stdev_tau`` range."""

    n_trials: NonNegativeInt = 30
    slices: tuple[PositiveInt, ...] = (32, 128)
    metric: Str | None = None
    min_diversity: Annotated[float, Strict(), Gt(0), Le(1)] | None = 0.5
    ranges: dict[Str, Range] = Field(default_factory=dict)
    start_points: tuple[dict[Str, Float], ...] = ()
    storage: Str | None = None
    study_name: Str = "nvib"
    seed: Int = 0
    timeout: Annotated[float, Strict(), Gt(0)] | None = None
    n_startup_trials: Int = 5
    heartbeat_interval: PositiveInt = HEARTBEAT_INTERVAL
    grace_period: PositiveInt = GRACE_PERIOD
    stdev_unit: Literal["prior", "bias"] | None = None

    def __post_init__(self) -> None:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period ({self.grace_period} s) must exceed heartbeat_interval ({self.heartbeat_interval} s): "
                "a live trial would be failed between two heartbeats"
            )
        if not self.slices or sorted(set(self.slices)) != list(self.slices):
            raise ValueError(f"slices must be positive and strictly increasing, got {list(self.slices)}")
        for i, point in enumerate(self.start_points):
            unknown = sorted(set(point) - set(KNOBS))
            if unknown:
                raise ValueError(f"start_points[{i}] has unknown knobs {unknown}; knobs: {', '.join(KNOBS)}")
        space = self.space()
        space.validate()
        for knob in KNOBS:  # every value the search may try must be a valid NVConfig
            low, high, closed = bounds(knob)
            lo, hi = space.range(knob)
            if not (low <= lo if closed else low < lo) or hi > high:
                raise ValueError(
                    f"ranges for {knob} ({lo:g}, {hi:g}) leave the knob's valid range "
                    f"{'[' if closed else '('}{low:g}, {high:g}]. Fix: narrow search.ranges"
                )

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


@dataclass(frozen=True, config=SECTION_CONFIG)
class BaselinesSection:
    """The baselines tuned beside NV with the same objective, dev data and trial budget
    (:mod:`nvib.workflow.baselines`): ``temperature`` (one attention temperature, on by default) in
    ``temperature_range``; ``wise_ft``: a local HF model directory of the pre-fine-tuning checkpoint (relative to
    the config) or a hub id, which turns WiSE-FT on (weights interpolated towards it, the fine-tuned share in
    ``wise_ft_range``)."""

    temperature: bool = True
    temperature_range: Range = (0.5, 2.0)
    wise_ft: Str | None = None
    wise_ft_range: Range = (0.0, 1.0)

    def __post_init__(self) -> None:
        low, high = self.temperature_range
        if not 0 < low < 1 < high:
            raise ValueError(f"temperature_range must hold 1 with 0 < low < 1 < high, got [{low:g}, {high:g}]")
        low, high = self.wise_ft_range
        if not 0 <= low < high == 1:
            raise ValueError(f"wise_ft_range must be [low, 1] with 0 <= low < 1, got [{low:g}, {high:g}]")


@dataclass(frozen=True, config=SECTION_CONFIG)
class EvaluationSection:
    bootstrap: PositiveInt = 1000
    seed: Int = 0
