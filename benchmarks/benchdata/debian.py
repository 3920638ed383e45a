"""In-domain source: Debian package descriptions (long description -> one-line synopsis).

The English descriptions come from apt's translation index (``Translation-en``) of one Debian suite, fetched
with ``apt-get update`` into a private directory under the cache, never touching the machine's apt state
(its ``/etc/apt`` configuration, ``/var/lib/apt/lists`` or ``/var/cache/apt``): apt is run with
``APT_CONFIG`` pointing at a private configuration that ignores ``/etc/apt/apt.conf.d`` (so no host hooks
run), a private sources list, lists directory, state and cache. The compressed index files are read back with
``/usr/lib/apt/apt-helper cat-file`` and stored as deterministic gzip files, so a rebuild needs neither the
network nor apt.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from .common import Pair, normalise_ws, sha256_bytes

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SUITE = "bookworm"
DEFAULT_COMPONENT = "main"
DEFAULT_ARCH = "amd64"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
APT_HELPER = "/usr/lib/apt/apt-helper"

LICENCE = (
    "Each description is part of its package's debian/control file and is distributed under that package's "
    "own licence (Debian main: DFSG-free licences; see /usr/share/doc/<package>/copyright)."
)

# --------------------------------------------------------------------------------------------------
# deb822 parsing


def parse_deb822(text: str) -> Iterator[dict[str, str]]:
    """Yield the stanzas of a deb822 file (Packages, Translation-*) as ``{field: value}``.

    Continuation lines (starting with a space or tab) are appended to the previous field's value after a
    newline, with their leading whitespace kept, so multi-line fields round-trip.
    """
    fields: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, None
            continue
        if line[0] in " \t":
            if last is not None:
                fields[last] += "\n" + line
            continue
        if line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        last = key.strip()
        fields[last] = value.strip()
    if fields:
        yield fields


_BULLET_RE = re.compile(r"^(?:[*+\-o\u2022]|\d+[.)])\s+")
_END_PUNCT = ".!?:;,"


def parse_description(desc: str) -> tuple[str, str]:
    """Split a ``Description`` value into (synopsis, long description as plain text).

    Follows Debian Policy 5.6.13: the first line is the synopsis; in the extended description a line holding
    only ``.`` is a paragraph break. Verbatim (deeper indented) lines are kept as text. Bullet markers are
    removed, a bullet item runs on over the following lines until the next bullet or paragraph, and an item
    that does not end in punctuation gets a full stop, so the text reads as prose. Paragraphs are joined
    with a space: the result is one line.
    """
    lines = desc.split("\n")
    synopsis = normalise_ws(lines[0])
    paragraphs: list[str] = []
    plain: list[str] = []  # running text of the current paragraph
    item: list[str] | None = None  # current bullet item (its continuation lines join it)

    def end_item() -> None:
        nonlocal item
        if item:
            text = normalise_ws(" ".join(item))
            if text and text[-1] not in _END_PUNCT:
                text += "."
            plain.append(text)
        item = None

    def end_paragraph() -> None:
        end_item()
        if plain:
            paragraphs.append(" ".join(plain))
        plain.clear()

    for raw in lines[1:]:
        line = raw[1:] if raw.startswith(" ") else raw.lstrip("\t")
        stripped = line.strip()
        if stripped == ".":
            end_paragraph()
            continue
        if not stripped:
            continue
        m = _BULLET_RE.match(stripped)
        if m:
            end_item()
            item = [stripped[m.end() :]]
        elif item is not None:
            item.append(stripped)
        else:
            plain.append(stripped)
    end_paragraph()
    text = " ".join(paragraphs)
    return synopsis, normalise_ws(text)


# --------------------------------------------------------------------------------------------------
# cleaning

_SYNOPSIS_DROP = re.compile(
    r"\btransi[a-z]*ional\b|\btransition package\b|\bdummy (?:transitional )?package\b|\bdummy transitional\b"
    r"|\bdebug(?:ging)? symbols?\b|\bdbgsym\b|\bdetached debug\b|\(obsolete[^)]*\)"
    r"|\bobsolete (?:version|metapackage|package)\b|\bdeprecated package\b|\bempty package\b",
    re.I,
)
_LONG_DROP = re.compile(
    r"\b(?:transitional|dummy|empty) (?:dummy |transitional )?package\b"
    r"|\bcan (?:be )?safely (?:be )?removed\b|\bthis package is obsolete\b",
    re.I,
)


def drop_reason(package: str, synopsis: str, long: str, section: str = "") -> str | None:
    """Why a description is unfit for the benchmark, or ``None`` if it is kept."""
    if package.endswith(("-dbg", "-dbgsym")) or section.split("/")[-1] == "debug":
        return "debug_package"
    if _SYNOPSIS_DROP.search(synopsis) or _LONG_DROP.search(long):
        return "transitional_dummy_debug"
    if not long:
        return "no_long_description"
    return None


def debian_pairs(translation_text: str, packages_text: str | None = None) -> tuple[list[Pair], Counter]:
    """Pairs (long description, synopsis) from a ``Translation-en`` text.

    ``packages_text`` (the suite's ``Packages`` index, optional) supplies each package's ``Source`` (used as
    the split group, so binary packages built from one source stay together) and ``Section`` (to drop the
    ``debug`` section). Without it each package is its own group.
    """
    meta: dict[str, tuple[str, str]] = {}
    if packages_text:
        for st in parse_deb822(packages_text):
            pkg = st.get("Package")
            if not pkg:
                continue
            source = st.get("Source", pkg).split()[0]
            meta.setdefault(pkg, (source, st.get("Section", "")))
    stats: Counter = Counter()
    pairs: list[Pair] = []
    for st in parse_deb822(translation_text):
        pkg = st.get("Package")
        desc = st.get("Description-en")
        if not pkg or desc is None:
            continue
        stats["stanzas"] += 1
        source, section = meta.get(pkg, (pkg, ""))
        synopsis, long = parse_description(desc)
        reason = drop_reason(pkg, synopsis, long, section)
        if reason:
            stats["drop_" + reason] += 1
            continue
        md5 = st.get("Description-md5", "")
        pairs.append(Pair(group=source, uid=f"debian:{pkg}:{md5[:8]}", document=long, summary=synopsis))
    return pairs, stats


# --------------------------------------------------------------------------------------------------
# fetching


def _read_index(path: Path) -> bytes:
    """Uncompressed bytes of an apt index file, via ``apt-helper cat-file`` (handles lz4/xz/gz/...)."""
    if Path(APT_HELPER).exists():
        return subprocess.run([APT_HELPER, "cat-file", str(path)], check=True, capture_output=True).stdout
    name = path.name
    if name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".xz"):
        import lzma

        return lzma.decompress(path.read_bytes())
    if name.endswith(".bz2"):
        import bz2

        return bz2.decompress(path.read_bytes())
    if "." not in name.rsplit("_", 1)[-1]:
        return path.read_bytes()
    raise RuntimeError(f"{APT_HELPER} is missing and {name} is in a format Python cannot read")


def _write_gz(path: Path, data: bytes) -> None:
    """gzip with a zero timestamp and no file name, so the bytes depend only on ``data``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as f,
    ):
        f.write(data)
    os.replace(tmp, path)


