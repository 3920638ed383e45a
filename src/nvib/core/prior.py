"""`EmpiricalPrior`: per-site statistics of the key vectors on in-domain data (spec §7).

One streaming pass, float64 accumulators merged with Chan's parallel update, so shards estimated by
separate processes or machines merge exactly (`EmpiricalPrior.merge`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nvib.core import caching, keyspace
from nvib.core.architectures import LANGUAGE_MODELS, Site, find_sites
from nvib.core.config import NVConfig
from nvib.core.layer import LAYERS, is_converted, set_knobs

TOKEN_SAMPLE = 256  # token vectors kept per site for spec §12's Std(B)


@dataclasses.dataclass
class SiteStats:
    """Statistics of one site over `count` token vectors z, float64: z-space sites have z of size P (spec §7),
    key-space sites one key k of size E per key/value head, [G, E] (spec §10).

    mean, var: per-dimension mean and unbiased variance of z (m_0, s_0²);
    log_alpha_mean, log_alpha_std: mean and standard deviation of ‖z‖²/(2√E) (a_0, ς; one per head in key space);
    value_mean: key space only, the mean of the values (m_v) [G, E];
    m3, m4: Σ (z − mean)³ and Σ (z − mean)⁴ per dimension (spec §12), None in priors saved before they existed;
    sample, sample_key: `TOKEN_SAMPLE` of the tokens [K, ...] (float32) with the random keys that chose them (the K
    smallest keys: merging two samples keeps the K smallest of both, a uniform sample of the union), for spec §12.
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor  # Σ (z − mean)², per dimension
    norm_mean: torch.Tensor  # [] or [G]
    norm_m2: torch.Tensor
    value_mean: torch.Tensor | None = None
    m3: torch.Tensor | None = None
    m4: torch.Tensor | None = None
    sample: torch.Tensor | None = None
    sample_key: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.norm_mean = torch.as_tensor(self.norm_mean, dtype=torch.float64)
        self.norm_m2 = torch.as_tensor(self.norm_m2, dtype=torch.float64)

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.count - 1, 1)

    @property
    def sq_var(self) -> torch.Tensor | None:
        """Var(z_d²) per dimension over the tokens (spec §12), or None without the higher moments."""
        if self.m3 is None or self.m4 is None:
            return None
        n = max(self.count, 1)
        mu, v, t, q = self.mean, self.m2 / n, self.m3 / n, self.m4 / n
        second = mu * mu + v
        fourth = mu**4 + 6 * mu * mu * v + 4 * mu * t + q
        return (fourth - second * second).clamp(min=0)

    @property
    def log_alpha_mean(self) -> torch.Tensor:
        return self.norm_mean

    @property
    def log_alpha_std(self) -> torch.Tensor:
        return (self.norm_m2 / max(self.count - 1, 1)).sqrt()

    @classmethod
    def of(cls, z: torch.Tensor, noise: float, values: torch.Tensor | None = None) -> SiteStats:
        """Direct statistics of token vectors z [T, P] (or keys [T, G, E], with their values [T, G, E])."""
        z = z.to(torch.float64)
        mean = z.mean(0)
        r = (z * z).sum(-1) / (2 * noise)
        value_mean = None if values is None else values.to(torch.float64).mean(0)
        d = z - mean
        d2 = d * d
        seed = int(
            hashlib.sha256(z[:, ..., :1].numpy().tobytes()).hexdigest()[:8], 16
        )  # the same tokens, the same keys
        keys = torch.rand(z.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        keys, chosen = keys.sort()
        return cls(
            z.shape[0], mean, d2.sum(0), r.mean(0), ((r - r.mean(0)) ** 2).sum(0), value_mean,
            (d2 * d).sum(0), (d2 * d2).sum(0), z[chosen[:TOKEN_SAMPLE]].float(), keys[:TOKEN_SAMPLE],
        )  # fmt: skip

    def merge(self, other: SiteStats) -> SiteStats:
        """Chan et al.'s exact pairwise update."""
        n = self.count + other.count
        if self.count == 0 or other.count == 0:
            return other if self.count == 0 else self
        w = other.count / n
        delta = other.mean - self.mean
        norm_delta = other.norm_mean - self.norm_mean
        value_mean = None
        if self.value_mean is not None and other.value_mean is not None:
            value_mean = self.value_mean + (other.value_mean - self.value_mean) * w
        m3 = m4 = None
        if None not in (self.m3, self.m4, other.m3, other.m4):  # Pébay's pairwise update of the 3rd and 4th moments
            na, nb = self.count, other.count
            m3 = (
                self.m3 + other.m3 + delta**3 * na * nb * (na - nb) / n**2
                + 3 * delta * (na * other.m2 - nb * self.m2) / n
            )  # fmt: skip
            m4 = (
                self.m4 + other.m4 + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
                + 6 * delta**2 * (na * na * other.m2 + nb * nb * self.m2) / n**2
                + 4 * delta * (na * other.m3 - nb * self.m3) / n
            )  # fmt: skip
        sample = key = None
        if None not in (self.sample, other.sample):
            key, order = torch.cat([self.sample_key, other.sample_key]).sort()
            key, sample = key[:TOKEN_SAMPLE], torch.cat([self.sample, other.sample])[order[:TOKEN_SAMPLE]]
        return SiteStats(
            n,
            self.mean + delta * w,
            self.m2 + other.m2 + delta * delta * self.count * w,
            self.norm_mean + norm_delta * w,
            self.norm_m2 + other.norm_m2 + norm_delta * norm_delta * self.count * w,
            value_mean,
            m3,
            m4,
            sample,
            key,
        )


def model_signature(model: nn.Module) -> dict[str, object]:
    """What a prior must match: model type and the size of every site."""
    sites = {s.name: s.key_dim for s in find_sites(model)}
    text = json.dumps({"model_type": model.config.model_type, "sites": sites}, sort_keys=True)
    return {
        "model_type": model.config.model_type,
        "sites": sites,
        "config_hash": hashlib.sha256(text.encode()).hexdigest()[:16],
    }


WEIGHT_SAMPLES = 4096  # values hashed per weight tensor


@torch.no_grad()
def weights_hash(model: nn.Module) -> str:
    """sha256 of the pretrained weights (NV layers excluded): every tensor's name, shape and dtype, and
    up to `WEIGHT_SAMPLES` evenly spaced values of it. Two checkpoints of one architecture differ in it.
    A 270M-parameter model (Gemma 3 270M's shapes) hashes in 0.2 s here; sha256 over all its bytes took 14 s."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        if name.startswith(LAYERS + "."):
            continue
        flat = tensor.detach().reshape(-1)
        step = max(flat.numel() // WEIGHT_SAMPLES, 1)
        sample = flat[::step][:WEIGHT_SAMPLES].to("cpu", torch.float64)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def _batch_digest(digest, batch: Mapping[str, torch.Tensor]) -> None:
    """Add one tokenised batch to a data fingerprint."""
    for key in sorted(batch):
        value = batch[key]
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.detach().to("cpu").contiguous().numpy().tobytes())


EXAMPLE_SKETCH = 1024  # smallest per-example hashes kept per shard: merges refuse shards that share examples


def example_hashes(batch: Mapping[str, torch.Tensor]) -> list[int]:
    """A 64-bit hash per example (row) of a tokenised batch, from its real tokens only (input ids under the
    attention mask, then the decoder ids or labels under theirs): the same for any batch size or padding."""
    ids = batch.get("input_ids")
    if ids is None:
        return []
    mask = batch.get("attention_mask")
    target = batch.get("decoder_input_ids")
    target_mask = batch.get("decoder_attention_mask")
    if target is None and batch.get("labels") is not None:
        target = batch["labels"]
        target_mask = target != -100
    out = []
    for r in range(ids.shape[0]):
        parts = [ids[r] if mask is None else ids[r][mask[r].bool()]]
        if target is not None:
            parts.append(target[r] if target_mask is None else target[r][target_mask[r].bool()])
        digest = hashlib.sha256()
        for p in parts:
            digest.update(p.to("cpu", torch.int64).numpy().tobytes() + b"|")
        out.append(int.from_bytes(digest.digest()[:8], "big"))
    return out


class PriorMismatchError(ValueError):
    pass


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


def _valid_mask(kind: str, batch: Mapping[str, torch.Tensor], z: torch.Tensor, pad_id, seq2seq: bool):
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


def _run_prefix(model: nn.Module, prefix: Sequence[int], current: dict[str, Any], fingerprint) -> Any:
    """The prefix's forward (one row; the hooks keep its z while ``current["prefix_pass"]``) -> its KV cache."""
    ids = torch.tensor([list(prefix)], device=next(model.parameters()).device)
    current["batch"], current["prefix_pass"] = {"input_ids": ids}, True
    _batch_digest(fingerprint, {"prefix": ids})
    cache = caching.new_cache(model)
    model(input_ids=ids, **{**_forward_kwargs(model, {}), "use_cache": True, caching.cache_kwarg(model.forward): cache})
    current["prefix_pass"] = False
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
        """One teacher-forced pass over tokenised `batches` (dicts as the model's forward takes them).

        `prefix`: token ids that begin every row of every batch of a decoder-only LM (a few-shot prompt's shared
        part), left out of the batches' ``input_ids``: its forward runs once, each batch continues a copy of its KV
        cache, and its tokens count once per row, so the statistics are those of the whole rows (prefix + row).

        Ctrl-C stops the pass and returns the statistics so far (metadata `complete` = False): estimate the
        rest and `merge`, which is exact. The metadata records what it was estimated on: `data`, a sha256 of
        the tokenised batches (with `shard` = (i, n) if given) and a hash of the model's weights, so that
        `merge` refuses the same shard twice or priors of different models.
        """
        sites = find_sites(model)
        stats: dict[str, SiteStats] = {}
        pad_id = getattr(model.config, "pad_token_id", None)
        if pad_id is None and model.config.model_type == "encoder-decoder":
            pad_id = model.config.decoder.pad_token_id
        if pad_id is None and model.config.model_type in LANGUAGE_MODELS:  # multimodal: its language model's
            pad_id = getattr(getattr(model.config, LANGUAGE_MODELS[model.config.model_type][0]), "pad_token_id", None)
        seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        if prefix and seq2seq:
            raise ValueError("a shared prefix is for decoder-only models. Fix: put the prefix into the batches")
        current: dict[str, Any] = {"prefix_pass": False, "rows": 0}
        shared: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # site -> the prefix's z (and values)

        def add(site: Site, z: torch.Tensor, values: torch.Tensor | None = None) -> None:
            valid = _valid_mask(site.kind, current["batch"], z, pad_id, seq2seq)
            z, values = z[valid], None if values is None else values[valid]
            if current["prefix_pass"]:
                shared[site.name] = (z, values)
                return
            if site.name in shared:  # the prefix's tokens, once per row
                pz, pv = shared[site.name]
                z = torch.cat([pz.repeat(current["rows"], *(1,) * (pz.dim() - 1)), z])
                if values is not None:
                    values = torch.cat([pv.repeat(current["rows"], *(1,) * (pv.dim() - 1)), values])
            new = SiteStats.of(z, site.noise, values)
            stats[site.name] = stats[site.name].merge(new) if site.name in stats else new

        def z_hook(site: Site):
            def hook(module, args, kwargs):
                add(site, args[0] if args else next(iter(kwargs.values())))

            return hook

        def key_hooks(site: Site):
            """Key space (spec §10): the unrotated keys (key norm or k projection output) and the values."""
            seen: dict[str, torch.Tensor] = {}
            G, E = keyspace.site_shape(site)

            def both_seen():  # modules differ in whether the key norm or the value projection runs first
                if len(seen) == 2:
                    k, v = seen.pop("k"), seen.pop("v")
                    add(site, k.reshape(*k.shape[:2], G, E), v.reshape(*v.shape[:2], G, E))

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

        hooked: dict[str, list] = {}
        for site in sites:
            if site.name in hooked:  # cross-attention: the encoder output, taken once
                continue
            if site.arch.key_space:
                hooked[site.name] = key_hooks(site)
            else:
                hooked[site.name] = [site.key_projection.register_forward_pre_hook(z_hook(site), with_kwargs=True)]
        was_training, old_config = model.training, getattr(model, "nv_config", None)
        model.eval()
        if is_converted(model):
            set_knobs(model, NVConfig())  # the pretrained computation (spec §5)
        device = next(model.parameters()).device
        complete, fingerprint, examples = True, hashlib.sha256(), set()
        bar = _progress_bar(progress)
        try:
            with bar:
                task = bar.add_task("prior", total=total, tokens=0)
                cache = _run_prefix(model, prefix, current, fingerprint) if prefix else None
                for batch in batches:
                    current["batch"] = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
                    _batch_digest(fingerprint, current["batch"])
                    examples = set(sorted(examples | set(example_hashes(batch)))[:EXAMPLE_SKETCH])
                    current["rows"], kwargs = _continuing(model, cache, len(prefix), current["batch"])
                    model(**{**kwargs, **current["batch"]})
                    tokens = max((s.count for s in stats.values()), default=0)
                    bar.update(task, advance=1, tokens=tokens)
        except KeyboardInterrupt:
            complete = False
        finally:
            for handles in hooked.values():
                for handle in handles:
                    handle.remove()
            model.train(was_training)
            if old_config is not None:
                set_knobs(model, old_config)
        if not stats:
            raise ValueError("no batches were seen: the data iterable is empty")
        signature = model_signature(model)
        metadata = {
            "model_name": str(getattr(model.config, "_name_or_path", "")),
            "model_type": signature["model_type"],
            "config_hash": signature["config_hash"],
            "weights_hash": weights_hash(model),
            "data": data,
            "complete": complete,
            "tokens": {k: v.count for k, v in stats.items()},
            "shards": [
                {
                    "data_sha256": fingerprint.hexdigest(),
                    "shard": list(shard) if shard is not None else None,
                    "tokens": max(v.count for v in stats.values()),
                    "examples": [f"{h:016x}" for h in sorted(examples)],  # the smallest example hashes
                }
            ],
        }
        return cls(stats, metadata)

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
        _check_same_weights(priors)
        shards = _check_disjoint_shards(priors)
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
        tensors = {}
        for name, s in self.sites.items():
            tensors[f"{name}.mean"] = s.mean.contiguous()
            tensors[f"{name}.m2"] = s.m2.contiguous()
            tensors[f"{name}.norm"] = torch.stack([s.norm_mean, s.norm_m2]).to(torch.float64)
            tensors[f"{name}.count"] = torch.tensor(s.count, dtype=torch.int64)
            if s.value_mean is not None:
                tensors[f"{name}.value_mean"] = s.value_mean.contiguous()
            if s.m3 is not None and s.m4 is not None:
                tensors[f"{name}.m3"], tensors[f"{name}.m4"] = s.m3.contiguous(), s.m4.contiguous()
            if s.sample is not None:
                tensors[f"{name}.sample"], tensors[f"{name}.sample_key"] = s.sample.contiguous(), s.sample_key
        meta = {k: json.dumps(v) for k, v in self.metadata.items()}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> EmpiricalPrior:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no prior file at {path}: estimate one with `nvib prior` or EmpiricalPrior.estimate"
            )
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                raw = f.metadata() or {}
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a prior saved by EmpiricalPrior.save ({err})") from err
        _validate_tensors(path, tensors)
        names = sorted({k.rsplit(".", 1)[0] for k in tensors})
        sites = {}
        for name in names:
            norm = tensors[f"{name}.norm"]
            sites[name] = SiteStats(
                int(tensors[f"{name}.count"]),
                tensors[f"{name}.mean"],
                tensors[f"{name}.m2"],
                norm[0],
                norm[1],
                tensors.get(f"{name}.value_mean"),
                tensors.get(f"{name}.m3"),
                tensors.get(f"{name}.m4"),
                tensors.get(f"{name}.sample"),
                tensors.get(f"{name}.sample_key"),
            )
        metadata = {}
        for k, v in raw.items():
            with contextlib.suppress(json.JSONDecodeError):
                metadata[k] = json.loads(v)
        return cls(sites, metadata)


