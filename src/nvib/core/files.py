"""Writing output files atomically: every file nvib writes is written to a temporary name in its own folder, flushed
to disk and renamed into place (`os.replace`), so a reader, or a rerun after a kill or a full disk, finds the old file
or the new one, never a torn one. JSON is written without NaN or Infinity (they are not JSON): a non-finite float is
written as the string "inf", "-inf" or "nan" (`json_safe`)."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["dumps", "json_safe", "replacing", "save_tensors", "usual_modes", "write_json", "write_text"]

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, quota or file size limit
DISK_FIX = "Fix: free space on that disk (or write elsewhere), then rerun the same command"


@functools.cache
def _umask() -> int:
    """The process's umask (read by setting it, once, before any file is written)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def usual_modes(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Around a transformers ``save_pretrained`` into ``directory``: the ``*.safetensors`` files it wrote at 0600 get
    the mode of any new file (0666 less the umask). safetensors 0.8 writes through a temporary file it leaves at 0600
    (safetensors issue 782), so a saved model would be readable by its writer only."""
    started = time.time() - 1  # file times may be coarser than time.time()
    yield
    for path in Path(directory).glob("*.safetensors"):
        info = path.stat()
        if info.st_mtime >= started and info.st_mode & 0o777 == 0o600:
            os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the new file to. On success it is flushed to disk, given the mode
    of any new file (0666 less the umask; the temporary file was 0600) and renamed to ``path``; on any error or
    Ctrl-C it is removed and ``path`` is left as it was. An OSError names ``path``."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as err:
        raise _naming(err, path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno is None or err.filename not in (None, str(tmp)):
            raise
        raise _naming(err, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself on disk (not possible everywhere)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` naming the file the user knows (not the temporary one), with the fix for a full disk."""
    fix = f". {DISK_FIX}" if err.errno in FULL else ""
    return OSError(err.errno, f"{err.strerror} while writing {path}{fix}")


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_safe(value: Any) -> Any:
    """``value`` (dicts, lists, tuples, scalars) with every non-finite float replaced by "inf", "-inf" or "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of `json_safe` (``value``): valid JSON, never NaN or Infinity."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike[str], value: Any, **kwargs: Any) -> Path:
    """Write ``value`` as indented JSON (`dumps`) to ``path`` atomically."""
    return write_text(path, dumps(value, indent=2, **kwargs) + "\n")


def save_tensors(tensors: Mapping[str, Any], path: str | os.PathLike[str], metadata: dict[str, str] | None = None):
    """``safetensors.torch.save_file`` to ``path`` atomically; a write that fails (a full disk) is an OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    with replacing(path) as tmp:
        try:
            safetensors.torch.save_file(dict(tensors), str(tmp), metadata=metadata)
        except SafetensorError as err:
            found = re.search(r"os error (\d+)|code: (\d+)", str(err))  # an I/O error, as the Rust side words it
            if found is None:
                raise
            code = int(found.group(1) or found.group(2))
            raise OSError(code, os.strerror(code)) from None  # `replacing` names the file
