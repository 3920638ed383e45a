"""Nothing lost, nothing run that the user did not ask for (issue 36, part A): atomic outputs, no partial prior over a
complete one, no remote code, no package imported to find a path, escaped reports, checked NV layers, one line
instead of a traceback for a full disk or a damaged file, valid JSON, and quiet warnings."""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import json
import os
import resource
import signal
import sys
import types
import warnings
from pathlib import Path

import optuna
import pytest
import torch
import transformers as tf
from cases import TINY
from rich.console import Console
from runs import DEMO_DATA, run_config, save_tiny_model, write_config
from safetensors.torch import load_file, save_file
from test_cli import assert_user_error, invoke

import nvib
from nvib.core import files
from nvib.core.prior import EmpiricalPrior
from nvib.core.saving import NV_WEIGHTS
from nvib.workflow import baselines
from nvib.workflow.data import Example
from nvib.workflow.objectives import DevObjective, Output
from nvib.workflow.report import write_report
from nvib.workflow.run import Run
from nvib.workflow.settings import RunConfig, resolve_path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = DEMO_DATA / "train.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bart")


@pytest.fixture(scope="module")
def nv_dir(model_dir: Path, tmp_path_factory) -> Path:
    """A tiny NV model directory written by nvib.save (with its tokenizer)."""
    model = tf.AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    return nvib.save(nvib.convert(model), tmp_path_factory.mktemp("nv") / "nv", tokenizer=tokenizer)


def prior_cmd(model_dir: Path, out: Path):
    return invoke(
        "prior", model_dir, TRAIN, "-o", out, "--limit", "16", "--batch-size", "8", "--max-source-len", "32",
        "--no-progress",
    )  # fmt: skip


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail (EFBIG) as on a full disk, in this process, for the block."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


# ---- item 1: a partial prior never replaces a complete one; every output is replaced atomically -------------------


def test_interrupted_prior_keeps_the_complete_one(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    keep = tmp_path / "keep.safetensors"
    assert prior_cmd(model_dir, keep).exit_code == 0
    before = keep.read_bytes()
    real = __import__("nvib.workflow.stages.prior", fromlist=["batches"]).batches

    def interrupted(*args, **kwargs):  # Ctrl-C after the first batch of the new estimate
        it = real(*args, **kwargs)
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr("nvib.workflow.stages.prior.batches", interrupted)
    result = prior_cmd(model_dir, keep)
    assert result.exit_code == 130, result.output
    assert keep.read_bytes() == before
    partial = tmp_path / "keep.partial.safetensors"
    assert EmpiricalPrior.load(partial).metadata["complete"] is False
    text = " ".join(result.output.split())
    assert f"saved to {partial}" in text and f"{keep} still holds the complete prior" in text


def test_torn_prior_in_the_run_dir_is_estimated_again(model_dir: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole.safetensors"
    assert prior_cmd(model_dir, whole).exit_code == 0
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "prior.safetensors").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # killed mid-write
    log = io.StringIO()
    config = RunConfig.load(write_config(tmp_path / "run.yaml", run_config(model_dir)))
    prior = Run(config, run_dir, console=Console(file=log, width=400), progress=False).prior()
    assert prior.metadata["complete"] and EmpiricalPrior.load(run_dir / "prior.safetensors").metadata["complete"]
    assert "estimating it again" in log.getvalue()


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "scores.json"
    target.write_text('{"old": 1}\n')

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)  # Ctrl-C after the new bytes, before the rename
    with pytest.raises(KeyboardInterrupt):
        files.write_json(target, {"new": 2})
    assert target.read_text() == '{"old": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["scores.json"]


