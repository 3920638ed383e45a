"""Few-shot prompts for causal LMs: a template, a shared prefix (literal text and/or demonstrations), and the
engine that scores and generates behind that prefix with its KV cache computed once.

A template such as ``"Text: {source}\\nSummary: {target}"`` is cut at its placeholders into literal pieces; each
piece and each text is tokenised on its own and the ids are concatenated, and the whitespace just before a
placeholder goes with the text (``" " + source``), as a word-piece tokeniser joins it to the next word. So an
example's ids are the same in the shared and the unshared prompt, and only the target tokens are scored
(docs/method.md §9). The prefix is ``[BOS] + prefix text + (demonstration + separator) × k``.

:class:`SharedPrefix` runs the prefix once per model setting (call :meth:`SharedPrefix.reset` after the knobs
change) and gives each batch a copy of its cache, expanded to the batch size. Rows hold ``suffix + target``
right-padded, with explicit position ids, so every real token sees exactly the keys and positions it sees in the
unshared prompt; :func:`check_sharing` measures that. The NV model's cache holds ordinary keys and values
(docs/method.md §10), so the same code serves it. A sliding-window cache counts slots, padding included, so a batch
whose longest padded row passes the window is refused.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nvib.core import caching
from nvib.core.prior import EmpiricalPrior
from nvib.workflow.data import Example, pad_and_mask, pad_id

__all__ = [
    "Encoded", "FewShotPrompt", "Scored", "SharedPrefix", "SharingError", "Template", "check_sharing",
    "describe_sharing", "draw_demonstrations", "prompt_prior",
]  # fmt: skip

LM_HEAD_CHUNK = 256  # rows of logits materialised at once (a 262k vocabulary, docs/method.md §9)


class SharingError(ValueError):
    """The shared prefix changed an NLL or a greedy output (:func:`check_sharing`)."""


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example after the shared prefix: the input ``suffix`` and the ``target`` to score."""

    suffix: list[int]
    target: list[int]


@dataclass(frozen=True)
class Template:
    """``"... {source} ... {target}"``: literal pieces around the two placeholders; ``{target}`` ends it."""

    before: str  # literal text before the source
    source_space: str  # whitespace that goes with the source text
    between: str  # literal text between source and target
    target_space: str

    @classmethod
    def parse(cls, text: str) -> Template:
        names = re.findall(r"{(\w*)}", text)
        if names != ["source", "target"] or not text.endswith("{target}"):
            raise ValueError(
                f"prompt template {text!r} must hold {{source}} once, then {{target}} once at its end "
                "(e.g. 'Text: {source}\\nSummary: {target}')"
            )
        before, rest = text.split("{source}")
        between = rest[: -len("{target}")]
        b, bs = _split_space(before)
        m, ms = _split_space(between)
        return cls(b, bs, m, ms)


def _split_space(piece: str) -> tuple[str, str]:
    """(piece without its trailing blanks, the trailing blanks); newlines stay literal."""
    stripped = piece.rstrip(" \t")
    return stripped, piece[len(stripped) :]


class FewShotPrompt:
    """Turns examples into :class:`Encoded` ids and builds the shared prefix, for one tokenizer.

    ``max_source_tokens`` / ``max_target_tokens`` cut the texts' ids; ``stop``: generation ends at the first
    token that completes this string (or at EOS), and the prediction is the text before it, stripped.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str = "{source}\n{target}",
        *,
        prefix: str = "",
        demonstrations: Sequence[Example] = (),
        separator: str = "\n\n",
        stop: str | None = "\n",
        bos: bool = True,
        max_source_tokens: int = 512,
        max_target_tokens: int = 128,
    ):
        self.tokenizer, self.template = tokenizer, Template.parse(template)
        self.stop, self.separator = stop or None, separator
        self.max_source_tokens, self.max_target_tokens = max_source_tokens, max_target_tokens
        self.demonstrations = list(demonstrations)
        ids = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
        ids += self._ids(prefix)
        for demo in self.demonstrations:
            if demo.target is None:
                raise ValueError(f"demonstration {demo.source[:40]!r}... has no target text")
            e = self.encode(demo)
            ids += e.suffix + e.target + self._ids(separator)
        self.prefix = ids

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def encode(self, example: Example) -> Encoded:
        """The suffix (template pieces around the source, cut to max_source_tokens) and the target."""
        t = self.template
        source = self._ids(t.source_space + example.source)[: self.max_source_tokens]
        target = self._ids(t.target_space + (example.target or ""))[: self.max_target_tokens]
        return Encoded(self._ids(t.before) + source + self._ids(t.between), target)

    def prediction(self, ids: Sequence[int]) -> str:
        """Generated ids -> the prediction: the text before the stop string, stripped."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return (text.split(self.stop)[0] if self.stop else text).strip()

    def stopped(self, ids: Sequence[int], eos: set[int]) -> bool:
        """Whether generation ends after ``ids``: the last is EOS, or the text now holds the stop string."""
        if ids[-1] in eos:
            return True
        return self.stop is not None and self.stop in self.tokenizer.decode(list(ids), skip_special_tokens=True)


