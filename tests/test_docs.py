"""The method's documentation ships with the project: no file cites a path outside the repository, and every
citation of docs/method.md names a section that exists there."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
# spelled in pieces, so that this file does not match itself
OUTSIDE = ("../" + "shared", "spec" + " §", "nv-" + "attention.md")
CITATION = re.compile(r"(?:docs/)?method\.md §(\d+)(?:[–-](\d+))?")
LINK = re.compile(r"\]\(((?:\.\./)*(?:docs/)?method\.md)#([^)\s]+)\)")


def tracked_files() -> list[str]:
    """Every path git tracks in this checkout (with those added but not committed)."""
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return listed.stdout.splitlines()


def tracked_text_files() -> dict[str, str]:
    """Path -> text of every file git tracks in this checkout (binary files left out)."""
    files = {}
    for name in tracked_files():
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


def test_the_wheel_carries_the_docs_and_the_demo_data(tmp_path) -> None:
    """A pip-installed nvib has its own account of the method (nvib/docs, a link to docs/ in the source tree).
    Built from a copy of the tracked files, so that no earlier build's leftovers can stand in for them."""
    source = tmp_path / "source"
    for name in tracked_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name, follow_symlinks=False)
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / done.stdout.split()[-1]) as wheel:
        for doc in sorted((ROOT / "docs").glob("*.md")):
            assert wheel.read(f"nvib/docs/{doc.name}") == doc.read_bytes(), doc.name
        assert "nvib/demo_data/demo.yaml" in wheel.namelist()
