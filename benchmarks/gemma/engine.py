"""Target NLL and greedy generation for a causal LM behind one shared prompt prefix.

The prefix (the demonstrations) is run once per model setting; each batch gets a copy of its KV cache,
expanded to the batch size. Rows hold `suffix + target` right-padded, with explicit position ids, so every
real token sees exactly the keys and positions it sees in the unshared prompt (checked by `check_sharing`).
The LM head runs only on the scored rows, in chunks (the vocabulary is 262k, spec §9).
The NV model's cache holds ordinary keys and values (spec §10), so the same code serves it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import transformers as tf
from prompts import Encoded

LM_HEAD_CHUNK = 256  # rows of logits materialised at once


@dataclass(frozen=True)
class Scored:
    """Summed target NLL (nats) and the number of target tokens of one example."""

    nll: float
    n: int


def _pad(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to [B, T] ids and a [B, T] 0/1 mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _by_length(items: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Index batches of similar suffix+target length (less padding); longest first."""
    order = sorted(range(len(items)), key=lambda i: -(len(items[i].suffix) + len(items[i].target)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class PrefixRunner:
    """Scores and generates examples after one fixed prefix of token ids, with the prefix's KV cache shared."""

    def __init__(
        self,
        model: tf.PreTrainedModel,
        tokenizer: tf.PreTrainedTokenizerBase,
        prefix: list[int],
        stop: list[bool] | None = None,
    ):
        self.model, self.prefix = model, prefix
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stop = stop if stop is not None else stop_tokens(tokenizer, model.config.vocab_size)
        self.tokenizer = tokenizer
        self._cache: tf.Cache | None = None

    def reset(self) -> None:
        """Forget the prefix cache (call after the model's knobs change)."""
        self._cache = None

    def _prefix_cache(self, batch: int) -> tf.Cache:
        if self._cache is None:
            cache = tf.DynamicCache(config=self.model.config)
            ids = torch.tensor([self.prefix])
            self.model.model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True)
            self._cache = cache
        cache = copy.deepcopy(self._cache)
        cache.batch_repeat_interleave(batch)
        return cache

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, D] final hidden states -> [R, V] logits (the model's own head and soft-capping)."""
        logits = self.model.lm_head(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _target_nll(self, hidden: torch.Tensor, ids: torch.Tensor, starts: list[int], lengths: list[int]) -> list:
        """Per row: summed NLL of ids[r, s:s+n] predicted from hidden[r, s-1:s+n-1]."""
        rows = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths)])
        cols = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        h, tgt = hidden[rows, cols - 1], ids[rows, cols]
        nll = torch.cat(
            [
                torch.nn.functional.cross_entropy(self._logits(h[i : i + LM_HEAD_CHUNK]), tgt[i : i + LM_HEAD_CHUNK],
                                                  reduction="none")
                for i in range(0, len(h), LM_HEAD_CHUNK)
            ]
        )  # fmt: skip
        sums = torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, rows, nll.double())
        return [Scored(float(s), n) for s, n in zip(sums, lengths, strict=True)]

    @torch.inference_mode()
    def nll(self, items: Sequence[Encoded], batch_size: int = 16) -> list[Scored]:
        """Teacher-forced target NLL of each example, prefix shared."""
        out: list[Scored | None] = [None] * len(items)
        p = len(self.prefix)
        for idx in _by_length(items, batch_size):
            ids, mask = _pad([items[i].suffix + items[i].target for i in idx], self.pad)
            full_mask = torch.cat([torch.ones(len(idx), p, dtype=torch.long), mask], dim=1)
            pos = (p + torch.arange(ids.shape[1])).expand(len(idx), -1)
            hidden = self.model.model(
                input_ids=ids, attention_mask=full_mask, position_ids=pos, cache=self._prefix_cache(len(idx)),
                use_cache=True,
            ).last_hidden_state  # fmt: skip
            starts, lengths = [len(items[i].suffix) for i in idx], [len(items[i].target) for i in idx]
            scored = self._target_nll(hidden, ids, starts, lengths)
            for i, s in zip(idx, scored, strict=True):
                out[i] = s
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def nll_unshared(self, items: Sequence[Encoded]) -> list[Scored]:
        """The same NLL with the whole prompt in one forward per example (the reference for `check_sharing`)."""
        out = []
        for e in items:
            ids = torch.tensor([self.prefix + e.suffix + e.target])
            hidden = self.model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            out += self._target_nll(hidden, ids, [len(self.prefix) + len(e.suffix)], [len(e.target)])
        return out

    @torch.inference_mode()
    def evaluate(
        self, items: Sequence[Encoded], max_new_tokens: int = 24, batch_size: int = 16
    ) -> tuple[list[Scored], list[str]]:
        """Target NLL and greedy prediction of each example, from one forward over the suffixes.

        The suffix cache is copied: the targets are teacher-forced on one copy, greedy decoding continues on
        the other, stopped at the first token holding a newline (or EOS); the prediction is the text before
        the newline, stripped. Rows that finished leave the batch.
        """
        scored: list[Scored | None] = [None] * len(items)
        preds: list[str | None] = [None] * len(items)
        p = len(self.prefix)
        for idx in _by_length(items, batch_size):
            ids, mask = _pad([items[i].suffix for i in idx], self.pad)
            lengths = mask.sum(1)
            cache = self._prefix_cache(len(idx))
            mask = torch.cat([torch.ones(len(idx), p, dtype=torch.long), mask], dim=1)
            pos = (p + torch.arange(ids.shape[1])).expand(len(idx), -1)
            hidden = self.model.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True
            ).last_hidden_state
            last = hidden[torch.arange(len(idx)), lengths - 1]  # [B, D]: predicts the first target token
            pos = (p + lengths).unsqueeze(1)  # [B, 1]: position of the next token

            tgt, tmask = _pad([items[i].target for i in idx], self.pad)
            th = self.model.model(
                input_ids=tgt, attention_mask=torch.cat([mask, tmask], dim=1), cache=copy.deepcopy(cache),
                position_ids=pos + torch.arange(tgt.shape[1]), use_cache=True,
            ).last_hidden_state  # fmt: skip
            both = torch.cat([last.unsqueeze(1), th], dim=1)  # hidden[:, j] predicts target token j
            rows = torch.cat([torch.full((len(idx), 1), self.pad), tgt], dim=1)
            for i, s in zip(idx, self._target_nll(both, rows, [1] * len(idx), tmask.sum(1).tolist()), strict=True):
                scored[i] = s

            active = list(idx)
            generated: dict[int, list[int]] = {i: [] for i in idx}
            for step in range(max_new_tokens):
                token = self._logits(last).argmax(-1)
                keep = []
                for j, (i, t) in enumerate(zip(active, token.tolist(), strict=True)):
                    generated[i].append(t)
                    if not self.stop[t]:
                        keep.append(j)
                if not keep or step == max_new_tokens - 1:
                    break
                if len(keep) < len(active):
                    sel = torch.tensor(keep)
                    cache.batch_select_indices(sel)
                    active, token, mask, pos = [active[j] for j in keep], token[sel], mask[sel], pos[sel]
                mask = torch.cat([mask, torch.ones(len(active), 1, dtype=torch.long)], dim=1)
                last = self.model.model(
                    input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=pos, cache=cache, use_cache=True
                ).last_hidden_state[:, -1]
                pos = pos + 1
            for i in idx:
                preds[i] = self.tokenizer.decode(generated[i], skip_special_tokens=True).split("\n")[0].strip()
        return scored, preds  # type: ignore[return-value]


