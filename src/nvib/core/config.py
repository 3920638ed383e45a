"""`NVConfig`: the regularisation knobs of an NV model (docs/method.md §3)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path

from nvib.core import files

KINDS = ("encoder", "cross", "decoder")
SUFFIX = {"encoder": "e", "cross": "c", "decoder": "d"}  # site kind -> knob suffix
STDEV_UNITS = (None, "prior", "bias")
#: τ_α of the old finite identity point: at τ_α = +∞ the tokens' pseudo-counts keep this bias (training samples as it)
IDENTITY_ALPHA_TAU = 10.0
KNOBS = tuple(f"{p}_{s}" for p in ("alpha_tau", "stdev_tau") for s in SUFFIX.values())  # the six searched knobs

TEXT_FIELDS = ("centre_alpha", "stdev_unit")  # the fields that are not numbers
NON_FINITE = ("inf", "-inf", "nan")  # how JSON files hold non-finite knobs (`nvib.core.files.json_safe`)
STDEV_MEANING = '; it is a width in prior standard deviations (stdev_unit "prior") or nats of score spread ("bias")'
#: Knob prefix -> (low, high, whether low itself is allowed): ranges inside which every term of docs/method.md §3-6
#: stays finite in float32 and bfloat16 (tests/test_bad_input.py::test_knob_bounds_keep_outputs_finite).
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "alpha_tau": (-1e3, 1e3, True),
    "stdev_tau": (0.0, 1e2, True),
    "mu_tau": (0.0, 10.0, False),
    "alpha_scale_min": (0.0, 1e3, True),
}


def _non_finite(field: str, value: object) -> bool:
    """Whether ``value`` is a knob's non-finite value as JSON files hold it ("inf", "-inf", "nan")."""
    return field not in TEXT_FIELDS and isinstance(value, str) and value in NON_FINITE


def bounds(name: str) -> tuple[float, float, bool] | None:
    """(low, high, low allowed) of a knob such as ``alpha_tau_c`` or ``mu_tau``; None if it has no bounds."""
    return BOUNDS.get(name, BOUNDS.get(name.rsplit("_", 1)[0]))


@dataclasses.dataclass(frozen=True)
class NVConfig:
    """Knobs per site kind (e = encoder self-attention, c = cross-attention, d = decoder self-attention).

    The defaults are the equivalence setting: the NV model computes what the pretrained model computes, exactly,
    whatever the prior: τ_α = +∞ removes the prior component from the attention (a finite τ_α keeps §11's meaning).
    """

    alpha_tau_e: float = math.inf
    alpha_tau_c: float = math.inf
    alpha_tau_d: float = math.inf
    stdev_tau_e: float = 0.0
    stdev_tau_c: float = 0.0
    stdev_tau_d: float = 0.0
    mu_tau: float = 1.0
    # docs/method.md §11: b_α = τ_α·max(ς, alpha_scale_min) (+ δ_0 where centred); 0 gives the original code's τ_α·ς
    alpha_scale_min: float = 1.0
    # centre τ_α on an average in-domain token (docs/method.md §11); key-space sites
    # (docs/method.md §10) are always centred
    centre_alpha: bool = False
    # the unit of stdev_tau: "prior" (docs/method.md §3: σ = τ_σ·s_0) or "bias" (docs/method.md §12: τ_σ nats of spread
    # of the score bias the variance adds); None: each site's default, "prior" in z-space and "bias" in key space
    stdev_unit: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.centre_alpha, bool):
            raise ValueError(f"NVConfig.centre_alpha must be True or False, got {self.centre_alpha!r}")
        if self.stdev_unit not in STDEV_UNITS:
            raise ValueError(f'NVConfig.stdev_unit must be "prior", "bias" or None, got {self.stdev_unit!r}')
        for field in dataclasses.fields(self):
            if field.name in ("centre_alpha", "stdev_unit"):
                continue
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"NVConfig.{field.name} must be a number, got {value!r}")
            value = float(value)  # numpy and torch scalars too
            object.__setattr__(self, field.name, value)
            if value == math.inf and field.name.startswith("alpha_tau"):
                continue  # the identity: no prior component
            if not math.isfinite(value):
                allowed = "; alpha_tau may be inf (no prior)" if field.name.startswith("alpha_tau") else ""
                raise ValueError(f"NVConfig.{field.name} must be finite, got {value}; pass a real number{allowed}")
            if (bound := bounds(field.name)) is not None:
                low, high, closed = bound
                if not (low <= value if closed else low < value) or value > high:
                    unit = STDEV_MEANING if field.name.startswith("stdev") else ""
                    raise ValueError(
                        f"NVConfig.{field.name} must be in {'[' if closed else '('}{low:g}, {high:g}], got {value!r}"
                        + unit
                    )

    def alpha_tau(self, kind: str) -> float:
        return getattr(self, f"alpha_tau_{SUFFIX[kind]}")

    def stdev_tau(self, kind: str) -> float:
        return getattr(self, f"stdev_tau_{SUFFIX[kind]}")

    def replace(self, **changes: float) -> NVConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, float | bool]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NVConfig:
        """From `to_dict` output; a dict without ``stdev_unit`` was written before it existed, in docs/method.md §3's
        unit. A knob may be the string "inf" (as `nvib.core.files` writes +inf to JSON; older files hold Infinity)."""
        data = {"stdev_unit": "prior", **data}
        data = {k: float(v) if _non_finite(k, v) else v for k, v in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown NVConfig fields {unknown}; valid fields are {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the knobs to ``path`` as JSON, atomically; alpha_tau = +inf as the string "inf"."""
        files.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> NVConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); it should be written by NVConfig.save") from err
