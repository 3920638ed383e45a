"""The ``nvib`` command line: prior, prior-merge, search, evaluate, run, tour and finetune.

Errors a user can fix (bad paths, malformed data or config, mismatched priors) are printed as one red
line with the fix, exit code 2, no traceback. Ctrl-C exits with 130; rerunning resumes.

``--help`` is built from the signatures alone: torch, transformers, optuna and pydantic are imported inside
the commands that run (``benchmarks/cli_speed.py`` measures it), so option defaults come from light modules.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand

from nvib.core.files import DISK_FIX, FULL
from nvib.workflow.choices import MODEL_KINDS, SCHEDULES, START_STDEV_TAU

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


def _console() -> Console:
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
            _console().print(Text(message, style="yellow"))
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as err:
            if not (isinstance(err, (ValueError, OSError, *also)) or _is_safetensor_error(err)):
                raise  # DataError, ConfigError, ... are ValueErrors
            message = _one_line(err)
            if isinstance(err, FileExistsError | NotADirectoryError) and err.filename:
                message = (
                    f"cannot make the folder {err.filename}: a file of that name (or above it) is in the way. Fix: "
                    "choose another output path (-o), or move the file away"
                )
            _console().print(Text(f"error: {message}", style="bold red"))
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper


def _is_safetensor_error(err: BaseException) -> bool:
    """A safetensors error (imported only once an error is being reported, so `--help` stays light)."""
    from safetensors import SafetensorError

    return isinstance(err, SafetensorError)


def _one_line(err: BaseException) -> str:
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


def _quiet_libraries() -> None:
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


def _one_of(option: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse (one line) a value of a closed set; `--help` shows the set as the option's metavar."""
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        raise ValueError(
            f"{option} {value!r} is not one of {', '.join(choices[:-1])} or {choices[-1]}. Fix: {option} "
            f"{close[0] if close else choices[0]}"
        )


def _with_metric(config: RunConfig, metric: str | None) -> RunConfig:
    """``config`` with search.metric replaced (validated against the task like the config key)."""
    if metric is None:
        return config
    raw = {**config.raw, "search": {**dict(config.raw.get("search") or {}), "metric": metric}}
    return dataclasses.replace(config, search=dataclasses.replace(config.search, metric=metric), raw=raw)


def _run(
    config: RunConfig,
    run_dir: Path | None,
    n_trials: int | None,
    progress: bool,
    prior: Path | None = None,
    foreign_prior: bool = False,
):
    from nvib.workflow.run import Run

    _quiet_libraries()
    run = Run(config, run_dir, console=_console(), progress=progress, n_trials=n_trials)
    if prior is not None:
        run.given_prior = prior  # read, never written
    run.allow_foreign_prior = run.allow_foreign_prior or foreign_prior
    return run


# ----------------------------------------------------------------------------------------------
# commands