def draw_demonstrations(
    pool: Sequence[Example], k: int, seed: int, source_words: tuple[int, int] | None = None
) -> list[Example]:
    """``k`` demonstrations drawn with ``seed`` (``random.Random(seed).sample``) among the pool's examples with a
    target, and with ``source_words`` = (low, high) source words when given."""
    fit = [e for e in pool if e.target is not None]
    if source_words is not None:
        low, high = source_words
        fit = [e for e in fit if low <= len(e.source.split()) <= high]
    if len(fit) < k:
        words = f" with {source_words[0]}-{source_words[1]} source words" if source_words else ""
        raise ValueError(
            f"only {len(fit)} examples with a target{words} to draw {k} demonstrations from. "
            "Fix: lower prompt.demonstrations.k, widen source_words, or give more data"
        )
    return random.Random(seed).sample(fit, k)


# ----------------------------------------------------------------------------------------------
# the engine


def _by_length(items: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Index batches of similar suffix+target length (less padding); longest first."""
    order = sorted(range(len(items)), key=lambda i: -(len(items[i].suffix) + len(items[i].target)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class Scored:
    """Summed target NLL (nats) and the number of target tokens of one example."""

    nll: float
    n: int


class SharedPrefix:
    """Target NLL and greedy generation of encoded examples after one prompt's prefix, its KV cache shared.

    ``model``: a decoder-only LM (``base_model`` + output embeddings, as transformers' ``*ForCausalLM``).
    ``on_batch(n)`` is called after each batch of n examples (progress bars).
    """

    def __init__(self, model: nn.Module, prompt: FewShotPrompt, on_batch: Callable[[int], None] | None = None):
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("a few-shot prompt is for decoder-only models. Fix: drop the prompt section")
        self.model, self.prompt, self.on_batch = model, prompt, on_batch
        tok = prompt.tokenizer
        self.pad = pad_id(tok)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = tok.eos_token_id if eos is None else eos
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._cache_kwarg = caching.cache_kwarg(model.base_model.forward)
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.window = getattr(text, "sliding_window", None) or None
        self._cache: Any = None

    def reset(self) -> None:
        """Forget the prefix cache (after the model's knobs or weights change)."""
        self._cache = None

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor | None, cache: Any
    ) -> torch.Tensor:
        """Last hidden states [B, T, D] of the base model, extending ``cache`` in place (mask None: no padding)."""
        device = next(self.model.parameters()).device
        out = self.model.base_model(
            input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device),
            position_ids=None if pos is None else pos.to(device), use_cache=True, **{self._cache_kwarg: cache},
        )  # fmt: skip
        return out.last_hidden_state

    def _prefix_cache(self, batch: int) -> Any:
        if not self.prompt.prefix:
            return caching.new_cache(self.model)
        if self._cache is None:
            cache = caching.new_cache(self.model)
            self._forward(torch.tensor([self.prompt.prefix]), None, None, cache)
            self._cache = cache
        return caching.expanded(self._cache, batch)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, D] final hidden states -> [R, V] logits (the model's own head and soft-capping)."""
        logits = self.model.get_output_embeddings()(hidden)
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def _target_nll(self, hidden: torch.Tensor, ids: torch.Tensor, starts: list[int], lengths: list[int]) -> list:
        """Per row: summed NLL of ids[r, s:s+n] predicted from hidden[r, s-1:s+n-1] (float64 log-softmax)."""
        if not any(lengths):
            return [Scored(0.0, 0) for _ in lengths]
        rows = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths)])
        cols = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        h, tgt = hidden[rows, cols - 1], ids[rows, cols].to(hidden.device)
        nll = torch.cat([
            nn.functional.cross_entropy(self._logits(h[i : i + LM_HEAD_CHUNK]).double(), tgt[i : i + LM_HEAD_CHUNK],
                                        reduction="none")
            for i in range(0, len(h), LM_HEAD_CHUNK)
        ]).cpu()  # fmt: skip
        sums = torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, rows, nll)
        return [Scored(float(s), n) for s, n in zip(sums, lengths, strict=True)]

    def check_window(self, items: Sequence[Encoded], new_tokens: int) -> None:
        """A sliding window counts cache slots: the longest padded row must fit for sharing to be exact."""
        if self.window is None or not items:
            return
        longest = len(self.prompt.prefix) + max(len(e.suffix) for e in items)
        longest += max(new_tokens, *(len(e.target) for e in items))
        if longest > self.window:
            raise ValueError(
                f"a prompt reaches {longest} tokens (prefix {len(self.prompt.prefix)}), beyond the model's sliding "
                f"window ({self.window}). Fix: lower data.max_source_len or generation.max_new_tokens, or use fewer "
                "demonstrations"
            )

    @torch.inference_mode()
    def nll(self, items: Sequence[Encoded], batch_size: int = 16) -> list[Scored]:
        """Teacher-forced target NLL of each example, the prefix shared."""
        self.check_window(items, 0)
        out: list[Scored | None] = [None] * len(items)
        p = len(self.prompt.prefix)
        for idx in _by_length(items, batch_size):
            ids, mask = pad_and_mask([items[i].suffix + items[i].target for i in idx], self.pad)
            full = torch.cat([torch.ones(len(idx), p, dtype=torch.long), mask], dim=1)
            pos = (p + torch.arange(ids.shape[1])).expand(len(idx), -1)
            hidden = self._forward(ids, full, pos, self._prefix_cache(len(idx)))
            starts, lengths = [len(items[i].suffix) for i in idx], [len(items[i].target) for i in idx]
            for i, s in zip(idx, self._target_nll(hidden, ids, starts, lengths), strict=True):
                out[i] = s
            if self.on_batch is not None:
                self.on_batch(len(idx))
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def evaluate(
        self, items: Sequence[Encoded], max_new_tokens: int, batch_size: int = 16, *, score: bool = True
    ) -> tuple[list[Scored] | None, list[list[int]]]:
        """Target NLL (``score``) and greedy generated ids of each example, from one forward over the suffixes.

        The suffix cache is copied: the targets are teacher-forced on the copy, greedy decoding continues on the
        original and a row leaves the batch when it stops (:meth:`FewShotPrompt.stopped`).
        """
        self.check_window(items, max_new_tokens)
        scored: list[Scored | None] = [None] * len(items)
        generated: list[list[int]] = [[] for _ in items]
        p = len(self.prompt.prefix)
        for idx in _by_length(items, batch_size):
            ids, mask = pad_and_mask([items[i].suffix for i in idx], self.pad)
            lengths = mask.sum(1)
            cache = self._prefix_cache(len(idx))
            mask = torch.cat([torch.ones(len(idx), p, dtype=torch.long), mask], dim=1)
            pos = (p + torch.arange(ids.shape[1])).expand(len(idx), -1)
            hidden = self._forward(ids, mask, pos, cache)
            last = hidden[torch.arange(len(idx)), lengths.to(hidden.device) - 1]  # [B, D]: predicts target token 0
            pos = (p + lengths).unsqueeze(1)  # [B, 1]: position of the next token
            if score:
                tgt, tmask = pad_and_mask([items[i].target or [self.pad] for i in idx], self.pad)
                th = self._forward(tgt, torch.cat([mask, tmask], 1), pos + torch.arange(tgt.shape[1]),
                                   copy.deepcopy(cache))  # fmt: skip
                both = torch.cat([last.unsqueeze(1), th], dim=1)  # both[:, j] predicts target token j
                rows = torch.cat([torch.full((len(idx), 1), self.pad), tgt], dim=1)
                lens = [len(items[i].target) for i in idx]
                for i, s in zip(idx, self._target_nll(both, rows, [1] * len(idx), lens), strict=True):
                    scored[i] = s
            active = list(idx)
            for step in range(max_new_tokens):
                token = self._logits(last).argmax(-1).cpu()
                keep = []
                for j, (i, t) in enumerate(zip(active, token.tolist(), strict=True)):
                    generated[i].append(t)
                    if not self.prompt.stopped(generated[i], self.eos):
                        keep.append(j)
                if not keep or step == max_new_tokens - 1:
                    break
                if len(keep) < len(active):
                    sel = torch.tensor(keep)
                    cache.batch_select_indices(sel.to(last.device))
                    active, token, mask, pos = [active[j] for j in keep], token[sel], mask[sel], pos[sel]
                mask = torch.cat([mask, torch.ones(len(active), 1, dtype=torch.long)], dim=1)
                last = self._forward(token.unsqueeze(1), mask, pos, cache)[:, -1]
                pos = pos + 1
            if self.on_batch is not None:
                self.on_batch(len(idx))
        return (scored if score else None), generated  # type: ignore[return-value]

    @torch.inference_mode()
    def unshared(self, item: Encoded, max_new_tokens: int) -> tuple[Scored, list[int]]:
        """The reference for :func:`check_sharing`: the whole prompt in one row, no padding, nothing shared."""
        ids = torch.tensor([self.prompt.prefix + item.suffix + item.target])
        hidden = self._forward(ids, None, None, caching.new_cache(self.model))
        (scored,) = self._target_nll(hidden, ids, [len(self.prompt.prefix) + len(item.suffix)], [len(item.target)])
        cache, generated = caching.new_cache(self.model), []
        ids = torch.tensor([self.prompt.prefix + item.suffix])
        for _ in range(max_new_tokens):
            token = int(self._logits(self._forward(ids, None, None, cache)[:, -1]).argmax(-1))
            generated.append(token)
            if self.prompt.stopped(generated, self.eos):
                break
            ids = torch.tensor([[token]])
        return scored, generated


