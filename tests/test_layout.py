"""The house rules of docs/architecture.md that import-linter (`make lint`) does not check: no module of nvib
imports, or reaches through a module for, a private name (`_x`) of another; and the page names every module."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import nvib

SRC = Path(nvib.__file__).parent
ROOT = Path(__file__).resolve().parent.parent


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    modules: set[str] = set()  # local names bound to nvib modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nvib"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
                if importlib.util.find_spec(f"{node.module}.{alias.name}") if _is_package(node.module) else False:
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("nvib"))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name | ast.Attribute)
            and _root(node.value) in modules
        ):
            found.append(f"{path.name}:{node.lineno} reaches for {ast.unparse(node)}")
    return found


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_no_module_uses_a_private_name_of_another() -> None:
    found = [use for path in sorted(SRC.rglob("*.py")) for use in _private_uses(path)]
    assert not found, "\n".join(found)


def test_the_check_finds_a_private_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from nvib.core.layer import _x\nfrom nvib.core import masks\nmasks._SPLIT_BIAS.clear()\n")
    assert len(_private_uses(bad)) == 2


def test_import_nvib_needs_only_torch_transformers_safetensors() -> None:
    """`import nvib` and a convert/prior round trip work where optuna, pydantic, rouge-score and rich are missing
    (the GPU machine of issue 25 has none of them)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('optuna', 'pydantic', 'rouge_score', 'rich', 'typer', 'sacrebleu'): sys.modules[m] = None\n"
        "import torch, transformers as tf, nvib\n"
        "cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,"
        " num_key_value_heads=2, intermediate_size=64)\n"
        "model = tf.LlamaForCausalLM(cfg).eval()\n"
        "ids = torch.randint(0, 64, (2, 8))\n"
        "prior = nvib.EmpiricalPrior.estimate(model, [{'input_ids': ids}], progress=False)\n"
        "nvib.convert(model, nvib.NVConfig(alpha_tau_d=0.0, stdev_tau_d=0.5), prior=prior)(ids)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _unlisted(tree: Path, page: str) -> tuple[list[str], list[str]]:
    """Modules under `tree` (a `nvib` package directory; packages by their __init__) that `page` does not name as
    `nvib/...py`, and the names on the page that are no module."""
    modules = {f"nvib/{p.relative_to(tree).as_posix()}" for p in tree.rglob("*.py")}
    named = set(re.findall(r"`(nvib/[\w/]+\.py)`", page))
    return sorted(modules - named), sorted(named - modules)


def test_the_architecture_page_names_every_module() -> None:
    """docs/architecture.md gives every module of src/nvib its line, and names no module that is gone."""
    missing, gone = _unlisted(ROOT / "src" / "nvib", (ROOT / "docs" / "architecture.md").read_text())
    assert not missing, f"modules without a line in docs/architecture.md: {missing}"
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"


def test_the_page_check_finds_a_new_module(tmp_path: Path) -> None:
    (tmp_path / "core").mkdir()
    for name in ("__init__.py", "core/__init__.py", "core/new.py"):
        (tmp_path / name).write_text("")
    page = "| `nvib/__init__.py` | x |\n| `nvib/core/__init__.py` | x |\n| `nvib/core/old.py` | x |\n"
    assert _unlisted(tmp_path, page) == (["nvib/core/new.py"], ["nvib/core/old.py"])


MAX_MODULE_LINES, MAX_CLASS_LINES = 500, 200  # one job per module and per class (docs/architecture.md)


def test_no_module_or_class_outgrows_one_job() -> None:
    """Every module under src/nvib has at most 500 lines and every class at most 200: a room that grows past that
    holds more than one job and is split by job (as the prior, the run and the command line were)."""
    too_long = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(SRC)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and (n := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES:
                too_long.append(f"{path.relative_to(SRC)}: class {node.name} {n} lines")
    assert not too_long, too_long
