"""What identifies a run, so that a rerun resumes only the run it started (issue 24): the model's and the
tokenizer's files, the data files (the prompt's demonstrations too), the lengths and the task (the objective is
checked by the study itself). Files are told apart by their contents, never by the path that names them: fingerprints
read the sizes and the first and last MiB of each file (fast on multi-GB weights; a changed file almost always
changes one of them)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from nvib.core import files
from nvib.core.prior import EmpiricalPrior, PriorMismatchError, weights_hash

CHUNK = 1 << 20


class RunMismatchError(ValueError):
    """A run directory was started for another model, data or objective."""


def file_fingerprint(path: Path) -> str:
    """SHA-256 (16 hex digits) of a file's size and its first and last MiB; of a directory's files (two levels,
    hidden ones and checkpoints left out); "missing" if there is nothing at `path`."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted(
            p for p in [*path.glob("*"), *path.glob("*/*")]
            if p.is_file() and not any(part.startswith(".") or part.startswith("checkpoint") for part in
                                       p.relative_to(path).parts)
        )  # fmt: skip
    elif path.is_file():
        files = [path]
    else:
        return "missing"
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(path) if f != path else f.name}\0{size}\0".encode())
        with f.open("rb") as handle:
            digest.update(handle.read(CHUNK))
            if size > 2 * CHUNK:
                handle.seek(-CHUNK, 2)
                digest.update(handle.read(CHUNK))
    return digest.hexdigest()[:16]


def prior_digest(prior: EmpiricalPrior) -> str:
    """SHA-256 (16 hex digits) of a prior's statistics (every site's count, mean and spread) and the weights it was
    estimated on: two priors that configure a model differently differ in it."""
    digest = hashlib.sha256(str(prior.metadata.get("weights_hash")).encode())
    for name, s in sorted(prior.sites.items()):
        digest.update(f"{name}\0{s.count}\0".encode())
        for t in (s.mean, s.m2, s.norm_mean, s.norm_m2, s.value_mean):
            if t is not None:
                digest.update(t.detach().to("cpu", dtype=t.dtype).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def changed_keys(stored: Mapping[str, Any], current: Mapping[str, Any], *, shared_only: bool = False) -> list[str]:
    """The keys whose values differ between two records, sorted; with ``shared_only`` only the keys both hold."""
    keys = set(stored) & set(current) if shared_only else set(stored) | set(current)
    return [k for k in sorted(keys) if stored.get(k) != current.get(k)]


def refuse_changes(
    path: Path,
    current: Mapping[str, Any],
    refusal: str,
    fix: str,
    *,
    shared_keys_only: bool = False,
    damaged_ok: bool = False,
) -> None:
    """Refuse (one line, `RunMismatchError`) when the JSON record at ``path`` differs from ``current``; nothing at
    ``path``: nothing to refuse.

    ``refusal`` says what the record's directory holds, filled in from ``{dir}`` (that directory), ``{changed}``
    (the keys that differ) and ``{detail}`` (the first one's value then and now); ``Fix: {fix}`` follows. With
    ``shared_keys_only`` only the keys both records hold are compared (a key one side lacks is no change); a record
    that is not JSON is refused, or with ``damaged_ok`` taken as no record."""
    if not path.is_file():
        return
    try:
        stored = files.json_safe(json.loads(path.read_text()))  # records before issue 36 may hold Infinity
    except json.JSONDecodeError as err:
        if damaged_ok:
            return
        raise RunMismatchError(f"{path} is damaged ({err}). Fix: {fix}") from None
    if changed := changed_keys(stored, current, shared_only=shared_keys_only):
        k = changed[0]
        detail = f"{k}: {stored.get(k)!r} then, {current.get(k)!r} now"
        message = refusal.format(dir=path.parent, changed=", ".join(changed), detail=detail)
        raise RunMismatchError(f"{message}. Fix: {fix}")


def check_identity(path: Path, identity: Mapping[str, Any], fix: str) -> None:
    """Write `identity` to `path` (JSON) the first time; afterwards refuse (one line) an identity that differs."""
    if path.is_file():
        refuse_changes(
            path, identity, "{dir} was started with another {changed} ({detail}): resuming would mix incomparable "
            "results", fix,
        )  # fmt: skip
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, dict(identity))


def check_prior_weights(prior: EmpiricalPrior, model: nn.Module, where: str, allow_foreign: bool = False) -> str | None:
    """Refuse a prior estimated on other weights than ``model``'s (its ``weights_hash``), in one line; with
    ``allow_foreign``, return the warning instead. None when the weights match (or the prior records none)."""
    recorded, ours = prior.metadata.get("weights_hash"), weights_hash(model)
    if recorded is None or recorded == ours:
        return None
    message = (
        f"the prior {where} was estimated on other weights ({prior.metadata.get('model_name') or 'unnamed'}, weights "
        f"hash {str(recorded)[:12]}) than this model's ({ours[:12]})"
    )
    if allow_foreign:
        return f"{message}; using it as asked (foreign prior allowed)"
    raise PriorMismatchError(
        f"{message}. Fix: estimate a prior on this model (`nvib prior`, or drop --prior), or allow it on purpose "
        "with --foreign-prior (config: prior.allow_foreign: true)"
    )
