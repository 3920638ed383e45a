"""Write a run's report: ``report.md`` (PNG files linked) and a self-contained ``report.html``.

Inputs are plain Python data (dicts, lists, arrays or CPU tensors) plus an optional Optuna
study, so this module does not depend on the NV layers (only on `nvib.core.files`, which writes every file
atomically). User text (test-set names, paths) is escaped in both files. Every section is optional and left out
when its data is missing.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from nvib.core import files  # noqa: E402
from nvib.workflow.formatting import format_difference, interval_decimals, metric_decimals, metric_label  # noqa: E402
from nvib.workflow.plots import (  # noqa: E402
    completed_trials,
    diff_parts,
    plot_differences,
    plot_knobs,
    plot_prior_mass,
    plot_prior_stats,
    plot_search_history,
    prior_rows,
)

__all__ = [
    "ReportPaths",
    "plot_differences",
    "plot_knobs",
    "plot_prior_mass",
    "plot_prior_stats",
    "plot_search_history",
    "write_report",
]

PLOTS_DIR = "plots"


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_report` wrote things."""

    markdown: Path
    html: Path
    plots: dict[str, Path]


# ----------------------------------------------------------------------------------------------
# helpers


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float | np.floating):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


# ----------------------------------------------------------------------------------------------
# tables


def _results_table(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    differences: Mapping[str, Mapping[str, Mapping[str, Any]]] | None,
) -> tuple[list[str], list[list[str]]]:
    columns: list[tuple[str, str]] = []
    for per_set in results.values():
        for test_set, metrics in per_set.items():
            for metric in metrics:
                if (test_set, metric) not in columns:
                    columns.append((test_set, metric))
    header = ["variant"] + [f"{ts} {metric_label(m)}" for ts, m in columns]
    diffs = {
        (variant, ts, m): diff_parts(d)
        for variant, per_set in (differences or {}).items()
        for ts, per_metric in per_set.items()
        for m, d in per_metric.items()
    }
    # a column's values show as many decimals as its finest interval (each Δ as many as its own interval)
    decimals = {
        (ts, m): max(
            [metric_decimals(m)]
            + [interval_decimals(low, high) for (_, t, n), (_, low, high) in diffs.items() if (t, n) == (ts, m)]
        )
        for ts, m in columns
    }
    body = []
    for variant, per_set in results.items():
        row = [variant]
        for ts, m in columns:
            cell = _fmt(per_set.get(ts, {}).get(m), decimals[ts, m])
            if (variant, ts, m) in diffs:
                cell += f" (Δ {format_difference(*diffs[variant, ts, m], m)})"
            row.append(cell)
        body.append(row)
    return header, body


def _search_summary(study: Any) -> tuple[list[str], list[list[str]], list[list[str]]]:
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    timed = [float(t.user_attrs["wall_time_s"]) for t in trials if "wall_time_s" in t.user_attrs]
    wall = sum(timed)
    tokens = [t.user_attrs["n_tokens"] for t in trials if "n_tokens" in t.user_attrs]
    rejected = [t for t in trials if "pruned_reason" in t.user_attrs]
    summary = [
        ["study", study.study_name],
        ["direction", study.direction.name.lower()],
        [
            "complete / pruned / failed",
            f"{states.count('COMPLETE')} / {states.count('PRUNED')} / {states.count('FAIL')}",
        ],
        ["evaluation time (s)", f"{wall:.1f}"],
    ]
    if timed:
        summary.append(["cost", f"{len(timed)} trials × {wall / len(timed):.2f} s per trial = {wall:.1f} s"])
    if rejected:
        summary.append(
            [
                "pruned for low output diversity",
                f"{len(rejected)} (trial #{rejected[0].number}: {rejected[0].user_attrs['pruned_reason']})",
            ]
        )
    if tokens:
        summary.append(["generated tokens", str(int(sum(tokens)))])
    done = completed_trials(study)
    knob_rows: list[list[str]] = []
    if done:
        best = study.best_trial
        summary.append(["best trial", f"#{best.number}: {_fmt(float(best.value), 4)}"])
        eq = [t for t in done if t.user_attrs.get("start_point") == "equivalence"]
        if eq:
            summary.append(["equivalence trial", f"#{eq[0].number}: {_fmt(float(eq[0].value), 4)}"])
        if "diversity" in best.user_attrs:
            summary.append(["best trial's dev diversity", _diversity_cell(best.user_attrs["diversity"])])
        knobs = best.user_attrs.get("knobs", best.params)
        knob_rows = [[k, _fmt(float(v), 4)] for k, v in sorted(knobs.items())]
    return ["item", "value"], summary, knob_rows


