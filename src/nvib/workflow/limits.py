"""How long a model's inputs and outputs may be: its learned absolute position tables (GPT-2's ``wpe``, BART's and
Marian's ``embed_positions``, BERT's ``position_embeddings``) index out of range past their size, and generation must
stop within the model's context. :func:`fit_lengths` checks a run's lengths against them before the first forward
pass: a length the user set that does not fit is refused in one line naming the limit and the fix; a default that
does not fit is lowered, with a note. Rotary and relative-position models have no table and no such limit, but
generation is still capped at their configured context (``max_position_embeddings``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

from torch import nn

__all__ = ["Lengths", "LengthError", "context_length", "fit_lengths", "position_limit"]


class LengthError(ValueError):
    """An input or output length that the model's positions cannot hold."""


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Token lengths of a run: ``source`` (input) and ``target`` (scored reference) cuts, and ``new_tokens``
    (generation; None: nothing generated)."""

    source: int
    target: int
    new_tokens: int | None = None


def position_limit(model: nn.Module) -> int | None:
    """Positions of the model's smallest learned absolute position table (an ``nn.Embedding`` whose name holds
    ``pos``, less its offset, as BART's), or None if it has none (rotary, relative, ALiBi)."""
    sizes = [
        module.num_embeddings - int(getattr(module, "offset", 0))
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding) and _is_position_table(name.rsplit(".", 1)[-1].lower())
    ]
    return min(sizes) if sizes else None


def _is_position_table(name: str) -> bool:
    return name == "wpe" or ("pos" in name and "relative" not in name)


def context_length(model: nn.Module) -> int | None:
    """Positions the model can attend over: its position table's, else the config's ``max_position_embeddings``
    (``n_positions``), else None."""
    limit = position_limit(model)
    if limit is not None:
        return limit
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def fit_lengths(
    model: nn.Module,
    lengths: Lengths,
    *,
    names: Mapping[str, str],
    explicit: Collection[str] = (),
    prefix: int = 0,
) -> tuple[Lengths, list[str]]:
    """``lengths`` made to fit the model, and one note per length lowered.

    ``names``: how the user sets each of ``source``, ``target``, ``new_tokens`` (a config key or a CLI option, for
    messages); ``explicit``: those the user set (refused if they do not fit, where defaults are lowered);
    ``prefix``: tokens before the source in every decoder-only input (a few-shot prompt's prefix and template).
    An encoder-decoder's encoder holds the source and its decoder the start token and the target or the generated
    tokens; a decoder-only model holds prefix + source + target (or the generated tokens) in one sequence.
    ``new_tokens`` is always capped (with a note), never refused."""
    limit, context = position_limit(model), context_length(model)
    notes: list[str] = []
    source, target, new = lengths.source, lengths.target, lengths.new_tokens

    def lower(key: str, value: int, fit: int, what: str) -> int:
        if value <= fit:
            return value
        if key in explicit or fit < 1:
            raise LengthError(
                f"{names[key]} {value} exceeds the model's {limit} learned positions ({what}). Fix: "
                + (f"{names[key]} {fit}" if fit >= 1 else f"a shorter prompt: its prefix alone holds {prefix} tokens")
            )
        notes.append(f"{names[key]} {value} exceeds the model's {limit} learned positions ({what}): using {fit}")
        return fit

    if limit is not None and getattr(model.config, "is_encoder_decoder", False):
        source = lower("source", source, limit, "the encoder's input")
        target = lower("target", target, limit, "the decoder's input")
        room = limit - 1  # the decoder start token
    elif limit is not None:
        avail = limit - prefix
        what = "prompt prefix, source and target in one sequence" if prefix else "source and target in one sequence"
        if "source" in explicit:
            source = lower("source", source, avail - 1, what)
            target = lower("target", target, avail - source, what)
        elif "target" in explicit:
            target = lower("target", target, avail - 1, what)
            source = lower("source", source, avail - target, what)
        elif source + target > avail:  # both defaults: the target keeps up to a quarter of the room
            source = lower("source", source, avail - min(target, max(avail // 4, 1)), what)
            target = lower("target", target, avail - source, what)
        room = avail - source
    else:
        room = context
    if new is not None and room is not None and new > room:
        notes.append(
            f"{names['new_tokens']} {new} exceeds what the model's context of {context} positions holds after the "
            f"input: generating at most {room} tokens"
        )
        new = room
    return Lengths(source, target, new), notes