def stop_tokens(tokenizer: tf.PreTrainedTokenizerBase, vocab_size: int) -> list[bool]:
    """[V] flags: the token's text holds a newline (or it is EOS)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    flags = [False] * vocab_size
    for i, piece in enumerate(pieces[:vocab_size]):
        flags[i] = piece is not None and ("\n" in piece or piece == "<0x0A>")
    if tokenizer.eos_token_id is not None:
        flags[tokenizer.eos_token_id] = True
    return flags


def check_sharing(runner: PrefixRunner, items: Sequence[Encoded], tol: float = 1e-4, max_new_tokens: int = 24) -> dict:
    """Prefix-shared vs unshared on `items`: max per-token NLL gap of `nll` and of `evaluate`, and whether the
    greedy predictions are identical. Raises if a gap exceeds `tol` or a prediction differs."""
    alone = runner.nll_unshared(items)
    shared = runner.nll(items, batch_size=len(items))
    scored, preds = runner.evaluate(items, max_new_tokens, batch_size=len(items))
    reference = [greedy_unshared(runner, e, max_new_tokens) for e in items]

    def gap(xs: list[Scored]) -> float:
        return max(abs(a.nll - b.nll) / a.n for a, b in zip(xs, alone, strict=True))

    result = {"nll_gap": gap(shared), "evaluate_nll_gap": gap(scored), "greedy_identical": preds == reference}
    if max(result["nll_gap"], result["evaluate_nll_gap"]) > tol or not result["greedy_identical"]:
        raise RuntimeError(f"prefix sharing changes the results: {result} (tolerance {tol:g} nats per token)")
    return result


@torch.inference_mode()
def greedy_unshared(runner: PrefixRunner, item: Encoded, max_new_tokens: int = 24) -> str:
    """The greedy prediction of `PrefixRunner.evaluate` for one example, without a shared prefix or padding."""
    model, cache = runner.model, tf.DynamicCache(config=runner.model.config)
    ids, generated = torch.tensor([runner.prefix + item.suffix]), []
    for _ in range(max_new_tokens):
        hidden = model.model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state[:, -1]
        token = int(runner._logits(hidden).argmax(-1))
        generated.append(token)
        if runner.stop[token]:
            break
        ids = torch.tensor([[token]])
    return runner.tokenizer.decode(generated, skip_special_tokens=True).split("\n")[0].strip()
