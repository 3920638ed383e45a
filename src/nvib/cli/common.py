"""What every ``nvib`` command shares: the typer app, one-line errors, the shared options and the run helper.

Errors a user can fix (bad paths, malformed data or config, mismatched priors) are printed as one red
line with the fix, exit code 2, no traceback. Ctrl-C exits with 130; rerunning resumes.

``--help`` is built from the signatures alone: torch, transformers, optuna and pydantic are imported inside
the commands that run (``benchmarks/cli_speed.py`` measures it), so option defaults come from light modules.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand

from nvib.core.files import DISK_FIX, FULL
from nvib.workflow.choices import MODEL_KINDS

if TYPE_CHECKING:
    from nvib.workflow.settings import RunConfig

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


def stderr_console() -> Console:
    return Console(stderr=True, soft_wrap=True)


def friendly_errors(fn=None, *, interrupted: str | None = None, also: tuple[type[Exception], ...] = ()):
    """Turn the errors a user can fix into one red line and exit code 2; Ctrl-C prints how to resume (or
    `interrupted`) and exits 130. `also`: more exception types a command's user can fix."""
    if fn is None:
        return functools.partial(friendly_errors, interrupted=interrupted, also=also)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as err:
            message = interrupted or str(err) or "interrupted. Rerun the same command to resume."
            stderr_console().print(Text(message, style="yellow"))
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as err:
            if not (isinstance(err, (ValueError, OSError, *also)) or _is_safetensor_error(err)):
                raise  # DataError, ConfigError, ... are ValueErrors
            message = one_line(err)
            if isinstance(err, FileExistsError | NotADirectoryError) and err.filename:
                message = (
                    f"cannot make the folder {err.filename}: a file of that name (or above it) is in the way. Fix: "
                    "choose another output path (-o), or move the file away"
                )
            stderr_console().print(Text(f"error: {message}", style="bold red"))
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper


def _is_safetensor_error(err: BaseException) -> bool:
    """A safetensors error (imported only once an error is being reported, so `--help` stays light)."""
    from safetensors import SafetensorError

    return isinstance(err, SafetensorError)


def one_line(err: BaseException) -> str:
    """The error's message on one line; a full disk (here or in a file transformers writes) says how to go on."""
    message = " ".join(str(err).split()) or type(err).__name__
    if _is_safetensor_error(err):  # transformers' own weight files: a full disk while saving, a damaged file
        message = f"safetensors: {message}"
    full = getattr(err, "errno", None) in FULL or any(f"os error {code})" in message for code in FULL)
    return f"{message}. {DISK_FIX}" if full and "Fix:" not in message else message


_LOGGING = {"verbose": False}  # `nvib --verbose`, set by `main`


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the log messages of transformers and optuna.")
    ] = False,
) -> None:
    """Nonparametric Variational (NV) regularisation of pretrained transformers."""
    # this runs before a command parses its --help: the commands that load the libraries quiet them
    _LOGGING["verbose"] = verbose
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


def quiet_libraries() -> None:
    """Silence transformers' and optuna's log messages and progress bars, unless ``nvib --verbose``."""
    if _LOGGING["verbose"]:
        return
    import optuna
    import transformers as tf

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a Ctrl-C would log a failed trial with a traceback
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()


# ----------------------------------------------------------------------------------------------
# shared options

CONFIG_HELP = (
    "\b\nRun config keys (YAML or TOML; paths relative to the config file, package:NAME/sub = a path inside "
    "an installed package; `nvib tour` runs demo_data/demo.yaml of the nvib package, a commented example; "
    "`nvib schema` prints the JSON schema):\n"
)


class ConfigHelpCommand(TyperCommand):
    """A command whose --help ends with the run config's keys, read from the schema only when help is shown."""

    def format_epilog(self, ctx, formatter) -> None:
        from nvib.workflow.settings import describe_schema

        self.epilog = CONFIG_HELP + describe_schema()
        super().format_epilog(ctx, formatter)


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
ForeignPriorOpt = Annotated[
    bool,
    typer.Option(
        "--foreign-prior",
        help="Use a prior estimated on other weights than the model's (refused otherwise), with a warning.",
    ),
]
KindOpt = Annotated[
    str,
    typer.Option(
        help="Model kind: auto, seq2seq, causal_lm or bert2bert (warm-start from an encoder).",
        metavar="[" + "|".join(MODEL_KINDS) + "]",
    ),
]


def one_of(option: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse (one line) a value of a closed set; `--help` shows the set as the option's metavar."""
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        raise ValueError(
            f"{option} {value!r} is not one of {', '.join(choices[:-1])} or {choices[-1]}. Fix: {option} "
            f"{close[0] if close else choices[0]}"
        )


def with_metric(config: RunConfig, metric: str | None) -> RunConfig:
    """``config`` with search.metric replaced (validated against the task like the config key)."""
    if metric is None:
        return config
    raw = {**config.raw, "search": {**dict(config.raw.get("search") or {}), "metric": metric}}
    return dataclasses.replace(config, search=dataclasses.replace(config.search, metric=metric), raw=raw)


def open_run(
    config: RunConfig,
    run_dir: Path | None,
    n_trials: int | None,
    progress: bool,
    prior: Path | None = None,
    foreign_prior: bool = False,
):
    from nvib.workflow.run import Run

    quiet_libraries()
    run = Run(config, run_dir, console=stderr_console(), progress=progress, n_trials=n_trials)
    if prior is not None:
        run.given_prior = prior  # read, never written
    run.allow_foreign_prior = run.allow_foreign_prior or foreign_prior
    return run
