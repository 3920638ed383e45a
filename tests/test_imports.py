"""What importing nvib costs: the command line's --help loads no torch; ``import nvib`` is still the public API.

Timings are measured by ``benchmarks/cli_speed.py``, not here: these tests check which modules get imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "optuna", "datasets", "matplotlib", "numpy", "pandas", "sklearn")

# prints the heavy top-level packages imported by the statements before it, as a JSON list
REPORT = f"import sys, json; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"


def heavy_imports(code: str) -> list[str]:
    """The heavy packages a fresh interpreter has imported after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\n{REPORT}"], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_cli_loads_no_heavy_package() -> None:
    assert heavy_imports("import nvib.cli") == []


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["finetune", "--help"], ["prior", "--help"]])
def test_help_loads_no_heavy_package(args: list[str]) -> None:
    code = (
        "from nvib.cli import app\n"
        "try:\n"
        f"    app({args!r}, prog_name='nvib')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
    )
    assert heavy_imports(code) == []


def test_public_api_resolves_lazily() -> None:
    code = (
        "import sys\n"
        "import nvib\n"
        "assert 'torch' not in sys.modules\n"
        "assert set(nvib.__all__) <= set(dir(nvib)), set(nvib.__all__) - set(dir(nvib))\n"
        "from nvib import EmpiricalPrior, NVConfig, convert, load, save\n"
        "from nvib.core.convert import convert as direct\n"
        "assert convert is direct and nvib.convert is direct\n"
        "assert EmpiricalPrior.__module__ == 'nvib.core.prior'\n"
        "names = [n for n in nvib.__all__ if getattr(nvib, n) is None]\n"
        "assert not names, names\n"
    )
    assert "torch" in heavy_imports(code)  # the names resolved, importing the core


def test_unknown_attribute_is_an_attribute_error() -> None:
    import nvib

    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        nvib.nonexistent  # noqa: B018
    assert not hasattr(nvib, "nonexistent")