def _diversity_cell(d: Mapping[str, float]) -> str:
    return f"{d['distinct']:.3f} / {d['top_share']:.3f} / {d['distinct_2']:.3f}"


def _diversity_table(
    diversity: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> tuple[list[str], list[list[str]]]:
    sets = list(dict.fromkeys(ts for per_set in diversity.values() for ts in per_set))
    body = [
        [variant] + [_diversity_cell(per_set[ts]) if ts in per_set else "–" for ts in sets]
        for variant, per_set in diversity.items()
    ]
    return ["variant", *sets], body


# ----------------------------------------------------------------------------------------------
# rendering


def _md_escape(text: Any) -> str:
    """``text`` as literal Markdown text in a table cell or a line: &, < and > as HTML entities (no live HTML in a
    renderer that shows it, e.g. a test-set name ``<img src=x onerror=...>``), ``|`` escaped, line breaks as spaces."""
    escaped = html.escape(str(text), quote=False).replace("|", "\\|")
    return " ".join(escaped.splitlines())


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    "th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;padding:.5em}"
)


def write_report(
    run_dir: str | os.PathLike[str],
    *,
    title: str = "NVIB report",
    study: Any | None = None,
    results: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    differences: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    baseline: str | None = None,
    prior_stats: Mapping[str, Mapping[str, Any]] | None = None,
    prior_mass: Mapping[str, float] | None = None,
    notes: Mapping[str, str] | None = None,
    diversity: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    verdicts: Sequence[str] | None = None,
    against: tuple[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> ReportPaths:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` under ``run_dir``.

    ``results``: variant -> test set -> metric -> value (rows "unconverted", "NV equivalence",
    "NV tuned", ...). ``differences``: variant -> test set -> metric -> bootstrap result of that
    variant minus ``baseline`` (a :class:`nvib.workflow.metrics.BootstrapResult` or ``(delta, low,
    high)``). ``prior_stats``: site -> {mean, var, log_alpha_mean, log_alpha_std, count}.
    ``prior_mass``: site kind -> attention mass on the prior. ``notes``: extra key/value lines
    (model, data, command...). ``diversity``: variant -> test set -> {distinct, top_share, distinct_2}
    (:class:`nvib.workflow.metrics.Diversity`). ``verdicts``: one sentence per test set, first in the report;
    ``against``: (label, test set -> metric -> bootstrap result of NV tuned minus that baseline). The HTML embeds the
    PNGs; the Markdown links them; ``differences`` are also plotted per test set with their intervals.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    # (heading, markdown body, html body); images referenced as {img:name}
    sections: list[tuple[str, str, str]] = []

    def image(name: str, alt: str) -> tuple[str, str]:
        rel = f"{PLOTS_DIR}/{plots[name].name}"
        data = base64.b64encode(plots[name].read_bytes()).decode("ascii")
        return f"![{alt}]({rel})", f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'

    if notes:
        rows = [[k, v] for k, v in notes.items()]
        sections.append(("Run", _md_table(["item", "value"], rows), _html_table(["item", "value"], rows)))

    if verdicts:
        md = "\n".join(f"- {_md_escape(v)}" for v in verdicts)
        ht = "<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in verdicts) + "</ul>"
        if against is not None:
            label, per_set = against
            header = ["test set", "metric", f"NV tuned − {label} (Δ, 95% paired-bootstrap interval)"]
            body = [
                [ts, metric_label(m), format_difference(*diff_parts(r), m)]
                for ts, per in per_set.items()
                for m, r in per.items()
            ]
            md += "\n\n" + _md_table(header, body)
            ht += _html_table(header, body)
        sections.append(("Verdict", md, ht))

    if results:
        header, body = _results_table(results, differences)
        caption = (
            f"Differences Δ are relative to **{baseline}**, with the 95% paired-bootstrap interval."
            if differences and baseline
            else ("Differences Δ carry the 95% paired-bootstrap interval." if differences else "")
        )
        md = (caption + "\n\n" if caption else "") + _md_table(header, body)
        ht = (f"<p>{html.escape(caption.replace('**', ''))}</p>" if caption else "") + _html_table(header, body)
        if differences:
            reference = baseline or "the reference"
            p = plot_differences(differences, run / PLOTS_DIR / "differences.png", reference)
            if p is not None:
                plots["differences"] = p
                m, h = image("differences", f"difference to {reference} per test set, with intervals")
                md += "\n\n" + m
                ht += h
        sections.append(("Results", md, ht))

    if diversity:
        header, body = _diversity_table(diversity)
        caption = (
            "Per test set: distinct predictions / n, share of the most frequent prediction, distinct-2 "
            "(distinct word bigrams / all bigrams)."
        )
        sections.append(
            (
                "Output diversity",
                caption + "\n\n" + _md_table(header, body),
                f"<p>{html.escape(caption)}</p>" + _html_table(header, body),
            )
        )

    if study is not None:
        header, summary, knob_rows = _search_summary(study)
        md, ht = _md_table(header, summary), _html_table(header, summary)
        if knob_rows:
            md += "\n\nBest knobs:\n\n" + _md_table(["knob", "value"], knob_rows)
            ht += "<p>Best knobs:</p>" + _html_table(["knob", "value"], knob_rows)
        for name, fn, alt in (
            ("search_history", plot_search_history, "search history"),
            ("knobs", plot_knobs, "metric against each knob"),
        ):
            p = fn(study, run / PLOTS_DIR / f"{name}.png")
            if p is not None:
                plots[name] = p
                m, h = image(name, alt)
                md += "\n\n" + m
                ht += h
        sections.append(("Knob search", md, ht))

    if prior_stats:
        rows = [
            [
                r["site"],
                str(r["count"]),
                _fmt(r["mean_norm"], 4),
                _fmt(r["mean_var"], 4),
                f"{r['log_alpha_mean']:.3f} ± {r['log_alpha_std']:.3f}",
            ]
            for r in prior_rows(prior_stats)
        ]
        header = ["site", "count", "‖mean‖", "mean var", "log α"]
        plots["prior_stats"] = plot_prior_stats(prior_stats, run / PLOTS_DIR / "prior_stats.png")  # type: ignore[assignment]
        m, h = image("prior_stats", "prior statistics per site")
        sections.append(("Prior statistics", _md_table(header, rows) + "\n\n" + m, _html_table(header, rows) + h))

    if prior_mass:
        rows = [[k, _fmt(float(v), 4)] for k, v in prior_mass.items()]
        plots["prior_mass"] = plot_prior_mass(prior_mass, run / PLOTS_DIR / "prior_mass.png")  # type: ignore[assignment]
        m, h = image("prior_mass", "attention mass on the prior per site kind")
        header = ["site kind", "prior mass"]
        sections.append(("Attention on the prior", _md_table(header, rows) + "\n\n" + m, _html_table(header, rows) + h))

    md_text = f"# {_md_escape(title)}\n\n" + "\n\n".join(f"## {h}\n\n{md}" for h, md, _ in sections) + "\n"
    html_text = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        + "".join(f"<h2>{html.escape(h)}</h2>{ht}" for h, _, ht in sections)
        + "</body></html>\n"
    )
    md_path, html_path = run / "report.md", run / "report.html"
    files.write_text(md_path, md_text)
    files.write_text(html_path, html_text)
    return ReportPaths(md_path, html_path, plots)
