"""A run directory's files and what identifies the run in it: the data as the records name it, the run identity a
rerun must share (`nvib.workflow.identity`), and starting the directory (identity checked, config.json written)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from nvib.core import files
from nvib.workflow.identity import check_identity, file_fingerprint
from nvib.workflow.models import model_location
from nvib.workflow.settings import DatasetSection, RunConfig

__all__ = [
    "BASELINES_FILE",
    "CONFIG_FILE",
    "IDENTITY_FILE",
    "KNOBS_FILE",
    "PRIOR_FILE",
    "PROMPT_CHECK_FILE",
    "STUDY_FILE",
    "data_name",
    "describe_data",
    "prior_description",
    "prompt_digest",
    "run_identity",
    "start_run",
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


def data_name(config: RunConfig, data: str | DatasetSection) -> str:
    """A data entry as the run's records name it: the resolved file path, or the dataset's name, config, split."""
    if isinstance(data, DatasetSection):
        return str(data.spec(config.base_dir))
    return str(config.path(data).resolve())


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


def prior_description(config: RunConfig) -> str:
    """The ``data`` metadata a prior estimated by this run carries (`describe_data`, and the prompt's digest)."""
    d = config.data
    text = describe_data(
        data_name(config, d.train),
        (d.source_column, d.target_column),
        (d.max_source_len, d.max_target_len),
        d.train_limit,
        config.prior.batch_size,
    )
    return text if config.prompt is None else f"{text} prompt={prompt_digest(config)}"


def prompt_digest(config: RunConfig) -> str:
    """A short hash of the prompt section, its demonstrations' data by contents (a file's fingerprint, however
    the config names it): a prior or a run made with another prompt is told apart."""
    section = dataclasses.asdict(config.prompt)  # type: ignore[arg-type]
    given = config.prompt.demonstrations  # type: ignore[union-attr]
    if given is not None:
        data = given.data
        section["demonstrations"]["data"] = (
            data_name(config, data) if isinstance(data, DatasetSection) else file_fingerprint(config.path(data))
        )
    return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_identity(config: RunConfig) -> dict[str, Any]:
    """What a run's results depend on (`nvib.workflow.identity`): a rerun resumes only the same."""
    cfg, d = config, config.data
    model = model_location(cfg.model.path, cfg.base_dir)
    tokenizer = model_location(cfg.model.tokenizer, cfg.base_dir) if cfg.model.tokenizer else model
    paths = {k: v for k, v in (("model", model), ("tokenizer", tokenizer)) if isinstance(v, Path)}
    hub = {f"{k} hub id": v for k, v in (("model", model), ("tokenizer", tokenizer)) if isinstance(v, str)}
    datasets = {k: v for k, v in (("train", d.train), ("dev", d.dev)) if isinstance(v, DatasetSection)}
    paths.update({k: cfg.path(v) for k, v in (("train", d.train), ("dev", d.dev)) if k not in datasets})
    return {
        **{f"{k} files": f"{Path(p).name} {file_fingerprint(Path(p))}" for k, p in paths.items()}, **hub,
        **{f"{k} dataset": data_name(cfg, v) for k, v in datasets.items()},
        "model kind": cfg.model.kind, "gguf_file": cfg.model.gguf_file, "seed": cfg.model.seed,
        "task": cfg.task, "columns": [d.source_column, d.target_column], "limits": [d.train_limit, d.dev_limit],
        "lengths": [d.max_source_len, d.max_target_len], "lm_separator": d.lm_separator,
        **({"prompt": prompt_digest(cfg)} if cfg.prompt is not None else {}),
    }  # fmt: skip


def start_run(run_dir: Path, config: RunConfig) -> None:
    """Make ``run_dir``, refuse it if it was started for another run (`run_identity`), write config.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    check_identity(
        run_dir / IDENTITY_FILE, run_identity(config),
        "use a new run directory (-o/--run-dir), or delete this one to start over",
    )  # fmt: skip
    record = {"source": config.source, "base_dir": str(config.base_dir), "config": config.raw}
    files.write_json(run_dir / CONFIG_FILE, record, default=str)
