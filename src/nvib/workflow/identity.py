"""What identifies a run, so that a rerun resumes only the run it started (issue 24): the model's and the
tokenizer's files, the data files, the lengths and the task (the objective is checked by the study itself).
Fingerprints read the sizes and the first and last MiB of each file (fast on multi-GB weights; a changed file almost
always changes one of them)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvib.core import files

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


def check_identity(path: Path, identity: Mapping[str, Any], fix: str) -> None:
    """Write `identity` to `path` (JSON) the first time; afterwards refuse (one line) an identity that differs."""
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RunMismatchError(f"{path} is damaged ({err}). Fix: {fix}") from None
        changed = [k for k in sorted(set(stored) | set(identity)) if stored.get(k) != identity.get(k)]
        if changed:
            k = changed[0]
            raise RunMismatchError(
                f"{path.parent} was started with another {', '.join(changed)} ({k}: {stored.get(k)!r} then, "
                f"{identity.get(k)!r} now): resuming would mix incomparable results. Fix: {fix}"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, dict(identity))
