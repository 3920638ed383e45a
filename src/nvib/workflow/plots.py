"""The report's plots (PNG): the search history, the knobs tried, the prior's statistics, the differences to the
unconverted model and the prior's attention mass. Inputs are plain data and an optional Optuna study; every file is
written atomically (`nvib.core.files`)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from nvib.core import files  # noqa: E402
from nvib.workflow.formatting import metric_label  # noqa: E402
from nvib.workflow.metrics import LOWER_IS_BETTER  # noqa: E402

__all__ = [
    "as_array",
    "completed_trials",
    "diff_parts",
    "maximizes",
    "objective_label",
    "plot_differences",
    "plot_knobs",
    "plot_prior_mass",
    "plot_prior_stats",
    "plot_search_history",
    "prior_rows",
]


def as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def diff_parts(d: Any) -> tuple[float, float, float]:
    """(delta, low, high) from a BootstrapResult-like object or a 3-sequence."""
    if hasattr(d, "delta"):
        return float(d.delta), float(d.ci_low), float(d.ci_high)
    delta, low, high = d
    return float(delta), float(low), float(high)


def completed_trials(study: Any) -> list[Any]:
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.value is not None]


def maximizes(study: Any) -> bool:
    return study.direction.name == "MAXIMIZE"


def objective_label(study: Any) -> str:
    """What a trial's value is: the dev metric with its unit (negated where lower is better: the search maximises)."""
    metric = study.user_attrs.get("metric")
    if metric is None:
        return "objective"
    sign = "−" if metric in LOWER_IS_BETTER and maximizes(study) else ""
    return f"dev {sign}{metric_label(metric)}"


def save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        with files.replacing(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# plots


def plot_search_history(study: Any, path: str | os.PathLike[str]) -> Path | None:
    """Metric per complete trial and the running best; pruned trials as ticks. None if no trial."""
    done = completed_trials(study)
    if not done:
        return None
    numbers = [t.number for t in done]
    values = [float(t.value) for t in done]
    best = np.maximum.accumulate(values) if maximizes(study) else np.minimum.accumulate(values)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(numbers, values, "o", color="tab:blue", alpha=0.7, label="trial")
    ax.step(numbers, best, where="post", color="tab:red", label="running best")
    pruned = [t.number for t in study.get_trials(deepcopy=False) if t.state.name == "PRUNED"]
    if pruned:
        for x in pruned:
            ax.axvline(x, color="0.85", lw=0.8, zorder=0)
        ax.plot([], [], color="0.85", label="pruned")
    eq = [t for t in done if t.user_attrs.get("start_point") == "equivalence"]
    if eq:
        ax.plot([eq[0].number], [eq[0].value], "*", ms=14, color="tab:green", label="equivalence")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective_label(study))
    ax.set_title("Search history: the dev objective per trial")
    ax.legend(fontsize=8)
    return save_figure(fig, Path(path))


def plot_knobs(study: Any, path: str | os.PathLike[str]) -> Path | None:
    """Scatter of the metric against each knob over complete trials. None if no trial."""
    done = completed_trials(study)
    names = sorted({k for t in done for k in t.params})
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        pts = [(t.params[name], t.value) for t in done if name in t.params]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, alpha=0.75)
        ax.set_xlabel(name)
        ax.set_ylabel(objective_label(study))
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("Dev objective against each knob")
    return save_figure(fig, Path(path))


def prior_rows(stats: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for site, s in stats.items():
        rows.append(
            {
                "site": site,
                "count": int(s.get("count", 0)),
                "mean_norm": float(np.linalg.norm(as_array(s["mean"]))),
                "mean_var": float(as_array(s["var"]).mean()),
                "log_alpha_mean": float(s["log_alpha_mean"]),
                "log_alpha_std": float(s["log_alpha_std"]),
            }
        )
    return rows


def plot_prior_stats(stats: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str]) -> Path | None:
    """Per site: L2 norm of the prior mean, mean prior variance, log-alpha mean ± std."""
    rows = prior_rows(stats)
    if not rows:
        return None
    x = np.arange(len(rows))
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.45 * len(rows) + 2), 8), sharex=True)
    axes[0].bar(x, [r["mean_norm"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("‖prior mean‖")
    axes[1].bar(x, [r["mean_var"] for r in rows], color="tab:orange")
    axes[1].set_ylabel("mean prior var")
    axes[2].errorbar(
        x, [r["log_alpha_mean"] for r in rows], yerr=[r["log_alpha_std"] for r in rows], fmt="o", capsize=3
    )
    axes[2].set_ylabel("log α (mean ± std)")
    axes[2].set_xticks(x, [r["site"] for r in rows], rotation=70, ha="right", fontsize=7)
    axes[0].set_title("Prior statistics per site")
    return save_figure(fig, Path(path))


def plot_differences(
    differences: Mapping[str, Mapping[str, Mapping[str, Any]]],
    path: str | os.PathLike[str],
    reference: str = "the reference",
) -> Path | None:
    """Δ = variant − ``reference`` with its interval, per test set (x) and variant (marker), one panel per metric.

    ``differences``: variant -> test set -> metric -> bootstrap result or ``(delta, low, high)``; ``reference``
    names what they are differences to (the title says it). None if empty.
    """
    metrics: list[str] = []
    sets: list[str] = []
    for per_set in differences.values():
        for test_set, per_metric in per_set.items():
            sets += [test_set] if test_set not in sets else []
            metrics += [m for m in per_metric if m not in metrics]
    if not metrics:
        return None
    variants = list(differences)
    cols = min(2, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.5, 1.2 * len(sets) + 2.5) * cols, 3.4 * rows), squeeze=False)
    axes = axes.flatten()
    for ax in axes[len(metrics) :]:
        ax.axis("off")
    width = 0.6 / max(len(variants), 1)
    for ax, metric in zip(axes, metrics, strict=False):
        for j, variant in enumerate(variants):
            xs, ys, lows, highs = [], [], [], []
            for i, test_set in enumerate(sets):
                d = differences[variant].get(test_set, {}).get(metric)
                if d is None:
                    continue
                delta, low, high = diff_parts(d)
                xs.append(i + (j - (len(variants) - 1) / 2) * width)
                ys.append(delta)
                lows.append(delta - low)
                highs.append(high - delta)
            if xs:
                ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o", capsize=4, label=variant)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xticks(range(len(sets)), sets, rotation=20, ha="right")
        ax.set_ylabel(f"Δ {metric_label(metric)}")
        ax.set_title(metric)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Difference to {reference} per test set (variant − {reference}, 95% paired-bootstrap interval)")
    return save_figure(fig, Path(path))


def plot_prior_mass(mass: Mapping[str, float], path: str | os.PathLike[str]) -> Path | None:
    """Bar chart of the attention mass on the prior component per site kind."""
    if not mass:
        return None
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(mass) + 1), 3.5))
    ax.bar(list(mass), [float(v) for v in mass.values()], color="tab:purple")
    ax.set_ylabel("attention mass on prior")
    ax.set_title("Prior attention mass per site kind")
    return save_figure(fig, Path(path))
