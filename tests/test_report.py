"""Tests for nvib.workflow.report."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import optuna
import torch

from nvib.workflow.formatting import format_difference, interval_decimals, metric_label
from nvib.workflow.metrics import BootstrapResult
from nvib.workflow.report import plot_differences, plot_knobs, plot_search_history, write_report
from nvib.workflow.search import run_search

optuna.logging.set_verbosity(optuna.logging.WARNING)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small_study() -> optuna.Study:
    def objective(knobs: dict[str, float], n: int) -> tuple[float, int]:
        return 30 - abs(min(knobs["alpha_tau_e"], 10.0) + 3) - 10 * knobs["stdev_tau_d"], 7 * n

    return run_search(
        objective,
        {"encoder", "decoder"},
        n_trials=12,
        storage=None,
        study_name="rep",
        slices=[2, 4],
        progress=False,
    )


RESULTS = {
    "unconverted": {"xsum": {"rouge1": 31.234, "rougeL": 24.5}, "cnn": {"rouge1": 40.01}},
    "NV equivalence": {"xsum": {"rouge1": 31.234, "rougeL": 24.5}, "cnn": {"rouge1": 40.01}},
    "NV tuned": {"xsum": {"rouge1": 32.875, "rougeL": 25.125}, "cnn": {"rouge1": 39.5}},
}
DIFFS = {
    "NV tuned": {
        "xsum": {
            "rouge1": BootstrapResult(1.641, 1.6, 0.512, 2.777, 0.01, 1000),
            "rougeL": (0.625, -0.25, 1.5),
        },
        "cnn": {"rouge1": (-0.51, -1.2, 0.3)},
    }
}
PRIOR_STATS = {
    f"encoder.layer.{i}.attention": {
        "mean": torch.full((8,), float(i)),
        "var": torch.ones(8) * (i + 1),
        "log_alpha_mean": -1.5 + i,
        "log_alpha_std": 0.25,
        "count": 100 + i,
    }
    for i in range(3)
}
PRIOR_MASS = {"encoder": 0.0123, "cross": 0.0456, "decoder": 0.0789}
DIVERSITY = {
    "unconverted": {"xsum": {"n": 4, "distinct": 1.0, "top_share": 0.25, "distinct_2": 0.875}},
    "NV tuned": {"xsum": {"n": 4, "distinct": 0.25, "top_share": 1.0, "distinct_2": 0.125}},
}


def test_write_report_writes_files_and_values(tmp_path: Path) -> None:
    study = small_study()
    paths = write_report(
        tmp_path,
        title="Test run",
        study=study,
        results=RESULTS,
        differences=DIFFS,
        baseline="unconverted",
        prior_stats=PRIOR_STATS,
        prior_mass=PRIOR_MASS,
        notes={"model": "tiny-<model>"},
        diversity=DIVERSITY,
    )
    assert paths.markdown == tmp_path / "report.md" and paths.markdown.is_file()
    assert paths.html == tmp_path / "report.html" and paths.html.is_file()
    assert set(paths.plots) == {"search_history", "knobs", "prior_stats", "prior_mass", "differences"}
    for p in paths.plots.values():
        assert p.parent == tmp_path / "plots"
        assert p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 2000

    html_text = paths.html.read_text(encoding="utf-8")
    md = paths.markdown.read_text(encoding="utf-8")
    for text in (html_text, md):
        # results table values and bootstrap differences, 2 decimals
        for value in ("31.23", "24.50", "40.01", "32.88", "25.12", "39.50"):
            assert value in text
        assert "Δ +1.64 [+0.51, +2.78]" in text
        assert "Δ -0.51 [-1.20, +0.30]" in text
        assert "unconverted" in text and "NV tuned" in text and "xsum rouge1" in text
        # search summary, prior statistics, prior mass
        assert f"{study.best_value:.4f}" in text
        assert "0.0456" in text and "encoder.layer.2.attention" in text
        assert "0.500 ± 0.250" in text  # log_alpha of layer 2
        assert "5.6569" in text  # ||mean|| of layer 2: sqrt(8 * 2**2)
        # diversity per variant and test set; the search's cost
        assert "1.000 / 0.250 / 0.875" in text and "0.250 / 1.000 / 0.125" in text
        assert "12 trials × " in text and " s per trial = " in text
    # The NV equivalence row has no difference cells.
    eq_row = re.search(r"<tr><td>NV equivalence</td>.*?</tr>", html_text)
    assert eq_row is not None and "Δ" not in eq_row.group(0)
    # HTML-escaped notes; self-contained images that decode to the written PNGs.
    assert "tiny-&lt;model&gt;" in html_text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html_text)
    assert len(images) == 5
    assert {base64.b64decode(i) for i in images} == {p.read_bytes() for p in paths.plots.values()}
    # Markdown links the files by relative path.
    for p in paths.plots.values():
        assert f"](plots/{p.name})" in md


def test_sections_are_optional(tmp_path: Path) -> None:
    paths = write_report(tmp_path, results={"unconverted": {"test": {"bleu": 12.0}}})
    assert paths.plots == {}
    md = paths.markdown.read_text(encoding="utf-8")
    assert "12.00" in md and "Knob search" not in md and "Prior" not in md
    assert "<img" not in paths.html.read_text(encoding="utf-8")


def test_plots_skip_study_without_complete_trials(tmp_path: Path) -> None:
    study = optuna.create_study()
    assert plot_search_history(study, tmp_path / "h.png") is None
    assert plot_knobs(study, tmp_path / "k.png") is None
    assert not list(tmp_path.iterdir())
    paths = write_report(tmp_path, study=study)
    assert "0 / 0 / 0" in paths.markdown.read_text(encoding="utf-8")


def test_rejected_trials_and_differences_plot(tmp_path: Path) -> None:
    from nvib.workflow.objectives import TrialResult

    def objective(knobs: dict[str, float], n: int) -> TrialResult:
        reject = "less diverse than the reference: distinct 0.100 < 0.5 × 1.000" if knobs["alpha_tau_e"] < 0 else None
        value = -abs(min(knobs["alpha_tau_e"], 10.0) - 2)
        return TrialResult(value, 3, {"diversity": DIVERSITY["NV tuned"]["xsum"]}, reject)

    study = run_search(objective, {"encoder"}, n_trials=8, storage=None, study_name="d", slices=[2], progress=False)
    rejected = [t for t in study.trials if "pruned_reason" in t.user_attrs]
    assert rejected
    md = write_report(tmp_path, study=study).markdown.read_text(encoding="utf-8")
    assert f"pruned for low output diversity | {len(rejected)} (trial #{rejected[0].number}: [2 examples] less" in md
    assert "best trial's dev diversity | 0.250 / 1.000 / 0.125" in md
    assert plot_differences({"NV": {"a": {"nll": (0.1, -0.2, 0.3)}}}, tmp_path / "d.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_differences({}, tmp_path / "e.png") is None


def test_differences_show_the_digits_their_interval_needs() -> None:
    # two significant digits of the interval's width: its rounded ends differ, and no Δ hides as "+0.00"
    assert format_difference(0.0004385, 0.0002635, 0.0006299, "nll") == "+0.00044 [+0.00026, +0.00063]"
    assert format_difference(1.641, 0.512, 2.777, "rouge1") == "+1.64 [+0.51, +2.78]"  # the metric's decimals at least
    assert format_difference(-12.5, -30.25, 4.0, "bleu") == "-12.50 [-30.25, +4.00]"
    assert format_difference(0.0, 0.0, 0.0, "nll") == "+0.000 [+0.000, +0.000]"  # an empty interval
    assert interval_decimals(0.5, float("nan"), 3) == 3
    for low in (-0.0173, 0.0002635, 1.0, 31.234):
        for width in (3e-7, 4.5e-5, 0.0099, 0.37, 12.0):
            d = interval_decimals(low, low + width)
            assert f"{low:.{d}f}" != f"{low + width:.{d}f}", (low, width, d)
            assert 10 ** (1 - d) <= width < 10 ** (2 - d)  # two digits of the width, no more
    assert metric_label("nll") == "nll (nats per target token)" and metric_label("rougeL") == "rougeL"


def test_report_table_shows_the_verdicts_digits_and_the_nll_unit(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    from nvib.workflow.evaluate import verdict

    titles: list[str] = []
    savefig = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda fig, *a, **k: (titles.append(fig.get_suptitle()), savefig(fig, *a, **k))
    )
    diff = BootstrapResult(0.0004385, 0.00044, 0.0002635, 0.0006299, 0.001, 1000)
    sentence = verdict("ood", "nll", diff, None, None)
    paths = write_report(
        tmp_path,
        results={"unconverted": {"ood": {"nll": 2.3456789}}, "NV tuned": {"ood": {"nll": 2.3461174}}},
        differences={"NV tuned": {"ood": {"nll": diff}}},
        baseline="unconverted",
        verdicts=[sentence],
    )
    assert "nll Δ +0.00044 nats per target token, 95% interval [+0.00026, +0.00063]" in sentence
    for text in (paths.markdown.read_text(encoding="utf-8"), paths.html.read_text(encoding="utf-8")):
        assert "ood nll (nats per target token)" in text  # the column names the unit
        assert "2.34612 (Δ +0.00044 [+0.00026, +0.00063])" in text  # the verdict's digits, the value's too
        assert "2.34568" in text and "+0.00 " not in text and "+0.000 " not in text
    assert titles == ["Difference to unconverted per test set (variant − unconverted, 95% paired-bootstrap interval)"]
