"""The estimation pass (docs/method.md §7, "What is read"): hooks on every site of a pretrained model collect
`SiteStats` of its real tokens while the batches (and a shared prefix's KV cache) stream through it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nvib.core import caching, keyspace
from nvib.core.architectures import LANGUAGE_MODELS, Site, find_sites
from nvib.core.config import NVConfig
from nvib.core.layer import is_converted, set_knobs
from nvib.core.prior_provenance import EXAMPLE_SKETCH, batch_digest, example_hashes
from nvib.core.site_stats import SiteStats


class _NoBar:
    """What `estimate` asks of a progress bar, doing nothing (no rich import without a bar)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        return None


def _progress_bar(progress: bool):
    if not progress:
        return _NoBar()
    # imported here: `import nvib` needs only torch, transformers and safetensors (issue 25)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("prior"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[tokens]} tokens"),
    )  # fmt: skip


def valid_mask(kind: str, batch: Mapping[str, torch.Tensor], z: torch.Tensor, pad_id, seq2seq: bool):
    """[B, N] True where z is a real token, read off the batch's masks."""
    mask = batch.get("attention_mask")
    if kind == "decoder" and seq2seq:
        if "decoder_attention_mask" in batch:
            mask = batch["decoder_attention_mask"]
        elif "decoder_input_ids" in batch:
            mask = None if pad_id is None else batch["decoder_input_ids"] != pad_id
        else:
            mask = batch["labels"] != -100 if "labels" in batch else None
    if mask is not None and mask.shape[1] > z.shape[1]:  # a continued cache: the mask covers the past tokens too
        mask = mask[:, -z.shape[1] :]
    if mask is None or mask.shape != z.shape[:2]:
        return torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
    return mask.bool().to(z.device)


TARGET_KEYS = ("labels", "decoder_input_ids", "decoder_inputs_embeds")  # what teacher-forces a seq2seq decoder


def _check_target(batch: Mapping[str, Any], index: int) -> None:
    """Refuse a batch without the decoder's own inputs for a whole encoder-decoder model: BART-like models would feed
    the decoder the shifted source, and its self-attention prior would describe the source text."""
    if not any(batch.get(key) is not None for key in TARGET_KEYS):
        raise ValueError(
            f"batch {index} has no labels or decoder_input_ids, so the decoder would read the source text and its "
            "prior would describe the source, not the targets. Fix: add the tokenised targets to every batch as "
            "labels (padding -100) or decoder_input_ids (with decoder_attention_mask)"
        )


def _run_prefix(model: nn.Module, prefix: Sequence[int], reader: SiteReader, fingerprint) -> Any:
    """The prefix's forward (one row; the hooks keep its z while ``reader.prefix_pass``) -> its KV cache."""
    ids = torch.tensor([list(prefix)], device=next(model.parameters()).device)
    reader.batch, reader.prefix_pass = {"input_ids": ids}, True
    batch_digest(fingerprint, {"prefix": ids})
    cache = caching.new_cache(model)
    model(input_ids=ids, **{**_forward_kwargs(model, {}), "use_cache": True, caching.cache_kwarg(model.forward): cache})
    reader.prefix_pass = False
    return cache


def _forward_kwargs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """No cache, and logits at one position only where the model takes ``logits_to_keep`` (the prior reads keys)."""
    narrow = "logits_to_keep" in inspect.signature(model.forward).parameters and "labels" not in batch
    return {"use_cache": False, **({"logits_to_keep": 1} if narrow else {})}


def _continuing(model: nn.Module, cache: Any, length: int, batch: dict[str, torch.Tensor]) -> tuple[int, dict]:
    """(rows, forward kwargs) of a batch: without a prefix cache, no cache; with one, a copy per row and the
    attention mask widened over the prefix (in place), so each row continues the prefix."""
    kwargs = _forward_kwargs(model, batch)
    if cache is None:
        return 0, kwargs
    if "input_ids" not in batch:
        raise ValueError("with a shared prefix every batch needs input_ids (the tokens after the prefix)")
    rows, n = batch["input_ids"].shape
    mask = batch.get("attention_mask", torch.ones(rows, n, dtype=torch.long, device=batch["input_ids"].device))
    batch["attention_mask"] = torch.cat([mask.new_ones(rows, length), mask], dim=1)
    return rows, {**kwargs, "use_cache": True, caching.cache_kwarg(model.forward): caching.expanded(cache, rows)}


