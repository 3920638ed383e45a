"""What a run reads, each once, and where it reports: its model (loaded on first use), the examples of each split,
the few-shot prompt, the evaluator over them; the console and whether progress bars show."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from rich.console import Console
from torch import nn

from nvib.core.config import NVConfig
from nvib.core.convert import convert, is_converted, unload
from nvib.core.prior import EmpiricalPrior
from nvib.workflow.data import Example, load_dataset_examples, load_examples
from nvib.workflow.evaluate import Evaluator
from nvib.workflow.models import load_model, model_location
from nvib.workflow.prompting import FewShotPrompt, draw_demonstrations
from nvib.workflow.settings import DatasetSection, RunConfig

__all__ = ["RunInputs"]


class RunInputs:
    """The model, data and prompt of a run config, read once, over one model object that the stages convert,
    configure and unload in turn; ``console`` and ``progress`` say where the stages report."""

    def __init__(self, config: RunConfig, console: Console, progress: bool = True):
        self.config = config
        self.console = console
        self.progress = progress
        self._examples: dict[tuple[str, str | None], list[Example]] = {}

    @cached_property
    def loaded(self) -> tuple[nn.Module, Any]:
        """(model, tokenizer), loaded on first use."""
        cfg = self.config
        self.console.print(f"loading model [bold]{model_location(cfg.model.path, cfg.base_dir)}[/bold]")
        model, tokenizer = load_model(cfg.model, cfg.task, cfg.base_dir)
        if cfg.model.kind == "bert2bert":
            self.console.print(
                f"[yellow]note:[/yellow] bert2bert warm start: the decoder's cross-attention is untrained "
                f"(initialised with seed {cfg.model.seed}); expect poor outputs"
            )
        return model, tokenizer

    def refit(self, config: RunConfig) -> None:
        """Use ``config`` from now on (the lengths fitted to the model): the prompt is built again with it."""
        self.config = config
        self.__dict__.pop("prompt", None)

    def examples(self, split: str, name: str | None = None) -> list[Example]:
        """The examples of ``split`` (train, dev, or the test set ``name``), read once."""
        if (split, name) not in self._examples:
            d = self.config.data
            data = {"train": d.train, "dev": d.dev}.get(split) or d.test[name]
            limit = {"train": d.train_limit, "dev": d.dev_limit}.get(split, d.test_limit)
            self._examples[split, name] = self._read(data, limit)
        return self._examples[split, name]

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

    def prompt_overhead(self) -> int:
        """Tokens of a few-shot prompt before and around each source: its prefix and template pieces (0 without)."""
        if self.prompt is None:
            return 0
        return len(self.prompt.prefix) + len(self.prompt.encode(Example("")).suffix)

    def evaluator(self, progress) -> Evaluator:
        """An evaluator of the run's model with the config's task, generation and lengths, reporting to
        ``progress`` (a rich Progress, or None)."""
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

    def unconverted_model(self) -> nn.Module:
        """The model, its NV layers unloaded if it has them."""
        model, _ = self.loaded
        if is_converted(model):
            unload(model)
        return model

    def nv_model(self, prior: EmpiricalPrior) -> nn.Module:
        """The model converted with ``prior`` at the identity knobs (kept as it is if it is so already)."""
        model, _ = self.loaded
        if is_converted(model) and model.__dict__.get("nv_prior") is not prior:
            unload(model)
        if not is_converted(model):
            convert(model, NVConfig(), prior=prior)
        return model
