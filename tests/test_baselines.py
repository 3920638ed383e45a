"""The baselines beside NV (issue 22): attention temperature and WiSE-FT, their one-knob tuning, and the run that
tunes them with the knobs' objective, dev data and budget and reports NV against them."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from cases import ROTARY, TINY
from runs import run_config, save_tiny_model, write_config
from test_cli import invoke

from nvib.workflow.baselines import AttentionTemperature, WiseFT, tune
from nvib.workflow.evaluate import verdict
from nvib.workflow.metrics import BootstrapResult
from nvib.workflow.objectives import TrialResult


@pytest.mark.parametrize(
    "case", [c for c in TINY + ROTARY if c.name in ("bart", "gpt2", "llama")], ids=lambda c: c.name
)
def test_temperature_divides_every_attention_score(case) -> None:
    """At t the attention rows are softmax(scores / t): a_t ∝ a_1^(1/t); t = 1 (and reset) is the model itself.
    (T5 adds its relative position bias after the scaled q·k, which the temperature leaves as it is.)"""
    torch.manual_seed(0)
    model = case.build().eval().double()  # float64 scores (transformers still takes the softmax in float32)
    model.set_attn_implementation("eager")
    inputs = case.inputs()
    with torch.no_grad():
        plain = model(**inputs, output_attentions=True)
        temperature = AttentionTemperature(model)
        temperature.set(2.0)
        hot = model(**inputs, output_attentions=True)
        temperature.reset()
        again = model(**inputs, output_attentions=True)
    torch.testing.assert_close(again.logits, plain.logits, rtol=0, atol=0, equal_nan=True)  # (fully padded rows)
    names = [k for k in ("encoder_attentions", "decoder_attentions", "cross_attentions", "attentions") if k in plain]
    assert names
    for name in names:
        for a1, a2 in zip(plain[name], hot[name], strict=True):
            expected = a1.double().sqrt()
            expected = expected / expected.sum(-1, keepdim=True)
            torch.testing.assert_close(a2, expected, rtol=1e-4, atol=1e-6, equal_nan=True)  # float32 softmax


def test_wise_ft_interpolates_the_weights() -> None:
    case = next(c for c in TINY if c.name == "bart")
    torch.manual_seed(1)
    fine = case.build().eval()
    torch.manual_seed(2)
    pre = case.build().eval()
    inputs = case.inputs()
    with torch.no_grad():
        want_fine, want_pre = fine(**inputs).logits, pre(**inputs).logits
        wise = WiseFT(fine, pre)
        wise.set(0.0)
        assert torch.equal(fine(**inputs).logits, want_pre)
        wise.set(0.25)
        params = dict(fine.named_parameters())
        for name in wise.fine:
            if name in params:
                torch.testing.assert_close(params[name], torch.lerp(wise.pre[name], wise.fine[name], 0.25))
        wise.reset()
        assert torch.equal(fine(**inputs).logits, want_fine)


def test_wise_ft_refuses_another_architecture() -> None:
    bart, gpt2 = (next(c for c in TINY if c.name == n).build() for n in ("bart", "gpt2"))
    with pytest.raises(ValueError, match="same architecture"):
        WiseFT(bart, gpt2)


def test_temperature_range_must_hold_the_identity() -> None:
    model = next(c for c in TINY if c.name == "bart").build()
    with pytest.raises(ValueError, match="identity"):
        AttentionTemperature(model, 1.5, 2.0)


class _Quadratic:
    """A model-free objective: −(x − 1.3)² per slice, counting calls."""

    knob, identity, low, high = "temperature", 1.0, 0.5, 2.0
    calls = 0

    def __call__(self, knobs: dict, n: int) -> TrialResult:
        type(self).calls += 1
        return TrialResult(-((knobs["temperature"] - 1.3) ** 2))


def test_tune_finds_the_best_tries_the_identity_first_and_resumes(tmp_path: Path) -> None:
    class Fake(AttentionTemperature):
        def __init__(self):  # no model: set() is a no-op
            self.low, self.high, self.modules, self.scalings = 0.5, 2.0, [], []

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    kw = dict(n_trials=12, slices=[4], storage=storage, study_name="t", seed=0, n_startup_trials=3)
    value, study = tune(Fake(), _Quadratic(), **kw)
    assert study.trials[0].params == {"temperature": 1.0}
    assert abs(value - 1.3) < 0.15 and len(study.trials) == 12
    calls = _Quadratic.calls
    again, _ = tune(Fake(), _Quadratic(), **kw)  # resumed: nothing new runs
    assert again == value and _Quadratic.calls == calls


def _result(delta: float, low: float, high: float) -> BootstrapResult:
    return BootstrapResult(delta, delta, low, high, 0.5, 100)


def test_verdict_reads_the_intervals() -> None:
    text = verdict("ood", "nll", _result(-0.2, -0.3, -0.1), _result(0.01, -0.02, 0.04), "temperature")
    assert text.startswith("ood: NV tuned beat the unconverted model (nll Δ -0.2")
    assert "and did not beat the best baseline, temperature" in text
    assert "was worse than" in verdict("x", "rougeL", _result(-1, -2, -0.5), None, None)


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("baselines")
    fine = save_tiny_model(tmp / "fine")
    pre = save_tiny_model(tmp / "pre", seed=1)
    config = run_config(fine, baselines={"wise_ft": str(pre)})
    result = invoke("run", write_config(tmp / "run.yaml", config), "--run-dir", tmp / "out", "--no-progress")
    assert result.exit_code == 0, result.output
    return tmp / "out"


def test_run_tunes_the_baselines_and_reports_nv_against_them(baseline_run: Path) -> None:
    scores = json.loads((baseline_run / "scores.json").read_text())
    assert list(scores["results"]) == ["unconverted", "temperature", "wise_ft", "nv_equivalence", "nv_tuned"]
    record = json.loads((baseline_run / "baselines.json").read_text())
    assert record["metric"] == "nll" and record["best"] == scores["best_baseline"]
    for name in ("temperature", "wise_ft"):
        study = optuna.load_study(study_name=f"nvib-{name}", storage=f"sqlite:///{baseline_run / 'study.db'}")
        assert len(study.trials) == 4 and study.trials[0].params == {name: 1.0}  # the knobs' budget, identity first
        assert scores["baselines"][name] == record["baselines"][name]["value"]
        assert set(scores["differences"][name]["docstrings"]) == {"rouge1", "rouge2", "rougeL", "nll"}
    best = scores["best_baseline"]
    dev = {n: record["baselines"][n]["dev_objective"] for n in ("temperature", "wise_ft")}
    assert best == max(dev, key=dev.get)
    for test_set in ("docstrings", "debian"):
        against = scores["against_baseline"][test_set]["nll"]
        own = scores["results"]["nv_tuned"][test_set]["nll"] - scores["results"][best][test_set]["nll"]
        assert against["delta"] == pytest.approx(own)
        assert scores["verdicts"][test_set].startswith(f"{test_set}: NV tuned ")
    report = (baseline_run / "report.md").read_text()
    assert "## Verdict" in report and "the best baseline" in report and "WiSE-FT" in report


def test_baselines_can_be_switched_off(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "m")
    config = run_config(model, baselines={"temperature": False}, search={"n_trials": 1, "slices": [4]})
    result = invoke("run", write_config(tmp_path / "run.yaml", config), "--run-dir", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert list(scores["results"]) == ["unconverted", "nv_equivalence", "nv_tuned"] and scores["best_baseline"] is None
    assert not (tmp_path / "out" / "baselines.json").exists()


def test_wise_ft_model_that_does_not_exist(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "m")
    config = run_config(model, baselines={"wise_ft": str(tmp_path / "nope")})
    result = invoke("run", write_config(tmp_path / "run.yaml", config), "--run-dir", tmp_path / "out", "--no-progress")
    assert result.exit_code != 0 and "nope" in result.output and "Traceback" not in result.output


def test_run_on_datasets_by_name(tmp_path: Path) -> None:
    """`data:` entries as datasets (here local folders of the hub layout, the OPUS `translation` column for dev)."""
    from runs import DEMO_DATA

    rows = [json.loads(line) for line in (DEMO_DATA / "dev.jsonl").read_text().splitlines()[:8]]
    dev = tmp_path / "opus"
    dev.mkdir()
    (dev / "validation.jsonl").write_text(
        "".join(json.dumps({"translation": {"en": r["source"], "xx": r["target"]}}) + "\n" for r in rows)
    )
    config = run_config(
        save_tiny_model(tmp_path / "m"), baselines={"temperature": False}, search={"n_trials": 1, "slices": [4]}
    )
    config["data"]["dev"] = {"dataset": str(dev), "split": "validation", "translation": ["en", "xx"]}
    result = invoke("run", write_config(tmp_path / "run.yaml", config), "--run-dir", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.output
    identity = json.loads((tmp_path / "out" / "run.json").read_text())
    assert f"{dev} [validation]" in json.dumps(identity)