@app.command("prior")
@friendly_errors
def prior_cmd(
    model: Annotated[
        Path,
        typer.Argument(
            help="A local Hugging Face model directory, or a hub id already in the local cache.", show_default=False
        ),
    ],
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
    max_source_len: Annotated[
        int | None,
        typer.Option(
            help="Truncate sources to this many tokens [default: 512, or fewer if the model's positions hold fewer].",
            min=1,
            show_default=False,
        ),
    ] = None,
    max_target_len: Annotated[
        int | None,
        typer.Option(
            help="Truncate targets to this many tokens [default: 128, or fewer if the model's positions hold fewer].",
            min=1,
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first LIMIT examples.", min=1)] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="Estimate shard i/n only: batches i, i+n, i+2n, ... (0 <= i < n). Merge the n shards with "
            "`nvib prior-merge`; use the same data, limit and batch size in every shard."
        ),
    ] = None,
    kind: KindOpt = "auto",
    gguf_file: Annotated[
        str | None, typer.Option("--gguf-file", help="A .gguf file inside MODEL to load (dequantised to float32).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the weights a bert2bert warm start initialises.")] = 0,
    progress: ProgressOpt = True,
) -> None:
    """Estimate the empirical prior of a model on in-domain data (one streaming pass, exact statistics).

    Under a multi-process launcher (`accelerate launch --num_processes N -m nvib prior ...`, or `torchrun`)
    each process estimates the batches of its rank and rank 0 writes the merged prior (exact).
    """
    from nvib.core.prior import EmpiricalPrior
    from nvib.workflow.data import load_examples
    from nvib.workflow.distributed import gather_to_rank0, launcher_rank
    from nvib.workflow.limits import Lengths, fit_lengths
    from nvib.workflow.models import load_model
    from nvib.workflow.run import describe_data, estimate_prior, parse_shard, save_prior
    from nvib.workflow.settings import ModelSection

    _one_of("--kind", kind, MODEL_KINDS)
    shard_spec = parse_shard(shard)
    rank, world = launcher_rank()
    if world > 1:
        if shard_spec is not None:
            raise ValueError(
                f"--shard {shard} under a {world}-process launch: the launch already shards by rank. "
                "Fix: drop --shard, or run single processes with --shard i/n and `nvib prior-merge`"
            )
        shard_spec = (rank, world)
    _quiet_libraries()
    console = _console()
    loaded, tokenizer = load_model(ModelSection(str(model), kind=kind, seed=seed, gguf_file=gguf_file))
    given = {k for k, v in (("source", max_source_len), ("target", max_target_len)) if v is not None}
    lengths, notes = fit_lengths(
        loaded, Lengths(max_source_len or 512, max_target_len or 128), explicit=given,
        names={"source": "--max-source-len", "target": "--max-target-len"},
    )  # fmt: skip
    for note in notes:
        console.print(Text(f"warning: {note}", style="yellow"))
    max_source_len, max_target_len = lengths.source, lengths.target
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
    written = save_prior(prior, output)
    tokens = max(s.count for s in prior.sites.values())
    if not prior.metadata.get("complete", True):
        kept = f"; {output} still holds the complete prior it held" if written != output else ""
        console.print(
            Text(f"interrupted: partial prior ({tokens} tokens, complete=False) saved to {written}{kept}", "yellow")
        )
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
    from nvib.core.prior import EmpiricalPrior
    from nvib.workflow.run import save_prior

    merged = EmpiricalPrior.merge(*(EmpiricalPrior.load(p) for p in priors))
    output.parent.mkdir(parents=True, exist_ok=True)
    written = save_prior(merged, output)
    tokens = max(s.count for s in merged.sites.values())
    note = "" if merged.metadata.get("complete", True) else " (some shards were incomplete)"
    kept = f"; {output} holds a complete prior and was left as it was" if written != output else ""
    _console().print(f"merged {len(priors)} priors, {tokens} tokens{note} -> {written}{kept}")


