"""Training features: examples checked, tokenised exactly as evaluation tokenises them, and right-padded into
batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nvib.workflow.data import BatchKind, Example, batches

__all__ = ["Collator", "as_examples", "pad_id", "tokenise"]


def as_examples(examples: Iterable[Example | Mapping[str, str] | Sequence[str]]) -> list[Example]:
    """Examples from `Example`s, (source, target) pairs or {"source", "target"} dicts; refuses anything else."""
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, Example):
            out.append(ex)
        elif isinstance(ex, Mapping) and "source" in ex:
            out.append(Example(ex["source"], ex.get("target")))
        elif isinstance(ex, Sequence) and not isinstance(ex, str) and 1 <= len(ex) <= 2:
            out.append(Example(*ex))
        else:
            raise ValueError(
                f"training example {i} is {type(ex).__name__}; give nvib.workflow.data.Example, (source, target) or "
                '{"source": ..., "target": ...}'
            )
    if not out:
        raise ValueError("no training examples. Fix: pass at least one example (check the data file)")
    return out


def tokenise(
    examples: Iterable[Example],
    tokenizer: Any,
    kind: BatchKind,
    max_source_len: int,
    max_target_len: int,
    *,
    lm_separator: str = "\n",
    chunk: int = 256,
) -> list[dict[str, list[int]]]:
    """One unpadded feature dict per example, tokenised exactly as `nvib.workflow.data.batches` does."""
    features: list[dict[str, list[int]]] = []
    for batch in batches(examples, tokenizer, chunk, max_source_len, max_target_len, kind, lm_separator=lm_separator):
        lengths = batch["attention_mask"].sum(1).tolist()
        for row, n in enumerate(lengths):
            item = {"input_ids": batch["input_ids"][row, :n].tolist(), "attention_mask": [1] * n}
            if "labels" in batch:
                labels = batch["labels"][row]
                if kind == "seq2seq":  # the decoder's mask, so its NV sites' KL terms skip the padding
                    real = (labels != -100).nonzero()
                    n = int(real[-1]) + 1 if len(real) else 0
                    item["decoder_attention_mask"] = [1] * n
                item["labels"] = labels[:n].tolist()
            features.append(item)
    return features


@dataclasses.dataclass
class Collator:
    """Right-pads features: input_ids with the pad id, the attention masks with 0, labels with -100."""

    pad_id: int

    def __call__(self, features: Sequence[Mapping[str, list[int]]]) -> dict[str, torch.Tensor]:
        pads = {"input_ids": self.pad_id, "attention_mask": 0, "decoder_attention_mask": 0, "labels": -100}
        out = {}
        for key in features[0]:
            width = max(len(f[key]) for f in features)
            out[key] = torch.tensor([f[key] + [pads[key]] * (width - len(f[key])) for f in features], dtype=torch.long)
        return out


def pad_id(tokenizer: Any, model: nn.Module) -> int:
    """The tokenizer's pad id, else the model's, else EOS, else 0."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if value is not None:
            return int(value)
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else 0
