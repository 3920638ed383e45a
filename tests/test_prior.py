"""The empirical prior (docs/method.md §7): exact statistics, exact merging, storage, mismatches."""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import REAL_WEIGHTS, TINY
from test_equivalence import output, pair

import nvib
from nvib.core.architectures import find_sites


def batches(case, n=4, seed=0):
    return [case.inputs(batch=3, src=9 + i, tgt=5 + i, seed=seed + i) for i in range(n)]


def direct_statistics(model, data):
    """Collect every real token vector per site, then compute the statistics in one go."""
    sites = {}
    for site in find_sites(model):
        sites.setdefault(site.name, site)
    seen = {name: [] for name in sites}
    current = {}

    def hook(name):
        def fn(module, args):
            z = args[0]
            kind = sites[name].kind
            mask = current["decoder_attention_mask"] if kind == "decoder" else current["attention_mask"]
            seen[name].append(z[mask.bool()].double())

        return fn

    handles = [sites[n].key_projection.register_forward_pre_hook(hook(n)) for n in sites]
    with torch.no_grad():
        for batch in data:
            current.clear()
            current.update(batch)
            model(**batch)
    for h in handles:
        h.remove()
    out = {}
    for name, chunks in seen.items():
        z = torch.cat(chunks)
        r = (z * z).sum(-1) / (2 * sites[name].noise)
        out[name] = (z.mean(0), z.var(0, unbiased=True), r.mean(), r.std(unbiased=True), z.shape[0])
    return out


def test_statistics_are_exact_and_merge_exactly(tmp_path):
    case = TINY[0]
    stock, _ = pair(case)
    data = batches(case)
    prior = nvib.EmpiricalPrior.estimate(stock, data, data="four batches", progress=False)
    direct = direct_statistics(stock, data)
    assert set(prior.sites) == set(direct)
    for name, (mean, var, a0, scale, count) in direct.items():
        s = prior.sites[name]
        assert s.count == count
        assert torch.allclose(s.mean, mean, atol=1e-12) and torch.allclose(s.var, var, atol=1e-12)
        assert abs(s.log_alpha_mean - float(a0)) < 1e-10 and abs(s.log_alpha_std - float(scale)) < 1e-10
    shards = [nvib.EmpiricalPrior.estimate(stock, data[i::2], progress=False) for i in range(2)]
    merged = nvib.EmpiricalPrior.merge(*shards)
    for name, s in prior.sites.items():
        m = merged.sites[name]
        assert (
            m.count == s.count
            and torch.allclose(m.mean, s.mean, atol=1e-12)
            and torch.allclose(m.var, s.var, atol=1e-12)
        )
        assert abs(m.log_alpha_std - s.log_alpha_std) < 1e-10
    prior.save(tmp_path / "prior.safetensors")
    loaded = nvib.EmpiricalPrior.load(tmp_path / "prior.safetensors")
    assert loaded.metadata["data"] == "four batches" and loaded.metadata["tokens"] == prior.metadata["tokens"]
    for name, s in prior.sites.items():
        assert torch.equal(loaded.sites[name].mean, s.mean) and loaded.sites[name].count == s.count


def test_converted_model_estimates_the_same_prior_and_keeps_its_knobs():
    case = TINY[0]
    stock, nv = pair(case)
    from test_equivalence import REGULARISED

    nvib.configure(nv, REGULARISED)
    data = batches(case, 2)
    a = nvib.EmpiricalPrior.estimate(stock, data, progress=False)
    b = nvib.EmpiricalPrior.estimate(nv, data, progress=False)
    assert nv.nv_config == REGULARISED
    for name in a.sites:
        assert torch.allclose(a.sites[name].mean, b.sites[name].mean, atol=1e-5)


def test_prior_enters_the_layers_and_keeps_equivalence():
    """Real weights: with a random-weight LayerNorm model ‖z‖ is constant, ς = 0 and alpha_tau does nothing."""
    case = REAL_WEIGHTS[1]
    stock, nv = pair(case)
    prior = nvib.EmpiricalPrior.estimate(stock, batches(case, 2), progress=False)
    nvib.unload(nv)
    nvib.convert(nv, prior=prior)
    layer = nvib.nv_layers(nv)["encoder.1"]
    assert torch.allclose(layer.prior_mean.double(), prior.sites["encoder.1"].mean)
    inputs = case.inputs()
    assert (output(nv, inputs) - output(stock, inputs)).abs().max() <= 1e-4
    nvib.configure(nv, nvib.NVConfig(alpha_tau_e=-3, alpha_tau_c=-3, alpha_tau_d=-3))
    assert (output(nv, inputs) - output(stock, inputs)).abs().max() > 1e-2


