"""Few-shot prompts as token ids: a shared demonstration prefix, and per example an input suffix and a target.

    <bos>Text: {demo 1}\nSummary: {summary 1}\n\n ... Text: {demo 3}\nSummary: {summary 3}\n\n   (prefix)
    Text: {input, at most max_input_tokens tokens}\nSummary:                                        (suffix)
     {summary}                                                                                      (target)

The pieces are tokenised separately and concatenated, so the prefix-shared and the unshared forms of an
example see exactly the same token ids. Only the target tokens are scored (spec §9).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import transformers as tf

#: Demonstrations are drawn among train pairs of this many document words (keeps the prefix short).
DEMO_WORDS = (15, 40)


@dataclass(frozen=True)
class Pair:
    """One (document, summary) pair of the benchmark data."""

    id: str
    document: str
    summary: str


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example: the suffix after the shared prefix, and the target to score."""

    suffix: list[int]
    target: list[int]
    reference: str


def read_pairs(path: Path, limit: int | None = None) -> list[Pair]:
    """The first `limit` pairs of one split file (`{"id", "document", "summary"}` per line)."""
    pairs = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            pairs.append(Pair(row["id"], row["document"], row["summary"]))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


def pick_demos(pool: list[Pair], k: int, seed: int) -> list[Pair]:
    """`k` demonstrations drawn with `seed` among pairs whose document has DEMO_WORDS words."""
    low, high = DEMO_WORDS
    fit = [p for p in pool if low <= len(p.document.split()) <= high]
    if len(fit) < k:
        raise ValueError(f"only {len(fit)} pairs with {low}-{high} document words; need {k} demonstrations")
    return random.Random(seed).sample(fit, k)


class PromptBuilder:
    """Turns demonstrations and pairs into token ids for one tokenizer."""

    def __init__(self, tokenizer: tf.PreTrainedTokenizerBase, max_input_tokens: int = 128):
        self.tokenizer, self.max_input_tokens = tokenizer, max_input_tokens

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prefix(self, demos: list[Pair]) -> list[int]:
        """<bos> and the demonstrations, each ending with a blank line."""
        ids = [self.tokenizer.bos_token_id]
        for d in demos:
            e = self.encode(d)
            ids += e.suffix + e.target + self._ids("\n\n")
        return ids

    def encode(self, pair: Pair) -> Encoded:
        """The suffix (input cut to max_input_tokens) and the target (the summary after "Summary:")."""
        document = self._ids(" " + pair.document)[: self.max_input_tokens]
        suffix = self._ids("Text:") + document + self._ids("\nSummary:")
        return Encoded(suffix, self._ids(" " + pair.summary), pair.summary)
