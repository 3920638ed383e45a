"""The ``nvib`` command line: prior, prior-merge, search, evaluate, run and demo.

Errors a user can fix (bad paths, malformed data or config, mismatched priors) are printed as one red
line with the fix, exit code 2, no traceback. Ctrl-C exits with 130; rerunning resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from nvib.models import load_model
from nvib.prior import EmpiricalPrior
from nvib.run import Run, estimate_prior, parse_shard
from nvib.settings import ModelSection, RunConfig, config_schema, describe_schema

app = typer.Typer(
    name="nvib",
    help="Nonparametric Variational (NV) regularisation of pretrained transformers, without retraining: "
    "estimate an empirical prior, tune the NV knobs on dev data, evaluate against the unconverted model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _console() -> Console:
    return Console(stderr=True, soft_wrap=True)


def friendly_errors(fn):
    """Turn the errors a user can fix into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as err:
            message = str(err) or "interrupted"
            _console().print(Text(f"{message}. Rerun the same command to resume.", style="yellow"))
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (ValueError, OSError) as err:  # DataError, ConfigError, PriorMismatchError are ValueErrors
            message = " ".join(str(err).split()) or type(err).__name__
            _console().print(Text(f"error: {message}", style="bold red"))
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the log messages of transformers and optuna.")
    ] = False,
) -> None:
    """Nonparametric Variational (NV) regularisation of pretrained transformers."""
    if not verbose:
        import optuna
        import transformers

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # a Ctrl-C would log a failed trial with a traceback
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


# ----------------------------------------------------------------------------------------------
# shared options

CONFIG_HELP = (
    "\b\nRun config keys (YAML or TOML; paths relative to the config file, package:NAME/sub = a path inside "
    "an installed package; `nvib demo` runs demo_data/demo.yaml of the nvib package, a commented example; "
    "`nvib schema` prints the JSON schema):\n" + describe_schema()
)

ConfigArg = Annotated[Path, typer.Argument(help="Run config file (.yaml or .toml).", show_default=False)]
RunDirOpt = Annotated[
    Path | None,
    typer.Option("--run-dir", "-o", help="Run directory (default: the config's run_dir, else runs/<config name>)."),
]
TrialsOpt = Annotated[
    int | None, typer.Option("--n-trials", help="Total search trials (overrides search.n_trials).", min=0)
]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
MetricOpt = Annotated[
    str | None,
    typer.Option(
        "--metric",
        help="Search objective (overrides search.metric): nll (default: the likelihood of the dev references), "
        "rougeL, rouge1, rouge2, bleu, chrf, or perplexity for the lm task.",
    ),
]
PriorOpt = Annotated[
    Path | None, typer.Option("--prior", help="Prior file to use instead of RUN_DIR/prior.safetensors.")
]


def _with_metric(config: RunConfig, metric: str | None) -> RunConfig:
    """``config`` with search.metric replaced (validated against the task like the config key)."""
    if metric is None:
        return config
    raw = {**config.raw, "search": {**dict(config.raw.get("search") or {}), "metric": metric}}
    return dataclasses.replace(config, search=dataclasses.replace(config.search, metric=metric), raw=raw)


def _run(config: RunConfig, run_dir: Path | None, n_trials: int | None, progress: bool, prior: Path | None = None):
    run = Run(config, run_dir, console=_console(), progress=progress, n_trials=n_trials)
    if prior is not None:
        run.prior_path = prior
    return run


# ----------------------------------------------------------------------------------------------
# commands


@app.command("prior")
@friendly_errors
def prior_cmd(
    model: Annotated[Path, typer.Argument(help="Local Hugging Face model directory.", show_default=False)],
    data: Annotated[
        Path,
        typer.Argument(help="In-domain data: .jsonl/.csv/.tsv or a save_to_disk directory.", show_default=False),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the prior (.safetensors).")] = Path(
        "prior.safetensors"
    ),
    source_column: Annotated[
        str | None, typer.Option(help="Source column (default: document/summary, source/target or text).")
    ] = None,
    target_column: Annotated[str | None, typer.Option(help="Target column (teacher-forced into the decoder).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per batch.", min=1)] = 16,
    max_source_len: Annotated[int, typer.Option(help="Truncate sources to this many tokens.", min=1)] = 512,
    max_target_len: Annotated[int, typer.Option(help="Truncate targets to this many tokens.", min=1)] = 128,
    limit: Annotated[int | None, typer.Option(help="Use only the first LIMIT examples.", min=1)] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="Estimate shard i/n only: batches i, i+n, i+2n, ... (0 <= i < n). Merge the n shards with "
            "`nvib prior-merge`; use the same data, limit and batch size in every shard."
        ),
    ] = None,
    kind: Annotated[
        str,
        typer.Option(help="Model kind: auto, seq2seq, causal_lm or bert2bert (warm-start from an encoder)."),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the weights a bert2bert warm start initialises.")] = 0,
    progress: ProgressOpt = True,
) -> None:
    """Estimate the empirical prior of a model on in-domain data (one streaming pass, exact statistics).

    Under a multi-process launcher (`accelerate launch --num_processes N -m nvib prior ...`, or `torchrun`)
    each process estimates the batches of its rank and rank 0 writes the merged prior (exact).
    """
    from nvib.data import load_examples
    from nvib.distributed import gather_to_rank0, launcher_rank
    from nvib.run import describe_data

    shard_spec = parse_shard(shard)
    rank, world = launcher_rank()
    if world > 1:
        if shard_spec is not None:
            raise ValueError(
                f"--shard {shard} under a {world}-process launch: the launch already shards by rank. "
                "Fix: drop --shard, or run single processes with --shard i/n and `nvib prior-merge`"
            )
        shard_spec = (rank, world)
    console = _console()
    loaded, tokenizer = load_model(ModelSection(str(model), kind=kind, seed=seed))
    examples = load_examples(data, source_column, target_column, limit=limit)
    description = describe_data(
        data, (source_column, target_column), (max_source_len, max_target_len), limit, batch_size
    )
    prior = estimate_prior(
        loaded,
        tokenizer,
        examples,
        batch_size=batch_size,
        max_source_len=max_source_len,
        max_target_len=max_target_len,
        description=description,
        shard=shard_spec,
        progress=progress and rank == 0,
    )
    if world > 1:
        parts = gather_to_rank0(prior)
        if parts is None:
            return  # rank 0 writes the merged prior
        prior = EmpiricalPrior.merge(*parts)
    output.parent.mkdir(parents=True, exist_ok=True)
    prior.save(output)
    tokens = max(s.count for s in prior.sites.values())
    if not prior.metadata.get("complete", True):
        console.print(Text(f"interrupted: partial prior ({tokens} tokens, complete=False) saved to {output}", "yellow"))
        raise typer.Exit(EXIT_INTERRUPTED)
    processes = f" from {world} processes" if world > 1 else ""
    console.print(f"prior over {len(prior.sites)} sites, {tokens} tokens{processes} -> {output}")


