"""Where a run config's paths point: relative to the config file, or ``package:NAME/sub/path`` inside an installed
Python package, found without importing it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

__all__ = ["package_dir", "resolve_path"]


def resolve_path(value: str | Path, base_dir: str | Path = ".") -> Path:
    """A path from a config: ``package:NAME/sub`` inside installed package NAME, else relative to base_dir."""
    text = str(value)
    if text.startswith("package:"):
        name, _, sub = text[len("package:") :].partition("/")
        root = package_dir(name)
        if root is None:
            raise FileNotFoundError(
                f"{text}: Python package {name!r} is not installed. Fix: install it, or give a directory path"
            )
        return root / sub if sub else root
    path = Path(text).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def package_dir(name: str) -> Path | None:
    """The folder of package ``name`` (``a`` or ``a.b.c``), found without importing (running) any of it: the top
    level by the import system's finders (which only locate it), each sub-package by its parent's folders; None if
    there is none. (``importlib.util.find_spec("a.b")`` would import ``a`` and run its ``__init__.py``.)"""
    parts = name.split(".")
    if not name or not all(part.isidentifier() for part in parts):
        return None
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    for i in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
    if spec is None or not (spec.submodule_search_locations or spec.origin):
        return None
    return Path(spec.submodule_search_locations[0]) if spec.submodule_search_locations else Path(spec.origin).parent