def check_sharing(
    engine: SharedPrefix, items: Sequence[Encoded], max_new_tokens: int, tol: float = 1e-4
) -> dict[str, Any]:
    """Prefix-shared against unshared on ``items`` (batched together, so rows are padded): the largest per-token
    NLL gap of :meth:`SharedPrefix.nll` and of :meth:`SharedPrefix.evaluate`, and whether the greedy outputs are
    identical. Raises :class:`SharingError` if a gap exceeds ``tol`` nats per token or an output differs."""
    engine.reset()
    alone = [engine.unshared(e, max_new_tokens) for e in items]
    shared = engine.nll(items, batch_size=len(items))
    scored, generated = engine.evaluate(items, max_new_tokens, batch_size=len(items))

    def gap(xs: Sequence[Scored]) -> float:
        return max(abs(a.nll - b[0].nll) / max(b[0].n, 1) for a, b in zip(xs, alone, strict=True))

    result = {
        "nll_gap": gap(shared),
        "evaluate_nll_gap": gap(scored),  # type: ignore[arg-type]
        "greedy_identical": generated == [g for _, g in alone],
    }
    if max(result["nll_gap"], result["evaluate_nll_gap"]) > tol or not result["greedy_identical"]:
        raise SharingError(
            f"the shared prompt prefix changes the results: {describe_sharing(result)} (tolerance {tol:g} nats per "
            "token). Fix: report this with the model's type; meanwhile run without a prompt section"
        )
    return result


