"""Regenerate ``src/nvib/demo_data/*.jsonl``: the tiny summarisation set of ``nvib tour``.

In domain: Python standard-library docstrings (source = body, target = first line), from disjoint module
groups for train / dev / test. Out of domain: Debian package descriptions of the machine it runs on
(source = long description, target = synopsis) from /var/lib/dpkg/status. Deterministic for a given
Python version and package set; the shipped files were made with Python 3.11.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "nvib" / "demo_data"
GROUPS = {
    "train": [
        "os",
        "os.path",
        "shutil",
        "pathlib",
        "json",
        "collections",
        "itertools",
        "functools",
        "string",
        "textwrap",
        "re",
        "random",
        "statistics",
        "datetime",
        "calendar",
        "heapq",
        "bisect",
        "copy",
        "argparse",
        "configparser",
        "difflib",
        "pprint",
        "typing",
        "enum",
        "decimal",
        "fractions",
    ],
    "dev": ["subprocess", "threading", "queue", "socket", "tempfile", "glob", "fnmatch"],
    "test": [
        "email.message",
        "http.client",
        "urllib.parse",
        "zipfile",
        "tarfile",
        "csv",
        "sqlite3",
        "logging",
    ],
}
SIZES = {"train": 60, "dev": 16, "test": 16, "ood": 16}


def words(text: str) -> int:
    return len(text.split())


def rank(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()


def docstring_pairs(modules: list[str]) -> list[dict[str, str]]:
    seen: dict[str, dict[str, str]] = {}
    for name in modules:
        module = importlib.import_module(name)
        objects = []
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            objects.append((f"{name}.{attr}", obj))
            if inspect.isclass(obj):
                objects += [
                    (f"{name}.{attr}.{m}", f)
                    for m, f in sorted(vars(obj).items())
                    if not m.startswith("_") and inspect.isfunction(f)
                ]
        for key, obj in objects:
            doc = inspect.getdoc(obj) or ""
            head, _, body = doc.partition("\n\n")
            head, body = " ".join(head.split()), " ".join(body.split())
            if not (3 <= words(head) <= 25) or not (15 <= words(body) <= 150) or ">>>" in body:
                continue
            if re.search(r"[{}<>]|\w\(.*\)$", head):  # skip signatures and markup as summaries
                continue
            seen.setdefault(body, {"source": body, "target": head, "id": key})
    return sorted(seen.values(), key=lambda p: rank(p["id"]))


def debian_pairs(status: Path) -> list[dict[str, str]]:
    pairs = []
    for block in status.read_text(encoding="utf-8").split("\n\n"):
        name = re.search(r"^Package: (.+)$", block, re.M)
        desc = re.search(r"^Description: (.+)\n((?: .*\n?)*)", block, re.M)
        if not name or not desc:
            continue
        body = " ".join(line.strip() for line in desc.group(2).splitlines() if line.strip() != ".")
        head = desc.group(1).strip()
        if 3 <= words(head) <= 25 and 15 <= words(body) <= 150:
            pairs.append({"source": body, "target": head, "id": name.group(1)})
    return sorted({p["source"]: p for p in pairs}.values(), key=lambda p: rank(p["id"]))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    sets = {split: docstring_pairs(mods) for split, mods in GROUPS.items()}
    sets["ood"] = debian_pairs(Path("/var/lib/dpkg/status"))
    for split, pairs in sets.items():
        if len(pairs) < SIZES[split]:
            sys.exit(f"only {len(pairs)} pairs for {split}, need {SIZES[split]}")
        with (OUT / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for p in pairs[: SIZES[split]]:
                f.write(json.dumps({"source": p["source"], "target": p["target"]}, ensure_ascii=False) + "\n")
        print(split, len(pairs), "->", SIZES[split])


if __name__ == "__main__":
    main()
