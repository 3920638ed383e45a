"""`nvib prior` and `nvib prior-merge`: the empirical prior from in-domain data, and shards merged exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from nvib.cli.common import (
    EXIT_INTERRUPTED,
    KindOpt,
    ProgressOpt,
    app,
    friendly_errors,
    one_of,
    quiet_libraries,
    stderr_console,
)
from nvib.workflow.choices import MODEL_KINDS


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

    one_of("--kind", kind, MODEL_KINDS)
    shard_spec = parse_shard(shard)
    rank, world = launcher_rank()
    if world > 1:
        if shard_spec is not None:
            raise ValueError(
                f"--shard {shard} under a {world}-process launch: the launch already shards by rank. "
                "Fix: drop --shard, or run single processes with --shard i/n and `nvib prior-merge`"
            )
        shard_spec = (rank, world)
    quiet_libraries()
    console = stderr_console()
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
    stderr_console().print(f"merged {len(priors)} priors, {tokens} tokens{note} -> {written}{kept}")