def cache_paths(cache_dir: Path, suite: str = DEFAULT_SUITE) -> dict[str, Path]:
    base = Path(cache_dir) / "debian" / suite
    return {
        "base": base,
        "translation": base / "Translation-en.gz",
        "packages": base / f"Packages-{DEFAULT_ARCH}.gz",
        "info": base / "fetch-info.json",
    }


def fetch_debian_indexes(
    cache_dir: Path,
    suite: str = DEFAULT_SUITE,
    mirror: str = DEFAULT_MIRROR,
    component: str = DEFAULT_COMPONENT,
    arch: str = DEFAULT_ARCH,
    refresh: bool = False,
    offline: bool = False,
) -> dict[str, Path]:
    """Make sure ``Translation-en`` and ``Packages`` of ``suite`` are in the cache; return their paths.

    With the files already cached (and ``refresh`` false) nothing is run. Otherwise ``apt-get update`` runs
    with a private configuration under ``<cache>/debian/<suite>/apt`` (needs apt and, normally, root: apt
    drops privileges to ``_apt`` for downloads).
    """
    paths = cache_paths(cache_dir, suite)
    if paths["translation"].exists() and paths["packages"].exists() and not refresh:
        return paths
    if offline:
        raise FileNotFoundError(f"no cached Debian indexes under {paths['base']} and offline=True")
    if shutil.which("apt-get") is None:
        raise RuntimeError("apt-get is needed to fetch the Debian indexes (or copy a cache from elsewhere)")
    apt = paths["base"].resolve() / "apt"
    if apt.exists():
        shutil.rmtree(apt)
    for d in ("lists/partial", "cache/archives/partial", "etc/apt.conf.d", "etc/sources.list.d", "state"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    (apt / "state" / "status").write_text("")
    (apt / "etc" / "sources.list").write_text(f"deb [signed-by={KEYRING}] {mirror} {suite} {component}\n")
    conf = {
        "Dir::Etc::main": "/dev/null",
        "Dir::Etc::parts": apt / "etc" / "apt.conf.d",
        "Dir::Etc::sourcelist": apt / "etc" / "sources.list",
        "Dir::Etc::sourceparts": apt / "etc" / "sources.list.d",
        "Dir::State": apt / "state",
        "Dir::State::lists": apt / "lists",
        "Dir::State::status": apt / "state" / "status",
        "Dir::Cache": apt / "cache",
        "Dir::Cache::pkgcache": "",
        "Dir::Cache::srcpkgcache": "",
        "Dir::Log": apt / "log",
        "APT::Architecture": arch,
        "APT::Architectures": arch,
        "Acquire::Languages": "en",
        "Acquire::GzipIndexes": "true",
        # Index staleness checks only; the InRelease signature is still verified against the keyring.
        "Acquire::Check-Valid-Until": "false",
        "Acquire::Check-Date": "false",
    }
    lines = []
    for k, v in conf.items():
        if k == "APT::Architectures":
            lines.append(f'{k} {{ "{v}"; }};')
        else:
            lines.append(f'{k} "{v}";')
    conf_file = apt / "etc" / "apt.conf"
    conf_file.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, APT_CONFIG=str(conf_file), LC_ALL="C")
    proc = subprocess.run(["apt-get", "-q", "update"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"apt-get update failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    lists = sorted((apt / "lists").iterdir())
    trans = [p for p in lists if f"_{component}_i18n_Translation-en" in p.name]
    pkgs = [p for p in lists if f"_{component}_binary-{arch}_Packages" in p.name]
    release = [p for p in lists if p.name.endswith(("_InRelease", "_Release"))]
    if not trans or not pkgs:
        raise RuntimeError(f"apt-get update fetched no Translation-en/Packages: {[p.name for p in lists]}")
    paths["base"].mkdir(parents=True, exist_ok=True)
    _write_gz(paths["translation"], _read_index(trans[0]))
    _write_gz(paths["packages"], _read_index(pkgs[0]))
    info = {"mirror": mirror, "suite": suite, "component": component, "arch": arch}
    if release:
        # Release fields follow the PGP armour header of InRelease; take the first occurrence of each.
        for line in release[0].read_text(errors="replace").splitlines():
            key, sep, value = line.partition(": ")
            if sep and key in ("Origin", "Suite", "Version", "Codename", "Date"):
                info.setdefault("release_" + key.lower(), value.strip())
    paths["info"].write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    # The raw apt lists are no longer needed: the gzip copies above are what the builder reads.
    shutil.rmtree(apt, ignore_errors=True)
    return paths


def load_debian(paths: dict[str, Path]) -> tuple[str, str | None, dict[str, object]]:
    """Texts of the cached indexes plus provenance (fetch info and sha256 of the cached files)."""
    raw_translation = gzip.decompress(paths["translation"].read_bytes())
    raw_packages = gzip.decompress(paths["packages"].read_bytes()) if paths["packages"].exists() else None
    translation = raw_translation.decode("utf-8", errors="replace")
    packages = raw_packages.decode("utf-8", errors="replace") if raw_packages is not None else None
    info: dict[str, object] = {}
    if paths["info"].exists():
        info.update(json.loads(paths["info"].read_text()))
    # Hash the uncompressed text: gzip bytes may differ between zlib versions.
    info["translation_sha256"] = sha256_bytes(raw_translation)
    if raw_packages is not None:
        info["packages_sha256"] = sha256_bytes(raw_packages)
    return translation, packages, info