def test_prior_files_get_the_mode_of_every_other_output(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    assert prior_cmd(model_dir, out).exit_code == 0
    (tmp_path / "other.txt").write_text("x")  # what any new file gets here (0666 less the umask)
    assert out.stat().st_mode & 0o777 == (tmp_path / "other.txt").stat().st_mode & 0o777


def test_saved_model_weights_get_the_mode_of_every_other_output(nv_dir: Path) -> None:
    """safetensors 0.8 leaves what save_pretrained writes at 0600; a saved model is readable like its config."""
    modes = {(nv_dir / name).stat().st_mode & 0o777 for name in ("config.json", "model.safetensors", NV_WEIGHTS)}
    assert len(modes) == 1


# ---- item 2: no remote code ------------------------------------------------------------------------------------


def test_a_model_with_custom_code_never_runs_it(tmp_path: Path) -> None:
    model = tmp_path / "custom"
    model.mkdir()
    marker = tmp_path / "ran"
    (model / "probe.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = {
        "model_type": "nvib_probe",
        "architectures": ["ProbeForCausalLM"],
        "auto_map": {"AutoConfig": "probe.ProbeConfig", "AutoModelForCausalLM": "probe.ProbeForCausalLM"},
    }
    (model / "config.json").write_text(json.dumps(config))
    result = CliRunnerWithInput("y\n").invoke("prior", model, TRAIN, "-o", tmp_path / "p.safetensors")  # `echo y |`
    assert not marker.exists()
    assert_user_error(result, "needs custom code", "which nvib never runs", "Fix:")


class CliRunnerWithInput:
    def __init__(self, text: str):
        self.text = text

    def invoke(self, *args):
        from typer.testing import CliRunner

        from nvib.cli import app

        return CliRunner().invoke(app, [str(a) for a in args], input=self.text)


def test_every_transformers_load_refuses_remote_code() -> None:
    """Every from_pretrained / load_dataset call in src/nvib passes trust_remote_code=False itself, through
    NO_REMOTE_CODE or a dict made with it, or sets it first (nvib.load)."""
    loads = []
    for path in sorted((ROOT / "src" / "nvib").rglob("*.py")):
        tree = ast.parse(path.read_text())
        safe = {"NO_REMOTE_CODE", "trust_remote_code=False"}
        for node in ast.walk(tree):  # names bound to dicts that hold it (`only = {..., **NO_REMOTE_CODE}`)
            if isinstance(node, ast.Assign) and "NO_REMOTE_CODE" in ast.unparse(node.value):
                safe |= {f"**{t.id}" for t in node.targets if isinstance(t, ast.Name)}
        preset = "setdefault('trust_remote_code', False)" in ast.unparse(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if (
                node.func.attr.startswith("from_")
                and "pretrained" in node.func.attr
                or node.func.attr == "load_dataset"
            ):
                text = ast.unparse(node)
                ok = preset or "trust_remote_code=False" in text or any(s in text for s in safe)
                loads.append((f"{path.name}:{node.lineno}", ok))
    assert len(loads) >= 6 and all(ok for _, ok in loads), [where for where, ok in loads if not ok]


# ---- item 3: package: paths are found without importing ------------------------------------------------------


def test_package_path_does_not_run_the_package(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "imported"
    pkg = tmp_path / "site" / "nvibprobe"
    (pkg / "sub" / "model").mkdir(parents=True)
    for init in (pkg / "__init__.py", pkg / "sub" / "__init__.py"):
        init.write_text(f"open({str(marker)!r}, 'a').write({init.parent.name!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_path("package:nvibprobe.sub/model") == pkg / "sub" / "model"
    assert resolve_path("package:nvibprobe/sub") == pkg / "sub"
    assert not marker.exists() and "nvibprobe" not in sys.modules
    with pytest.raises(FileNotFoundError, match="'nvibprobe.nothing' is not installed"):
        resolve_path("package:nvibprobe.nothing/x")
    assert resolve_path("package:nvib/demo_data") == DEMO_DATA


# ---- item 4: report.md escapes user text; no unsafe torch.load ---------------------------------------------------


def test_report_markdown_escapes_user_text(tmp_path: Path) -> None:
    evil = "<img src=x onerror=alert(1)>"
    paths = write_report(
        tmp_path,
        title=f"NVIB run: {evil}",
        results={"unconverted": {f"{evil}|x": {"bleu": 1.0}}},
        notes={"train (prior)": f"/data/{evil} & co"},
        verdicts=[f"{evil}: NV tuned did not beat the unconverted model."],
    )
    for text in (paths.markdown.read_text(), paths.html.read_text()):
        assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    md = paths.markdown.read_text()
    assert "&gt;\\|x bleu" in md and "&amp; co" in md  # a pipe in a name does not split the table's cells


def test_no_torch_load_runs_pickled_code() -> None:
    found = []
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                if "weights_only=True" not in ast.unparse(node):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found


# ---- item 8: NV layers are checked ------------------------------------------------------------------------------


def test_nv_layers_with_non_finite_values_are_refused(nv_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in nv_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(str(bad / "nv_layers.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(bad / "nv_layers.safetensors"))
    with pytest.raises(ValueError, match=rf"nv_layers.safetensors: {name} has NaN or infinite values.*Fix:"):
        nvib.load(bad)


# ---- item 12: one line, not a traceback -------------------------------------------------------------------------


def test_full_disk_while_writing_the_prior_is_one_line(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    keep = tmp_path / "keep.safetensors"
    assert prior_cmd(model_dir, keep).exit_code == 0
    before = keep.read_bytes()
    save = EmpiricalPrior.save

    def on_a_full_disk(self, path):
        with file_size_limit(4096):
            save(self, path)

    monkeypatch.setattr(EmpiricalPrior, "save", on_a_full_disk)
    result = prior_cmd(model_dir, keep)
    assert_user_error(result, f"while writing {keep}", "Fix: free space on that disk")
    assert keep.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


def test_full_disk_while_writing_the_report_keeps_the_old_one(tmp_path: Path) -> None:
    old = write_report(tmp_path, results={"unconverted": {"test": {"bleu": 12.0}}}).markdown.read_text()
    with file_size_limit(64), pytest.raises(OSError, match=r"while writing .*report.md\. Fix: free space"):
        write_report(tmp_path, results={"unconverted": {"test": {"bleu": 13.0}}})
    assert (tmp_path / "report.md").read_text() == old


def test_finetune_on_a_truncated_nv_directory_is_one_line(nv_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in nv_dir.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.name == "nv_layers.safetensors" else data)
    result = invoke("finetune", bad, TRAIN, "-o", tmp_path / "out", "--max-steps", "1", "--no-progress")
    assert_user_error(result, "nv_layers.safetensors cannot be read", "damaged or truncated", "Fix: save the model")


def test_ctrl_c_in_a_baseline_study_logs_no_failed_trial(capfd, tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # as the CLI sets it
    try:
        baseline = types.SimpleNamespace(knob="temperature", low=0.5, high=2.0, identity=1.0, reset=lambda: None)

        def objective(knobs, n):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            baselines.tune(
                baseline,
                objective,
                n_trials=2,
                slices=[1],
                storage=f"sqlite:///{tmp_path / 't.db'}",
                study_name="t",
                seed=0,
            )
        assert optuna.logging.get_verbosity() == optuna.logging.ERROR
        assert "failed" not in capfd.readouterr().err
    finally:
        optuna.logging.set_verbosity(optuna.logging.INFO)


# ---- item 15: valid JSON, warnings once and alike ---------------------------------------------------------------


def strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_saved_files_are_strict_json_and_old_infinity_still_loads(nv_dir: Path, tmp_path: Path) -> None:
    info = strict_json((nv_dir / "nv_config.json").read_text())
    assert info["nv_config"]["alpha_tau_e"] == "inf"
    assert nvib.load(nv_dir).nv_config.alpha_tau_e == float("inf")
    nvib.NVConfig(alpha_tau_d=float("inf"), stdev_tau_d=0.5).save(tmp_path / "knobs.json")
    assert strict_json((tmp_path / "knobs.json").read_text())["alpha_tau_d"] == "inf"
    assert nvib.NVConfig.load(tmp_path / "knobs.json") == nvib.NVConfig(stdev_tau_d=0.5)
    (tmp_path / "old.json").write_text(json.dumps(nvib.NVConfig().to_dict()))  # Infinity, as older files hold it
    assert "Infinity" in (tmp_path / "old.json").read_text()
    assert nvib.NVConfig.load(tmp_path / "old.json") == nvib.NVConfig()
    files.write_json(tmp_path / "scores.json", {"nll": float("nan"), "ci": [float("-inf"), 1.0]})
    assert strict_json((tmp_path / "scores.json").read_text()) == {"nll": "nan", "ci": ["-inf", 1.0]}


def test_configure_warns_of_a_visible_prior_as_convert_does() -> None:
    case = TINY[0]
    torch.manual_seed(0)
    model = case.build().eval()
    prior = EmpiricalPrior.estimate(model, [case.inputs(seed=s) for s in (1, 2)], progress=False)
    finite = nvib.NVConfig(alpha_tau_e=0.0, alpha_tau_c=0.0, alpha_tau_d=0.0, alpha_scale_min=0.0)
    with pytest.warns(UserWarning, match="finite alpha_tau .* visible weight"):
        nvib.convert(copy.deepcopy(model), finite, prior=prior)
    nv = nvib.convert(model, prior=prior)
    with pytest.warns(UserWarning, match="finite alpha_tau .* visible weight"):
        nvib.configure(nv, finite)


def test_the_stdev_clamp_is_said_once_per_search() -> None:
    case = TINY[0]
    torch.manual_seed(0)
    model = case.build().eval()
    prior = EmpiricalPrior.estimate(model, [case.inputs(seed=s) for s in (1, 2)], progress=False)
    nv = nvib.convert(model, nvib.NVConfig(stdev_unit="bias"), prior=prior)

    class Evaluator:
        task, metrics, model = "summarisation", ("nll",), nv

        def outputs(self, examples, description, *, generate, score):
            return [Output(None, 1, 0.0, 1) for _ in examples]

    objective = DevObjective(Evaluator(), [Example("a b", "c")], "nll", config=nvib.NVConfig(stdev_unit="bias"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for tau in (60.0, 70.0, 80.0):  # far above any mixture's spread: clamped at every trial
            objective.outputs({"stdev_tau_e": tau, "stdev_tau_d": tau, "stdev_tau_c": tau, "alpha_tau_d": 0.0}, 1)
    said = [str(w.message) for w in caught]
    assert sum("stdev_tau is above" in m for m in said) == 1, said
    assert not any("visible weight" in m for m in said)  # the search chose the finite alpha_tau