def test_alpha_scale_floor_restores_equivalence():
    """docs/method.md §11: a random-weight model's LayerNorm fixes ‖z‖ (ς ≈ 0). With the original scaling τ_α·ς
    (alpha_scale_min = 0) τ_α = 10 leaves the prior a visible weight and convert says so; the default floor ς_min = 1
    gives back the pretrained model."""
    case = TINY[0]
    stock, nv = pair(case)
    prior = nvib.EmpiricalPrior.estimate(stock, batches(case), progress=False)
    assert max(float(s.log_alpha_std) for s in prior.sites.values()) < 0.05
    inputs = case.inputs()
    valid = inputs["decoder_attention_mask"].bool()
    nvib.unload(nv)
    with pytest.warns(UserWarning, match="visible weight"):
        finite = {f"alpha_tau_{k}": 10.0 for k in "ecd"}  # the old finite identity point
        nvib.convert(nv, nvib.NVConfig(alpha_scale_min=0.0, **finite), prior=prior)
    assert (output(nv, inputs) - output(stock, inputs))[valid].abs().max() > 1e-3
    nvib.unload(nv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nvib.convert(nv, prior=prior)
    assert (output(nv, inputs) - output(stock, inputs))[valid].abs().max() <= 1e-4


def test_mismatched_prior_is_a_clear_error(tmp_path):
    prior = nvib.EmpiricalPrior.estimate(pair(TINY[0])[0], batches(TINY[0], 1), progress=False)
    t5, _ = pair(TINY[4])
    with pytest.raises(nvib.PriorMismatchError, match="estimate a prior on this model"):
        nvib.convert(t5, prior=prior)
    with pytest.raises(FileNotFoundError, match="no prior file"):
        nvib.EmpiricalPrior.load(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_text("not a prior")
    with pytest.raises(ValueError, match="not a prior"):
        nvib.EmpiricalPrior.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="empty"):
        nvib.EmpiricalPrior.estimate(pair(TINY[0])[0], [], progress=False)


@pytest.mark.parametrize("name", ["bart", "bert2bert"])
def test_seq2seq_batches_without_targets_are_refused(name):
    """Without labels or decoder_input_ids a BART-like decoder reads the shifted source: its prior would describe
    the source text. That is refused in one line; the targets as labels work, and so does a standalone encoder."""
    case = next(c for c in TINY if c.name == name)
    model = case.build().eval()
    source = {k: v for k, v in case.inputs().items() if not k.startswith("decoder_")}
    with pytest.raises(ValueError, match=r"^batch 0 has no labels or decoder_input_ids.*Fix: ") as err:
        nvib.EmpiricalPrior.estimate(model, [source], progress=False)
    assert "\n" not in str(err.value)
    labels = case.inputs()["decoder_input_ids"].masked_fill(case.inputs()["decoder_attention_mask"] == 0, -100)
    prior = nvib.EmpiricalPrior.estimate(model, [{**source, "labels": labels}], progress=False)
    assert prior.sites["decoder.0"].count == int((labels != -100).sum())
    if name == "bart":  # a standalone half has no decoder to feed
        encoder_prior = nvib.EmpiricalPrior.estimate(model.get_encoder(), [source], progress=False)
        assert encoder_prior.sites["encoder.0"].count == int(source["attention_mask"].sum())


def test_prior_module_keeps_every_name_it_exported():
    """`nvib.core.prior` is split by job (statistics, pass, provenance, file format): every public name it had
    before the split is still importable from it, the same objects as in the modules that now hold them."""
    from nvib.core import prior, prior_file, prior_pass, prior_provenance, site_stats

    homes = {
        site_stats: ("TOKEN_SAMPLE", "SiteStats"),
        prior_pass: ("TARGET_KEYS", "valid_mask"),
        prior_provenance: (
            "EXAMPLE_SKETCH", "WEIGHT_SAMPLES", "PriorMismatchError", "example_hashes", "model_signature",
            "weights_hash",
        ),
        prior_file: ("FIX", "REQUIRED"),
    }  # fmt: skip
    for module, names in homes.items():
        for name in names:
            assert getattr(prior, name) is getattr(module, name), name
    assert set(prior.__all__) == {n for names in homes.values() for n in names} | {"EmpiricalPrior"}
    assert nvib.EmpiricalPrior is prior.EmpiricalPrior and nvib.PriorMismatchError is prior.PriorMismatchError
