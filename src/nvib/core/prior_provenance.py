"""Where a prior came from (docs/method.md §7, "What is stored"): the model's signature and weights hash, the data's
fingerprint and example sketch, the metadata record `EmpiricalPrior.estimate` writes, and the checks by which
`EmpiricalPrior.merge` refuses priors of different models, the same shard twice or overlapping shards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nvib.core.architectures import find_sites
from nvib.core.layer import LAYERS


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


def batch_digest(digest, batch: Mapping[str, torch.Tensor]) -> None:
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


def estimate_metadata(
    model: nn.Module, data: str, complete: bool, tokens: Mapping[str, int], fingerprint: str,
    shard: tuple[int, int] | None, examples: set[int],
) -> dict[str, object]:  # fmt: skip
    """The metadata of a prior estimated on `model`: `tokens` per site, `fingerprint` the sha256 of the tokenised
    batches, `examples` the `EXAMPLE_SKETCH` smallest example hashes."""
    signature = model_signature(model)
    return {
        "model_name": str(getattr(model.config, "_name_or_path", "")),
        "model_type": signature["model_type"],
        "config_hash": signature["config_hash"],
        "weights_hash": weights_hash(model),
        "data": data,
        "complete": complete,
        "tokens": dict(tokens),
        "shards": [
            {
                "data_sha256": fingerprint,
                "shard": list(shard) if shard is not None else None,
                "tokens": max(tokens.values()),
                "examples": [f"{h:016x}" for h in sorted(examples)],  # the smallest example hashes
            }
        ],
    }


def check_same_weights(metadata: Sequence[Mapping[str, Any]]) -> None:
    """Refuse priors (their `metadata`) whose weights hashes differ or that lack one."""
    hashes = {p.get("weights_hash") for p in metadata}
    if len(hashes) > 1:
        if None in hashes:
            raise PriorMismatchError(
                "cannot merge: some priors record no weights hash (saved by an older nvib), so they may come from "
                "different models. Fix: estimate every shard again with this version"
            )
        names = sorted({str(p.get("model_name") or "unnamed") for p in metadata})
        raise PriorMismatchError(
            f"cannot merge priors estimated on different model weights ({', '.join(names)}; weights hashes "
            f"{sorted(hashes)}). Fix: estimate every shard with the same model checkpoint"
        )


def check_disjoint_shards(metadata: Sequence[Mapping[str, Any]]) -> list[dict] | None:
    """All shard records of the priors (their `metadata`), refusing a data fingerprint seen twice; None if none
    records shards."""
    if all("shards" not in p for p in metadata):
        return None
    shards, seen = [], {}
    for i, p in enumerate(metadata):
        for record in p.get("shards") or []:
            fingerprint = record.get("data_sha256")
            if fingerprint in seen:
                label = f" (shard {record['shard'][0]}/{record['shard'][1]})" if record.get("shard") else ""
                raise PriorMismatchError(
                    f"cannot merge: priors {seen[fingerprint]} and {i} were estimated on the same data{label}, "
                    "which would count it twice. Fix: merge each shard once (--shard i/n, i = 0 .. n-1)"
                )
            seen[fingerprint] = i
            shards.append(record)
    _check_no_shared_examples(metadata)
    return shards


def _check_no_shared_examples(metadata: Sequence[Mapping[str, Any]]) -> None:
    """Refuse priors whose example sketches (each shard's `EXAMPLE_SKETCH` smallest example hashes) share at least a
    tenth of the smaller one (and 2 hashes): they share data (a prior merged with one of its own shards, shards cut
    with other batch sizes). A few duplicate examples in a corpus pass; so may a small overlap among many examples."""
    records = [(i, set(r.get("examples") or ())) for i, p in enumerate(metadata) for r in p.get("shards") or []]
    for a, (i, first) in enumerate(records):
        for j, second in records[a + 1 :]:
            shared = len(first & second)
            if i != j and shared >= max(2, 0.1 * min(len(first), len(second))):
                raise PriorMismatchError(
                    f"cannot merge: priors {i} and {j} were estimated on overlapping data ({shared} shared examples "
                    "among the ones compared), which would count them twice. Fix: merge priors of disjoint shards "
                    "of the same data (--shard i/n with one batch size), each once"
                )