@app.command("prior-merge")
@friendly_errors
def prior_merge_cmd(
    priors: Annotated[list[Path], typer.Argument(help="Prior files estimated on disjoint shards.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the merged prior.")] = Path(
        "prior.safetensors"
    ),
) -> None:
    """Merge priors estimated on disjoint shards of the data (exact)."""
    merged = EmpiricalPrior.merge(*(EmpiricalPrior.load(p) for p in priors))
    output.parent.mkdir(parents=True, exist_ok=True)
    merged.save(output)
    tokens = max(s.count for s in merged.sites.values())
    note = "" if merged.metadata.get("complete", True) else " (some shards were incomplete)"
    _console().print(f"merged {len(priors)} priors, {tokens} tokens{note} -> {output}")


@app.command("search", epilog=CONFIG_HELP)
@friendly_errors
def search_cmd(
    config: ConfigArg,
    run_dir: RunDirOpt = None,
    n_trials: TrialsOpt = None,
    metric: MetricOpt = None,
    prior: PriorOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Tune the NV knobs on the dev set (resumes the study in RUN_DIR); writes RUN_DIR/nv_config.json."""
    _run(_with_metric(RunConfig.load(config), metric), run_dir, n_trials, progress, prior).search()


@app.command("evaluate", epilog=CONFIG_HELP)
@friendly_errors
def evaluate_cmd(
    config: ConfigArg,
    run_dir: RunDirOpt = None,
    knobs: Annotated[
        Path | None, typer.Option(help="NVConfig JSON of the tuned knobs (default: RUN_DIR/nv_config.json).")
    ] = None,
    prior: PriorOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Evaluate the unconverted, NV-equivalence and NV-tuned model on every test set; write the report."""
    from nvib.config import NVConfig

    run = _run(RunConfig.load(config), run_dir, None, progress, prior)
    if knobs is not None and not knobs.is_file():
        raise FileNotFoundError(f"no knobs file at {knobs}. Fix: pass the nv_config.json written by `nvib search`")
    evaluation = run.evaluate(NVConfig.load(knobs) if knobs is not None else None)
    run.report(evaluation)


@app.command("run", epilog=CONFIG_HELP)
@friendly_errors
def run_cmd(
    config: Annotated[
        Path | None,
        typer.Argument(help="Run config file (.yaml or .toml); omit with --demo.", show_default=False),
    ] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Use the embedded demo config (packaged MiniLM).")] = False,
    run_dir: RunDirOpt = None,
    n_trials: TrialsOpt = None,
    metric: MetricOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Prior -> search -> evaluate -> report in one run directory; rerunning reuses finished stages."""
    if (config is None) == (not demo):
        raise ValueError(
            "give a config file or --demo (not both). Fix: e.g. `nvib run my_run.yaml` or `nvib run --demo`"
        )
    run_config = _with_metric(RunConfig.demo() if demo else RunConfig.load(config), metric)
    run = _run(run_config, run_dir, n_trials, progress)
    run.all()
    _console().print(f"done: {run.dir}")


@app.command("schema")
def schema_cmd() -> None:
    """Print the JSON schema of run config files (for editors: YAML/TOML language servers validate with it)."""
    typer.echo(json.dumps(config_schema(), indent=2))


@app.command("demo")
@friendly_errors
def demo_cmd(run_dir: RunDirOpt = None, n_trials: TrialsOpt = None, progress: ProgressOpt = True) -> None:
    """The README demo, same as `nvib run --demo`: packaged MiniLM as BERT2BERT on tiny docstring data."""
    run = _run(RunConfig.demo(), run_dir, n_trials, progress)
    run.all()
    _console().print(f"done: {run.dir}")


def _register_finetune() -> None:
    from nvib.finetune import finetune_cli  # a heavier import (the HF Trainer): only where the CLI runs

    app.command("finetune")(finetune_cli)


_register_finetune()

if __name__ == "__main__":
    app()