def describe_sharing(result: Mapping[str, Any]) -> str:
    """:func:`check_sharing`'s result in words: how close the shared prefix's NLL is to the unshared one, and
    whether the greedy outputs are the same."""
    gap = max(result["nll_gap"], result["evaluate_nll_gap"])
    outputs = "identical" if result["greedy_identical"] else "DIFFERENT"
    return f"the shared prefix gives the unshared NLL to {gap:.1e} nats per target token, greedy outputs {outputs}"


def prompt_prior(
    model: nn.Module, prompt: FewShotPrompt, examples: Sequence[Example], batch_size: int, **estimate: Any
) -> EmpiricalPrior:
    """The empirical prior of the in-domain prompts as the prompt uses them: ``EmpiricalPrior.estimate`` (its keyword
    arguments in ``estimate``) over batches of suffix + target, right-padded, the prefix's cache shared and its tokens
    counted once per row."""
    pad = pad_id(prompt.tokenizer)

    def rows():
        for start in range(0, len(examples), batch_size):
            encoded = [prompt.encode(e) for e in examples[start : start + batch_size]]
            ids, mask = pad_and_mask([e.suffix + e.target for e in encoded], pad)
            yield {"input_ids": ids, "attention_mask": mask}

    return EmpiricalPrior.estimate(model, rows(), prefix=prompt.prefix, **estimate)
