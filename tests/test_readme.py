"""The README's Python API section is a complete program: it runs as pasted."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_snippet() -> str:
    """The first ```python block of the README's "## Python API" section."""
    text = README.read_text()
    section = text[text.index("\n## Python API\n") :]
    section = section[: section.index("\n## ", 1)]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has no ```python block"
    return match.group(1)


def test_python_api_snippet_runs_as_pasted(tmp_path, monkeypatch, capsys) -> None:
    """Executed in a namespace of its own (every name it uses it must define or import), in an empty directory."""
    code = python_api_snippet()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, "README.md (Python API)", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    mass = re.search(r"\{'encoder': [0-9.e-]+, 'decoder': [0-9.e-]+, 'cross': [0-9.e-]+\}", printed)
    assert mass, printed[-2000:]  # the prior's attention mass per site kind, from the reloaded NV model
    assert (tmp_path / "nv-tiny-bart" / "nv_config.json").is_file()


def test_readme_run_config_is_complete_and_valid(tmp_path, monkeypatch) -> None:
    """The README's complete run config loads as a RunConfig (every key it shows exists, every value is allowed)."""
    from nvib.workflow.settings import RunConfig

    text = README.read_text()
    section = text[text.index("\n### Your own run\n") :]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert match, "the README's 'Your own run' section has no ```yaml block"
    (tmp_path / "run.yaml").write_text(match.group(1))
    config = RunConfig.load(tmp_path / "run.yaml")
    assert set(config.data.test) == {"target", "in_domain"} and config.search.metric == "nll"
    assert config.baselines.temperature and config.generation.num_beams == 4
