"""The method's documentation ships with the project: no file cites a path outside the repository, and every
citation of docs/method.md names a section that exists there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
# spelled in pieces, so that this file does not match itself
OUTSIDE = ("../" + "shared", "spec" + " §", "nv-" + "attention.md")
CITATION = re.compile(r"(?:docs/)?method\.md §(\d+)(?:[–-](\d+))?")
LINK = re.compile(r"\]\(((?:\.\./)*(?:docs/)?method\.md)#([^)\s]+)\)")


def tracked_text_files() -> dict[str, str]:
    """Path -> text of every file git tracks in this checkout (binary files left out)."""
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = {}
    for name in listed.stdout.splitlines():
        path = ROOT / name
        try:
            files[name] = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
    return files


def sections() -> dict[int, str]:
    """Section number -> its GitHub anchor, from the "## N. Title" headings of docs/method.md."""
    found = {}
    for match in re.finditer(r"^## (\d+)\. (.+)$", METHOD.read_text(), re.MULTILINE):
        title = f"{match.group(1)}. {match.group(2)}".lower().replace("`", "")
        found[int(match.group(1))] = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
    return found


def test_method_sections_are_numbered_one_to_twelve() -> None:
    assert list(sections()) == list(range(1, 13))


def test_no_file_cites_a_path_outside_the_project() -> None:
    offending = [
        f"{name}:{number}: {line.strip()[:100]}"
        for name, text in tracked_text_files().items()
        for number, line in enumerate(text.splitlines(), 1)
        if any(word in line.lower() for word in OUTSIDE)
    ]
    assert not offending, "cite docs/method.md §N instead:\n" + "\n".join(offending[:20])


def test_every_cited_section_exists() -> None:
    numbers = sections()
    missing, dead = [], []
    for name, text in tracked_text_files().items():
        for match in CITATION.finditer(text):
            cited = [int(n) for n in match.groups() if n is not None]
            missing += [f"{name}: {match.group(0)}" for n in cited if n not in numbers]
        for match in LINK.finditer(text):
            target = (ROOT / name).parent / match.group(1)
            if target.resolve() != METHOD.resolve() or match.group(2) not in numbers.values():
                dead.append(f"{name}: {match.group(0)}")
    assert not missing, "no such section in docs/method.md:\n" + "\n".join(missing)
    assert not dead, "links that do not reach a section of docs/method.md:\n" + "\n".join(dead)
