"""Files written by an earlier release (tests/fixtures/saved, see make_saved.py) load and compute what they did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nvib

SAVED = Path(__file__).parent / "fixtures" / "saved"
CASES = json.loads((SAVED / "written_by.json").read_text())["cases"]
KNOBS = nvib.NVConfig(alpha_tau_e=-1.0, alpha_tau_c=0.5, alpha_tau_d=-2.0, stdev_tau_e=0.2, stdev_tau_d=0.1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_saved_model_loads_and_computes_the_same(name: str) -> None:
    model = nvib.load(SAVED / name)
    # written before stdev_unit existed, in docs/method.md §3's unit: key-space models (whose
    # default is now "bias") say so
    assert model.nv_config == (KNOBS.replace(stdev_unit="prior") if name == "llama" else KNOBS)
    assert model.nv_prior is not None
    saved = torch.load(SAVED / f"{name}_outputs.pt")
    with torch.no_grad():
        logits = model(**saved["inputs"]).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_saved_prior_loads_as_the_model_keeps_it(name: str) -> None:
    prior = nvib.EmpiricalPrior.load(SAVED / f"{name}_prior.safetensors")
    kept = nvib.load(SAVED / name).nv_prior
    assert prior.sites.keys() == kept.sites.keys()
    for site, stats in prior.sites.items():
        assert torch.equal(stats.mean, kept.sites[site].mean) and torch.equal(stats.var, kept.sites[site].var)


def test_saved_knobs_load() -> None:
    assert nvib.NVConfig.load(SAVED / "knobs.json") == KNOBS.replace(stdev_unit="prior")  # §3's unit, as written