REQUIRED = ("mean", "m2", "norm", "count")  # tensors every site has
FIX = "Fix: estimate a prior with `nvib prior` or EmpiricalPrior.estimate"


def _validate_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse files that are not priors, or whose statistics are not finite or negative where they cannot be.

    Generic over the tensors stored per site: all must be finite, counts >= 0 and sums of squares (``*m2``) >= 0;
    every site must have the `REQUIRED` ones."""
    if not tensors:
        raise ValueError(f"{path} holds no tensors: it is not a prior saved by EmpiricalPrior.save. {FIX}")
    sites: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        site, _, stat = key.rpartition(".")
        if not site:
            raise ValueError(f"{path}: tensor {key!r} is not a per-site statistic: not a prior file. {FIX}")
        sites.setdefault(site, {})[stat] = tensor
    for site, stats in sites.items():
        missing = [name for name in REQUIRED if name not in stats]
        if missing:
            raise ValueError(
                f"{path}: site {site!r} lacks the statistics {missing}: not a prior saved by EmpiricalPrior.save. {FIX}"
            )
        mean = stats["mean"]  # [P] in z-space, [G, E] in key space (then one norm statistic per head)
        if stats["count"].dim() != 0 or mean.dim() not in (1, 2) or stats["norm"].shape != (2, *mean.shape[:-1]):
            raise ValueError(f"{path}: site {site!r} has statistics of the wrong shape. {FIX}")
        if stats["mean"].shape != stats["m2"].shape:
            raise ValueError(f"{path}: site {site!r}: mean and m2 differ in size. {FIX}")
        if ("m3" in stats) != ("m4" in stats) or any(stats[m].shape != mean.shape for m in ("m3", "m4") if m in stats):
            raise ValueError(f"{path}: site {site!r}: the higher moments m3/m4 are incomplete or misshapen. {FIX}")
        sample, key = stats.get("sample"), stats.get("sample_key")
        if (sample is None) != (key is None) or (
            sample is not None and (sample.shape[1:] != mean.shape or key.shape != sample.shape[:1])
        ):
            raise ValueError(f"{path}: site {site!r}: the token sample is incomplete or misshapen. {FIX}")
        if "m4" in stats and bool((stats["m4"] < 0).any()):
            raise ValueError(f"{path}: {site}.m4: a sum of 4th powers is negative: the prior is corrupt. {FIX}")
        for stat, tensor in stats.items():
            where = f"{path}: {site}.{stat}"
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{where} has NaN or infinite values: the prior is corrupt. {FIX}")
            if stat == "count" or stat.endswith("_count"):
                if bool((tensor < 0).any()):
                    raise ValueError(f"{where} is a token count and is negative: the prior is corrupt. {FIX}")
            if (stat.endswith("m2") and bool((tensor < 0).any())) or (stat == "norm" and bool((tensor[1] < 0).any())):
                raise ValueError(f"{where}: a sum of squared deviations is negative: the prior is corrupt. {FIX}")


def _check_same_weights(priors: tuple[EmpiricalPrior, ...]) -> None:
    hashes = {p.metadata.get("weights_hash") for p in priors}
    if len(hashes) > 1:
        if None in hashes:
            raise PriorMismatchError(
                "cannot merge: some priors record no weights hash (saved by an older nvib), so they may come from "
                "different models. Fix: estimate every shard again with this version"
            )
        names = sorted({str(p.metadata.get("model_name") or "unnamed") for p in priors})
        raise PriorMismatchError(
            f"cannot merge priors estimated on different model weights ({', '.join(names)}; weights hashes "
            f"{sorted(hashes)}). Fix: estimate every shard with the same model checkpoint"
        )


def _check_disjoint_shards(priors: tuple[EmpiricalPrior, ...]) -> list[dict] | None:
    """All shard records of `priors`, refusing a data fingerprint seen twice; None if none records shards."""
    if all("shards" not in p.metadata for p in priors):
        return None
    shards, seen = [], {}
    for i, p in enumerate(priors):
        for record in p.metadata.get("shards") or []:
            fingerprint = record.get("data_sha256")
            if fingerprint in seen:
                label = f" (shard {record['shard'][0]}/{record['shard'][1]})" if record.get("shard") else ""
                raise PriorMismatchError(
                    f"cannot merge: priors {seen[fingerprint]} and {i} were estimated on the same data{label}, "
                    "which would count it twice. Fix: merge each shard once (--shard i/n, i = 0 .. n-1)"
                )
            seen[fingerprint] = i
            shards.append(record)
    _check_no_shared_examples(priors)
    return shards


def _check_no_shared_examples(priors: tuple[EmpiricalPrior, ...]) -> None:
    """Refuse priors whose example sketches (each shard's `EXAMPLE_SKETCH` smallest example hashes) share at least a
    tenth of the smaller one (and 2 hashes): they share data (a prior merged with one of its own shards, shards cut
    with other batch sizes). A few duplicate examples in a corpus pass; so may a small overlap among many examples."""
    records = [(i, set(r.get("examples") or ())) for i, p in enumerate(priors) for r in p.metadata.get("shards") or []]
    for a, (i, first) in enumerate(records):
        for j, second in records[a + 1 :]:
            shared = len(first & second)
            if i != j and shared >= max(2, 0.1 * min(len(first), len(second))):
                raise PriorMismatchError(
                    f"cannot merge: priors {i} and {j} were estimated on overlapping data ({shared} shared examples "
                    "among the ones compared), which would count them twice. Fix: merge priors of disjoint shards "
                    "of the same data (--shard i/n with one batch size), each once"
                )
