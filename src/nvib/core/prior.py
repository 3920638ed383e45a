"""`EmpiricalPrior`: per-site statistics of the key vectors on in-domain data (docs/method.md §7).

One streaming pass, float64 accumulators merged with Chan's parallel update, so shards estimated by
separate processes or machines merge exactly (`EmpiricalPrior.merge`). Its pieces: `site_stats` (the exact,
mergeable statistics of one site), `prior_pass` (the pass over a model), `prior_provenance` (what a prior records
about its model and data, and the merge checks) and `prior_file` (the .safetensors format).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from nvib.core import prior_file
from nvib.core.prior_file import FIX, REQUIRED
from nvib.core.prior_pass import TARGET_KEYS, read_sites, valid_mask
from nvib.core.prior_provenance import (
    EXAMPLE_SKETCH,
    WEIGHT_SAMPLES,
    PriorMismatchError,
    check_disjoint_shards,
    check_same_weights,
    estimate_metadata,
    example_hashes,
    model_signature,
    weights_hash,
)
from nvib.core.site_stats import TOKEN_SAMPLE, SiteStats

__all__ = [  # every name this module exported before its pieces moved out
    "EXAMPLE_SKETCH", "FIX", "REQUIRED", "TARGET_KEYS", "TOKEN_SAMPLE", "WEIGHT_SAMPLES", "EmpiricalPrior",
    "PriorMismatchError", "SiteStats", "example_hashes", "model_signature", "valid_mask", "weights_hash",
]  # fmt: skip


class EmpiricalPrior:
    """Site name ("encoder.0", ..., "decoder.0", ..., "cross") -> `SiteStats`, plus where they came from."""

    def __init__(self, sites: dict[str, SiteStats], metadata: dict[str, object]):
        self.sites = sites
        self.metadata = metadata

    def __repr__(self) -> str:
        tokens = {k: v.count for k, v in self.sites.items()}
        return f"EmpiricalPrior(model={self.metadata.get('model_name')!r}, tokens={tokens})"

    @classmethod
    @torch.no_grad()
    def estimate(
        cls,
        model: nn.Module,
        batches: Iterable[Mapping[str, torch.Tensor]],
        *,
        data: str = "",
        total: int | None = None,
        progress: bool = True,
        shard: tuple[int, int] | None = None,
        prefix: Sequence[int] = (),
    ) -> EmpiricalPrior:
        """One teacher-forced pass over tokenised `batches` (dicts as the model's forward takes them). For an
        encoder-decoder model every batch carries the targets (``labels`` or ``decoder_input_ids``): without them the
        decoder would read the source text, so such a batch is refused.

        `prefix`: token ids that begin every row of every batch of a decoder-only LM (a few-shot prompt's shared
        part), left out of the batches' ``input_ids``: its forward runs once, each batch continues a copy of its KV
        cache, and its tokens count once per row, so the statistics are those of the whole rows (prefix + row).

        Ctrl-C stops the pass and returns the statistics so far (metadata `complete` = False): estimate the
        rest and `merge`, which is exact. The metadata records what it was estimated on: `data`, a sha256 of
        the tokenised batches (with `shard` = (i, n) if given) and a hash of the model's weights, so that
        `merge` refuses the same shard twice or priors of different models.
        """
        result = read_sites(model, batches, total=total, progress=progress, prefix=prefix)
        if not result.stats:
            raise ValueError("no batches were seen: the data iterable is empty")
        tokens = {k: v.count for k, v in result.stats.items()}
        metadata = estimate_metadata(model, data, result.complete, tokens, result.fingerprint, shard, result.examples)
        return cls(result.stats, metadata)

    @classmethod
    def merge(cls, *priors: EmpiricalPrior | Iterable[EmpiricalPrior]) -> EmpiricalPrior:
        """Exact merge of priors estimated on disjoint shards of the data: ``merge(a, b)`` or ``merge([a, b])``.

        Refuses priors of different models (weights hash) and the same data shard twice (data fingerprint).
        """
        if len(priors) == 1 and not isinstance(priors[0], EmpiricalPrior):
            priors = tuple(priors[0])
        if not priors:
            raise ValueError("merge needs at least one prior")
        for i, p in enumerate(priors):
            if not isinstance(p, EmpiricalPrior):
                raise TypeError(f"merge takes EmpiricalPrior objects, got {type(p).__name__} at position {i}")
        first = priors[0]
        for p in priors[1:]:
            if p.metadata.get("config_hash") != first.metadata.get("config_hash") or set(p.sites) != set(first.sites):
                raise PriorMismatchError("cannot merge priors estimated on different models")
        check_same_weights([p.metadata for p in priors])
        shards = check_disjoint_shards([p.metadata for p in priors])
        sites = {}
        for name in first.sites:
            acc = first.sites[name]
            for p in priors[1:]:
                acc = acc.merge(p.sites[name])
            sites[name] = acc
        metadata = dict(first.metadata)
        metadata["data"] = " + ".join(str(p.metadata.get("data", "")) for p in priors)
        metadata["complete"] = all(p.metadata.get("complete", True) for p in priors)
        metadata["tokens"] = {k: v.count for k, v in sites.items()}
        if shards is not None:
            metadata["shards"] = shards
        return cls(sites, metadata)

    def check_compatible(self, model: nn.Module, layers: Mapping | None = None) -> None:
        """Raise `PriorMismatchError` unless this prior has the sites and sizes of `model`."""
        signature = model_signature(model)
        ours = {name: int(s.mean.numel()) for name, s in self.sites.items()}
        theirs = self.metadata.get("model_type")
        if ours != signature["sites"] or theirs not in (None, signature["model_type"]):
            raise PriorMismatchError(
                f"this prior was estimated on a {self.metadata.get('model_type')} model "
                f"({self.metadata.get('model_name') or 'unnamed'}) with sites {ours}, but the model has sites "
                f"{signature['sites']} and type {signature['model_type']}: estimate a prior on this model with "
                "nvib.EmpiricalPrior.estimate or `nvib prior`"
            )
        dtype = next(model.parameters()).dtype
        for name, layer in (layers or {}).items():
            s = self.sites[name]
            shape = tuple(layer.prior_mean.shape)  # [P] in z-space, [G, E] (heads × head size) in key space
            stats = {"mean": s.mean, "var": s.var, "value_mean": s.value_mean}
            for stat, t in stats.items():
                if t is not None and tuple(t.shape) != shape:
                    raise PriorMismatchError(
                        f"prior site {name}: its {stat} has shape {list(t.shape)}, the model's site {list(shape)} "
                        "(another head layout?): estimate a prior on this model with `nvib prior`"
                    )
                if t is not None and not bool(torch.isfinite(t.to(dtype)).all()):
                    raise PriorMismatchError(
                        f"prior site {name}: its {stat} is not finite in the model's {dtype} (largest |value| "
                        f"{float(t.abs().max()):.3g}); the file is damaged or made for another model: estimate it "
                        "again with `nvib prior`"
                    )

    def save(self, path: str | Path) -> None:
        """Write the prior to ``path`` (.safetensors) atomically (`nvib.core.files`): a kill or a full disk leaves
        the file that was there."""
        prior_file.save(self.sites, self.metadata, path)

    @classmethod
    def load(cls, path: str | Path) -> EmpiricalPrior:
        return cls(*prior_file.load(path))