class SiteReader:
    """Forward hooks that fold the real tokens of every site into `stats` (site name -> `SiteStats`): in z-space the
    input of the key projection (for "cross" the encoder output, once), in key space the unrotated keys and the
    values (docs/method.md §10). While `prefix_pass`, a site's tokens are kept in `shared` instead, and then added
    once per row (`rows`) of every later batch."""

    def __init__(self, pad_id: int | None, seq2seq: bool):
        self.pad_id, self.seq2seq = pad_id, seq2seq
        self.stats: dict[str, SiteStats] = {}
        self.shared: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # site -> the prefix's z (and values)
        self.batch: dict[str, torch.Tensor] = {}
        self.prefix_pass, self.rows = False, 0
        self.handles: list = []

    def attach(self, sites: Sequence[Site]) -> None:
        """Hook every site (once per name: "cross" is the encoder output, taken once); `remove` takes them off."""
        hooked = set()
        for site in sites:
            if site.name in hooked:
                continue
            hooked.add(site.name)
            if site.arch.key_space:
                self.handles += self._key_hooks(site)
            else:
                self.handles.append(site.key_projection.register_forward_pre_hook(self._z_hook(site), with_kwargs=True))

    def add(self, site: Site, z: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Fold the real tokens of z [B, N, ...] (and of the values) into the site's statistics."""
        valid = valid_mask(site.kind, self.batch, z, self.pad_id, self.seq2seq)
        z, values = z[valid], None if values is None else values[valid]
        if self.prefix_pass:
            self.shared[site.name] = (z, values)
            return
        if site.name in self.shared:  # the prefix's tokens, once per row
            pz, pv = self.shared[site.name]
            z = torch.cat([pz.repeat(self.rows, *(1,) * (pz.dim() - 1)), z])
            if values is not None:
                values = torch.cat([pv.repeat(self.rows, *(1,) * (pv.dim() - 1)), values])
        new = SiteStats.of(z, site.noise, values)
        self.stats[site.name] = self.stats[site.name].merge(new) if site.name in self.stats else new

    def tokens(self) -> int:
        """The most tokens any site has seen so far."""
        return max((s.count for s in self.stats.values()), default=0)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _z_hook(self, site: Site):
        def hook(module, args, kwargs):
            self.add(site, args[0] if args else next(iter(kwargs.values())))

        return hook

    def _key_hooks(self, site: Site) -> list:
        """Key space (docs/method.md §10): the unrotated keys (key norm or k projection output) and the values."""
        seen: dict[str, torch.Tensor] = {}
        G, E = keyspace.site_shape(site)

        def both_seen():  # modules differ in whether the key norm or the value projection runs first
            if len(seen) == 2:
                k, v = seen.pop("k"), seen.pop("v")
                self.add(site, k.reshape(*k.shape[:2], G, E), v.reshape(*v.shape[:2], G, E))

        def on_key(module, args, out):
            seen["k"] = out.transpose(1, 2) if site.arch.key_layout == "heads_first" else out
            both_seen()

        def on_value(module, args, out):
            seen["v"] = out
            both_seen()

        module = site.module
        return [
            getattr(module, site.arch.key_source).register_forward_hook(on_key),
            getattr(module, site.arch.v).register_forward_hook(on_value),
        ]


@dataclasses.dataclass
class PassResult:
    """What one estimation pass saw: `stats` per site, whether it ran to the end (not stopped by Ctrl-C), the sha256
    of the tokenised batches (and prefix) and the `EXAMPLE_SKETCH` smallest example hashes."""

    stats: dict[str, SiteStats]
    complete: bool
    fingerprint: str
    examples: set[int]


@torch.no_grad()
def read_sites(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, total: int | None = None,
    progress: bool = True, prefix: Sequence[int] = (),
) -> PassResult:  # fmt: skip
    """One teacher-forced pass of the pretrained computation over `batches` (see `EmpiricalPrior.estimate`); Ctrl-C
    ends it early with the statistics so far. The model's training mode and knobs are restored."""
    sites = find_sites(model)
    pad_id = getattr(model.config, "pad_token_id", None)
    if pad_id is None and model.config.model_type == "encoder-decoder":
        pad_id = model.config.decoder.pad_token_id
    if pad_id is None and model.config.model_type in LANGUAGE_MODELS:  # multimodal: its language model's
        pad_id = getattr(getattr(model.config, LANGUAGE_MODELS[model.config.model_type][0]), "pad_token_id", None)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    # encoder and decoder in one model (not a standalone half): the decoder needs the targets (teacher forcing)
    whole_seq2seq = seq2seq and {"encoder", "decoder"} <= {site.kind for site in sites}
    if prefix and seq2seq:
        raise ValueError("a shared prefix is for decoder-only models. Fix: put the prefix into the batches")
    reader = SiteReader(pad_id, seq2seq)
    reader.attach(sites)
    was_training, old_config = model.training, getattr(model, "nv_config", None)
    model.eval()
    if is_converted(model):
        set_knobs(model, NVConfig())  # the pretrained computation (docs/method.md §5)
    device = next(model.parameters()).device
    complete, fingerprint, examples = True, hashlib.sha256(), set()
    bar = _progress_bar(progress)
    try:
        with bar:
            task = bar.add_task("prior", total=total, tokens=0)
            cache = _run_prefix(model, prefix, reader, fingerprint) if prefix else None
            for index, batch in enumerate(batches):
                if whole_seq2seq:
                    _check_target(batch, index)
                reader.batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
                batch_digest(fingerprint, reader.batch)
                examples = set(sorted(examples | set(example_hashes(batch)))[:EXAMPLE_SKETCH])
                reader.rows, kwargs = _continuing(model, cache, len(prefix), reader.batch)
                model(**{**kwargs, **reader.batch})
                bar.update(task, advance=1, tokens=reader.tokens())
    except KeyboardInterrupt:
        complete = False
    finally:
        reader.remove()
        model.train(was_training)
        if old_config is not None:
            set_knobs(model, old_config)
    return PassResult(reader.stats, complete, fingerprint.hexdigest(), examples)
