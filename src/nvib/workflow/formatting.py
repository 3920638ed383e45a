"""How reports and logs write metric values: units, and decimals that follow a confidence interval's width.

A difference is shown with two significant digits of its interval's width (so the interval's ends differ), and at
least the metric's usual decimals: Δ = +0.0004385 in [+0.0002635, +0.0006299] reads ``+0.00044 [+0.00026,
+0.00063]``, not ``+0.00``. The verdict sentences and the report's tables use the same functions, so they agree.
"""

from __future__ import annotations

import math

__all__ = [
    "difference_parts",
    "format_difference",
    "interval_decimals",
    "metric_decimals",
    "metric_label",
    "metric_unit",
]

#: Units of the metrics that have one (ROUGE, BLEU and chrF are scores in points).
UNITS = {"nll": "nats per target token"}
#: Decimals a metric shows at least (NLL differences are often below 0.01).
MIN_DECIMALS = {"nll": 3}
DEFAULT_DECIMALS = 2
MAX_DECIMALS = 12


def metric_unit(metric: str) -> str:
    """The unit of ``metric``'s values, or "" where it has none."""
    return UNITS.get(metric, "")


def metric_label(metric: str) -> str:
    """``metric`` with its unit: ``"nll (nats per target token)"``, ``"rougeL"``."""
    unit = metric_unit(metric)
    return f"{metric} ({unit})" if unit else metric


def metric_decimals(metric: str) -> int:
    """The decimals ``metric``'s values show when no interval asks for more."""
    return MIN_DECIMALS.get(metric, DEFAULT_DECIMALS)


def interval_decimals(low: float, high: float, minimum: int = 0) -> int:
    """Decimals that show two significant digits of the width ``high - low`` (at least ``minimum``): enough that
    the interval's two ends, rounded, differ. ``minimum`` for an empty or non-finite interval."""
    width = abs(high - low)
    if not math.isfinite(width) or width == 0:
        return minimum
    return min(max(minimum, 1 - math.floor(math.log10(width))), MAX_DECIMALS)


def difference_parts(delta: float, low: float, high: float, metric: str) -> tuple[str, str]:
    """``("+0.00044", "[+0.00026, +0.00063]")``: a difference and its interval, with :func:`interval_decimals` (at
    least :func:`metric_decimals`)."""
    d = interval_decimals(low, high, metric_decimals(metric))
    return f"{delta:+.{d}f}", f"[{low:+.{d}f}, {high:+.{d}f}]"


def format_difference(delta: float, low: float, high: float, metric: str) -> str:
    """``"+0.00044 [+0.00026, +0.00063]"``: :func:`difference_parts` in one string."""
    return " ".join(difference_parts(delta, low, high, metric))
