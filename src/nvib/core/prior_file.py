"""The prior file (docs/method.md §7, "What is stored"): one .safetensors file, per site the tensors
``{site}.mean``, ``.m2``, ``.norm`` (norm mean and m2), ``.count`` and where present ``.value_mean``, ``.m3``/``.m4``
and ``.sample``/``.sample_key``; the metadata's values as JSON strings. Loading refuses files that are not priors.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from nvib.core import files
from nvib.core.site_stats import SiteStats


def save(sites: Mapping[str, SiteStats], metadata: Mapping[str, object], path: str | Path) -> None:
    """Write `sites` and `metadata` to ``path`` atomically (`nvib.core.files`): a kill or a full disk leaves the file
    that was there."""
    tensors = {}
    for name, s in sites.items():
        tensors[f"{name}.mean"] = s.mean.contiguous()
        tensors[f"{name}.m2"] = s.m2.contiguous()
        tensors[f"{name}.norm"] = torch.stack([s.norm_mean, s.norm_m2]).to(torch.float64)
        tensors[f"{name}.count"] = torch.tensor(s.count, dtype=torch.int64)
        if s.value_mean is not None:
            tensors[f"{name}.value_mean"] = s.value_mean.contiguous()
        if s.m3 is not None and s.m4 is not None:
            tensors[f"{name}.m3"], tensors[f"{name}.m4"] = s.m3.contiguous(), s.m4.contiguous()
        if s.sample is not None:
            tensors[f"{name}.sample"], tensors[f"{name}.sample_key"] = s.sample.contiguous(), s.sample_key
    meta = {k: files.dumps(v) for k, v in metadata.items()}
    files.save_tensors(tensors, path, metadata=meta)


def load(path: str | Path) -> tuple[dict[str, SiteStats], dict[str, object]]:
    """(sites, metadata) of the prior file at ``path``; a one-line error for a missing file or one that is no prior."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prior file at {path}: estimate one with `nvib prior` or EmpiricalPrior.estimate")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a prior saved by EmpiricalPrior.save ({err})") from err
    _validate_tensors(path, tensors)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    sites = {}
    for name in names:
        norm = tensors[f"{name}.norm"]
        sites[name] = SiteStats(
            int(tensors[f"{name}.count"]),
            tensors[f"{name}.mean"],
            tensors[f"{name}.m2"],
            norm[0],
            norm[1],
            tensors.get(f"{name}.value_mean"),
            tensors.get(f"{name}.m3"),
            tensors.get(f"{name}.m4"),
            tensors.get(f"{name}.sample"),
            tensors.get(f"{name}.sample_key"),
        )
    metadata = {}
    for k, v in raw.items():
        with contextlib.suppress(json.JSONDecodeError):
            metadata[k] = json.loads(v)
    return sites, metadata


REQUIRED = ("mean", "m2", "norm", "count")  # tensors every site has
FIX = "Fix: estimate a prior with `nvib prior` or EmpiricalPrior.estimate"


def _validate_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse files that are not priors, or whose statistics are not finite or negative where they cannot be.

    Generic over the tensors stored per site: all must be finite, counts >= 0 and sums of squares (``*m2``) >= 0;
    every site must have the `REQUIRED` ones."""
    if not tensors:
        raise ValueError(f"{path} holds no tensors: it is not a prior saved by EmpiricalPrior.save. {FIX}")
    sites: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        site, _, stat = key.rpartition(".")
        if not site:
            raise ValueError(f"{path}: tensor {key!r} is not a per-site statistic: not a prior file. {FIX}")
        sites.setdefault(site, {})[stat] = tensor
    for site, stats in sites.items():
        missing = [name for name in REQUIRED if name not in stats]
        if missing:
            raise ValueError(
                f"{path}: site {site!r} lacks the statistics {missing}: not a prior saved by EmpiricalPrior.save. {FIX}"
            )
        mean = stats["mean"]  # [P] in z-space, [G, E] in key space (then one norm statistic per head)
        if stats["count"].dim() != 0 or mean.dim() not in (1, 2) or stats["norm"].shape != (2, *mean.shape[:-1]):
            raise ValueError(f"{path}: site {site!r} has statistics of the wrong shape. {FIX}")
        if stats["mean"].shape != stats["m2"].shape:
            raise ValueError(f"{path}: site {site!r}: mean and m2 differ in size. {FIX}")
        if ("m3" in stats) != ("m4" in stats) or any(stats[m].shape != mean.shape for m in ("m3", "m4") if m in stats):
            raise ValueError(f"{path}: site {site!r}: the higher moments m3/m4 are incomplete or misshapen. {FIX}")
        sample, key = stats.get("sample"), stats.get("sample_key")
        if (sample is None) != (key is None) or (
            sample is not None and (sample.shape[1:] != mean.shape or key.shape != sample.shape[:1])
        ):
            raise ValueError(f"{path}: site {site!r}: the token sample is incomplete or misshapen. {FIX}")
        if "m4" in stats and bool((stats["m4"] < 0).any()):
            raise ValueError(f"{path}: {site}.m4: a sum of 4th powers is negative: the prior is corrupt. {FIX}")
        for stat, tensor in stats.items():
            where = f"{path}: {site}.{stat}"
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{where} has NaN or infinite values: the prior is corrupt. {FIX}")
            if stat == "count" or stat.endswith("_count"):
                if bool((tensor < 0).any()):
                    raise ValueError(f"{where} is a token count and is negative: the prior is corrupt. {FIX}")
            if (stat.endswith("m2") and bool((tensor < 0).any())) or (stat == "norm" and bool((tensor[1] < 0).any())):
                raise ValueError(f"{where}: a sum of squared deviations is negative: the prior is corrupt. {FIX}")