@app.command("search", cls=ConfigHelpCommand)
@friendly_errors
def search_cmd(
    config: ConfigArg,
    run_dir: RunDirOpt = None,
    n_trials: TrialsOpt = None,
    metric: MetricOpt = None,
    prior: PriorOpt = None,
    foreign_prior: ForeignPriorOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Tune the NV knobs on the dev set (resumes the study in RUN_DIR); writes RUN_DIR/nv_config.json."""
    from nvib.workflow.settings import RunConfig

    _run(_with_metric(RunConfig.load(config), metric), run_dir, n_trials, progress, prior, foreign_prior).search()


@app.command("evaluate", cls=ConfigHelpCommand)
@friendly_errors
def evaluate_cmd(
    config: ConfigArg,
    run_dir: RunDirOpt = None,
    knobs: Annotated[
        Path | None, typer.Option(help="NVConfig JSON of the tuned knobs (default: RUN_DIR/nv_config.json).")
    ] = None,
    prior: PriorOpt = None,
    foreign_prior: ForeignPriorOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Evaluate the unconverted model, the baselines (tuned first if needed), NV at equivalence and tuned NV on
    every test set; write the report."""
    from nvib.core.config import NVConfig
    from nvib.workflow.settings import RunConfig

    run = _run(RunConfig.load(config), run_dir, None, progress, prior, foreign_prior)
    if knobs is not None and not knobs.is_file():
        raise FileNotFoundError(f"no knobs file at {knobs}. Fix: pass the nv_config.json written by `nvib search`")
    evaluation = run.evaluate(NVConfig.load(knobs) if knobs is not None else None)
    run.report(evaluation)


@app.command("run", cls=ConfigHelpCommand)
@friendly_errors
def run_cmd(
    config: Annotated[
        Path | None,
        typer.Argument(help="Run config file (.yaml or .toml); omit with --tour.", show_default=False),
    ] = None,
    tour: Annotated[
        bool, typer.Option("--tour", help="Use the tour's embedded toy config (packaged MiniLM, see `nvib tour`).")
    ] = False,
    demo: Annotated[bool, typer.Option("--demo", hidden=True, help="Old name of --tour.")] = False,
    run_dir: RunDirOpt = None,
    n_trials: TrialsOpt = None,
    metric: MetricOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Prior -> search -> baselines -> evaluate -> report in one run directory; rerunning reuses finished stages."""
    from nvib.workflow.settings import RunConfig

    if demo:
        _console().print(Text("note: `nvib run --demo` is now `nvib run --tour`", style="yellow"))
        tour = True
    if (config is None) == (not tour):
        raise ValueError(
            "give a config file or --tour (not both). Fix: e.g. `nvib run my_run.yaml` or `nvib run --tour`"
        )
    run_config = _with_metric(RunConfig.tour() if tour else RunConfig.load(config), metric)
    run = _run(run_config, run_dir, n_trials, progress)
    run.all()
    _console().print(f"done: {run.dir}")


@app.command("schema")
def schema_cmd() -> None:
    """Print the JSON schema of run config files (for editors: YAML/TOML language servers validate with it)."""
    from nvib.workflow.settings import config_schema

    typer.echo(json.dumps(config_schema(), indent=2))


@app.command("tour")
@friendly_errors
def tour_cmd(run_dir: RunDirOpt = None, n_trials: TrialsOpt = None, progress: ProgressOpt = True) -> None:
    """A tour of the pipeline on toy data, same as `nvib run --tour` (what `make tour` runs; 2-4 minutes on two
    CPU cores): the packaged MiniLM warm-started as BERT2BERT (its decoder is untrained, so the outputs are poor:
    it shows the steps, not quality) on tiny docstring data; writes runs/tour/report.html."""
    from nvib.workflow.settings import RunConfig

    run = _run(RunConfig.tour(), run_dir, n_trials, progress)
    run.all()
    _console().print(f"done: {run.dir}")


@app.command("demo", hidden=True)
def demo_cmd(run_dir: RunDirOpt = None, n_trials: TrialsOpt = None, progress: ProgressOpt = True) -> None:
    """Old name of `nvib tour`."""
    _console().print(Text("note: `nvib demo` is now `nvib tour`", style="yellow"))
    tour_cmd(run_dir, n_trials, progress)


def _load_for_finetuning(path: Path, kind: str, seed: int):
    """(model, tokenizer, already_nv) from a local HF model directory or an NV model directory."""
    import transformers as tf

    from nvib.core.io import NV_CONFIG, load
    from nvib.workflow.models import NO_REMOTE_CODE, load_model, no_custom_code
    from nvib.workflow.settings import ModelSection

    if not path.is_dir():
        raise FileNotFoundError(f"no model directory at {path}. Fix: pass a local Hugging Face model directory")
    if (path / NV_CONFIG).is_file():
        model = load(path)
        with no_custom_code(path):
            tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True, **NO_REMOTE_CODE)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer, True
    model, tokenizer = load_model(ModelSection(str(path), kind=kind, seed=seed))
    return model, tokenizer, False


@app.command("finetune")
@friendly_errors(
    interrupted="interrupted. Rerun the same command to resume from the last checkpoint.", also=(TypeError,)
)
def finetune_cmd(
    model: Annotated[
        Path,
        typer.Argument(
            show_default=False,
            help="Local Hugging Face model directory (seq2seq, causal LM, or an encoder with --kind "
            "bert2bert), or an NV model directory written by nvib.save / an earlier `nvib finetune`.",
        ),
    ],
    train: Annotated[
        Path, typer.Argument(show_default=False, help="Training data: .jsonl/.csv/.tsv or a save_to_disk directory.")
    ],
    output_dir: Annotated[
        Path,
        typer.Option("--output-dir", "-o", help="Where the fine-tuned NV model, its tokenizer and checkpoints go."),
    ],
    source_column: Annotated[
        str | None, typer.Option(help="Source column (default: document/summary, source/target or text).")
    ] = None,
    target_column: Annotated[str | None, typer.Option(help="Target column.")] = None,
    split: Annotated[str | None, typer.Option(help="Split of a save_to_disk DatasetDict.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first LIMIT training examples.", min=1)] = None,
    kind: KindOpt = "auto",
    prior: Annotated[
        Path | None,
        typer.Option(
            help="Empirical prior (.safetensors from `nvib prior`) for the conversion; default: the unit prior."
        ),
    ] = None,
    foreign_prior: ForeignPriorOpt = False,
    knobs: Annotated[
        Path | None,
        typer.Option(
            help="NVConfig JSON (e.g. nv_config.json of `nvib search`) to initialise the NV layers with; "
            "default: the equivalence setting (step 0 is the pretrained model)."
        ),
    ] = None,
    lambda_g: Annotated[
        float | None,
        typer.Option("--lambda-g", help="Weight λ_G of the Gaussian KL [default: 0.001; 0 with --no-nv].", min=0),
    ] = None,
    lambda_d: Annotated[
        float | None,
        typer.Option("--lambda-d", help="Weight λ_D of the Dirichlet KL [default: 0.001; 0 with --no-nv].", min=0),
    ] = None,
    nv: Annotated[
        bool,
        typer.Option(
            "--nv/--no-nv",
            help="Convert to NV form and train with the KL terms, or fine-tune the plain model with the same trainer "
            "(task loss, --l2-sp, --feature-mean; saved as a plain Hugging Face model).",
        ),
    ] = True,
    l2_sp: Annotated[
        float,
        typer.Option(
            "--l2-sp",
            help="Weight α of L2-SP (Li et al. 2018): (α/2)·Σ‖w − w_start‖² over the pretrained weights, pulled "
            "towards their values at the start. Plain or NV.",
            min=0,
        ),
    ] = 0.0,
    feature_mean: Annotated[
        float,
        typer.Option(
            "--feature-mean",
            help="Weight μ of feature-mean matching: μ·Σ_sites mean_n mean_p (z − m0)²/(2 s̄0²), each attention "
            "input z pulled towards the --prior's mean (KL_G's mean term without NV). Needs --no-nv and --prior.",
            min=0,
        ),
    ] = 0.0,
    schedule: Annotated[
        str,
        typer.Option(
            metavar="[" + "|".join(SCHEDULES) + "]",
            help="λ schedule: constant; linear (warm-up from 0 over --schedule-steps); cyclic "
            "(annealing with period --schedule-steps, rising over its first half).",
        ),
    ] = "constant",
    schedule_steps: Annotated[int, typer.Option(help="Warm-up length or cyclic period, in steps.", min=0)] = 0,
    train_nv: Annotated[
        bool, typer.Option("--train-nv/--freeze-nv", help="Train the NV layers' parameters, or keep them fixed.")
    ] = True,
    train_pretrained: Annotated[
        bool,
        typer.Option(
            "--train-pretrained/--freeze-pretrained", help="Train the pretrained weights, or keep them fixed."
        ),
    ] = True,
    per_token_variance: Annotated[
        bool | None,
        typer.Option(
            "--per-token-variance/--shared-variance",
            help="Learn a variance per token (W_σ; evaluation then uses the slower general form), or keep one "
            "shared variance per site (the fast form). Default: per token when the starting knobs give the "
            "tokens a variance (some stdev_tau > 0, see --knobs); from stdev_tau = 0 training cannot grow it.",
            show_default=False,
        ),
    ] = None,
    start_stdev_tau: Annotated[
        float,
        typer.Option(
            help="With --per-token-variance: the starting τ_σ of the site kinds whose knobs give the tokens no "
            "variance (σ² = τ_σ²·s0²; the task gradient reaches W_σ scaled by σ).",
            min=0,
        ),
    ] = START_STDEV_TAU,
    kl_clip: Annotated[
        str,
        typer.Option(
            metavar="[separate|joint]",
            help="Gradient clipping: separate (the task and the KL gradients are clipped to --max-grad-norm each, "
            "so the KL terms cannot shrink the task update) or joint (the whole loss's gradient, one clip).",
        ),
    ] = "separate",
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0: none).", min=0)] = 1.0,
    max_steps: Annotated[int, typer.Option(help="Optimisation steps.", min=1)] = 1000,
    batch_size: Annotated[int, typer.Option(help="Examples per batch.", min=1)] = 8,
    grad_accum: Annotated[int, typer.Option(help="Batches accumulated per optimisation step.", min=1)] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW), > 0.")] = 5e-5,
    nv_lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate of the NV layers' parameters (default: --lr). Their log-variances start "
            "far from where they matter, so they may need a larger one.",
            min=0,
        ),
    ] = None,
    lr_scheduler: Annotated[
        str,
        typer.Option(
            help="Learning-rate schedule: a name of transformers' SchedulerType (linear, cosine, constant, ...).",
            metavar="NAME",
        ),
    ] = "linear",
    warmup_steps: Annotated[int, typer.Option(help="Learning-rate warm-up steps.", min=0)] = 0,
    seed: Annotated[int, typer.Option(help="Random seed (data order, sampling, bert2bert warm start).")] = 0,
    max_source_len: Annotated[int, typer.Option(help="Truncate sources to this many tokens.", min=1)] = 512,
    max_target_len: Annotated[int, typer.Option(help="Truncate targets to this many tokens.", min=1)] = 128,
    logging_steps: Annotated[int, typer.Option(help="Log loss, KL terms and λ every this many steps.", min=1)] = 50,
    save_steps: Annotated[int, typer.Option(help="Write a checkpoint every this many steps.", min=1)] = 500,
    resume: Annotated[
        bool,
        typer.Option("--resume/--no-resume", help="Continue from the last checkpoint in OUTPUT_DIR/checkpoints."),
    ] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar with ETA.")] = True,
) -> None:
    """Fine-tune with the NVIB regularisers: loss = task + λ_G·ΣKL_G + λ_D·ΣKL_D (+ α·L2-SP + μ·feature mean).

    A plain model is first converted with the identity initialisation (with --prior and --knobs if given), so
    step 0 is the pretrained model; with --no-nv it stays plain (no KL terms) and --prior serves --feature-mean.
    The schedule and --kl-clip apply to every regulariser. OUTPUT_DIR receives the NV model (load it with nvib.load;
    with --no-nv the plain model) and its tokenizer, finetune_args.json and finetune_log.json (loss, task loss, KL
    terms per site kind, penalties, weights).
    Checkpoints go to OUTPUT_DIR/checkpoints every --save-steps steps: rerunning the same command after an
    interruption resumes from the last one (--no-resume deletes them and starts over).
    """
    import transformers as tf

    from nvib.core.config import NVConfig
    from nvib.workflow.data import load_examples
    from nvib.workflow.train import KL_CLIPS, LambdaSchedule, finetune

    _one_of("--kind", kind, MODEL_KINDS)
    _one_of("--schedule", schedule, SCHEDULES)
    _one_of("--kl-clip", kl_clip, KL_CLIPS)
    _one_of("--lr-scheduler", lr_scheduler, tuple(s.value for s in tf.SchedulerType))
    lambda_schedule = LambdaSchedule(schedule, schedule_steps)  # type: ignore[arg-type]
    if not (train_nv or train_pretrained):
        raise ValueError("nothing to train: --freeze-nv and --freeze-pretrained together freeze everything")
    if not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr:g}. Fix: a positive learning rate such as 5e-5")
    if knobs is not None and not knobs.is_file():
        raise FileNotFoundError(f"no knobs file at {knobs}. Fix: pass an NVConfig JSON such as nv_config.json")
    if prior is not None and not prior.is_file():
        raise FileNotFoundError(f"no prior file at {prior}. Fix: estimate one with `nvib prior`")
    _quiet_libraries()
    examples = load_examples(train, source_column, target_column, split=split, limit=limit)
    loaded, tokenizer, already_nv = _load_for_finetuning(model, kind, seed)
    if already_nv and prior is not None:
        raise ValueError(f"{model} is already an NV model with its own prior. Fix: drop --prior")
    nv_config = NVConfig.load(knobs) if knobs is not None else None
    finetune(
        loaded,
        examples,
        tokenizer,
        output_dir=output_dir,
        nv_config=nv_config,
        prior=prior,
        lambda_g=lambda_g,
        lambda_d=lambda_d,
        l2sp=l2_sp,
        feature_mean=feature_mean,
        convert=nv,
        schedule=lambda_schedule,
        train_nv=train_nv,
        train_pretrained=train_pretrained,
        per_token_variance=per_token_variance,
        start_stdev_tau=start_stdev_tau,
        kl_clip=kl_clip,
        max_grad_norm=max_grad_norm,
        max_steps=max_steps,
        batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        lr=lr,
        nv_lr=nv_lr,
        lr_scheduler=lr_scheduler,
        warmup_steps=warmup_steps,
        seed=seed,
        max_source_len=max_source_len,
        max_target_len=max_target_len,
        logging_steps=logging_steps,
        save_steps=save_steps,
        resume=resume,
        progress=progress,
        allow_foreign_prior=foreign_prior,
    )
    _console().print(f"fine-tuned {'NV ' if nv else ''}model ({len(examples)} examples) -> {output_dir}")


if __name__ == "__main__":
    app()
