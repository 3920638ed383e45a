"""Runs that never hang, never mix and never overwrite (issue 24): each case is one line, not a traceback."""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from cases import ROTARY, TINY
from runs import run_config, save_tiny_model, write_config
from test_cli import assert_user_error, invoke
from test_prior import batches

import nvib
from nvib.core.prior import EmpiricalPrior
from nvib.workflow.search import MAX_FAILED_IN_A_ROW, SearchFailedError, run_search


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bart")


@pytest.fixture(scope="module")
def prior_file(model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prior") / "run"
    result = invoke("run", write_config(out.parent / "run.yaml", run_config(model_dir)), "--run-dir", out,
                    "--no-progress", "--n-trials", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    return out / "prior.safetensors"


def test_search_of_nan_trials_stops() -> None:
    """Failed trials do not count towards n_trials: without a bound this search would never return."""
    with pytest.raises(SearchFailedError, match=f"{MAX_FAILED_IN_A_ROW} trials in a row failed .*nan"):
        run_search(lambda knobs, n: float("nan"), {"decoder"}, n_trials=3, storage=None, study_name="s",
                   slices=[1], progress=False)  # fmt: skip


def test_prior_that_overflows_float32_is_refused(prior_file: Path, model_dir: Path, tmp_path: Path) -> None:
    prior = EmpiricalPrior.load(prior_file)
    site = next(iter(prior.sites.values()))
    site.m2[0] = 1e300  # finite in float64, inf in float32
    prior.save(tmp_path / "bad.safetensors")
    model = tf.AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    with pytest.raises(nvib.PriorMismatchError, match="not finite in the model's torch.float32"):
        nvib.convert(model, prior=EmpiricalPrior.load(tmp_path / "bad.safetensors"))


def test_resume_with_another_model_is_refused(model_dir: Path, tmp_path: Path) -> None:
    other = save_tiny_model(tmp_path / "other", kind="seq2seq")
    with torch.no_grad():  # same architecture, other weights
        model = tf.AutoModelForSeq2SeqLM.from_pretrained(other)
        model.lm_head.weight.mul_(2)
        model.save_pretrained(other)
    out = tmp_path / "run"
    first = write_config(tmp_path / "a.yaml", run_config(model_dir))
    ok = invoke("run", first, "--run-dir", out, "--no-progress", "--n-trials", "1")
    assert ok.exit_code == 0, ok.output
    config = write_config(tmp_path / "b.yaml", run_config(other))
    assert_user_error(invoke("search", config, "--run-dir", out, "--no-progress"),
                      "was started with another model files", "Fix: use a new run directory")  # fmt: skip
    longer = run_config(model_dir)
    longer["data"]["max_target_len"] = 20
    config = write_config(tmp_path / "c.yaml", longer)
    assert_user_error(invoke("search", config, "--run-dir", out, "--no-progress"), "another lengths")


def test_given_prior_file_is_never_written(prior_file: Path, model_dir: Path, tmp_path: Path) -> None:
    partial = EmpiricalPrior.load(prior_file)
    partial.metadata["complete"] = False
    user = tmp_path / "user.safetensors"
    partial.save(user)
    before = user.read_bytes()
    config = write_config(tmp_path / "run.yaml", run_config(model_dir))
    result = invoke("search", config, "--run-dir", tmp_path / "x", "--prior", user, "--no-progress")
    assert_user_error(result, f"the prior {user} is incomplete", "does not write to a file you pass")
    assert user.read_bytes() == before


def test_damaged_study_database_is_one_line(model_dir: Path, prior_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "study.db").write_bytes(np.random.default_rng(0).bytes(4096))
    config = write_config(tmp_path / "run.yaml", run_config(model_dir))
    result = invoke("search", config, "--run-dir", out, "--prior", prior_file, "--no-progress")
    assert_user_error(result, "is not a readable study database", "Fix: move it away")


def test_key_space_prior_of_another_head_layout_is_refused() -> None:
    """Same model type and site sizes (2 heads × 8 = 4 heads × 4), other layout: a mismatch, named."""
    case = ROTARY[0]
    torch.manual_seed(0)
    model = case.build().eval()
    prior = EmpiricalPrior.estimate(model, batches(case, 1), progress=False)
    other = copy.deepcopy(prior)
    for s in other.sites.values():
        for name in ("mean", "m2", "value_mean", "m3", "m4"):
            setattr(s, name, getattr(s, name).reshape(4, 4))
    with pytest.raises(nvib.PriorMismatchError, match=r"has shape \[4, 4\], the model's site \[2, 8\]"):
        nvib.convert(copy.deepcopy(model), prior=other)
    broken = copy.deepcopy(prior)
    site = next(iter(broken.sites.values()))
    site.value_mean = site.value_mean[:1]
    with pytest.raises(nvib.PriorMismatchError, match="its value_mean has shape"):
        nvib.convert(copy.deepcopy(model), prior=broken)


def test_tokenizer_larger_than_the_embeddings_is_refused(model_dir: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    shutil.copytree(model_dir, small)
    model = tf.AutoModelForSeq2SeqLM.from_pretrained(small)
    model.resize_token_embeddings(1000)
    model.save_pretrained(small)
    config = write_config(tmp_path / "run.yaml", run_config(small))
    result = invoke("run", config, "--run-dir", tmp_path / "o", "--no-progress")
    assert_user_error(result, "has 30522 tokens but the model's embeddings only 1000", "Fix: point model.tokenizer")


def test_knobs_of_any_numeric_type_and_exact_bound_errors() -> None:
    config = nvib.NVConfig(alpha_tau_d=np.float32(-2.0), stdev_tau_e=np.int64(1))
    assert config.alpha_tau_d == -2.0 and type(config.stdev_tau_e) is float
    with pytest.raises(ValueError, match=r"got 100\.0001"):
        nvib.NVConfig(stdev_tau_d=100.0001)


def test_merging_overlapping_data_is_refused() -> None:
    """A full prior with one of its own shards, or shards of one corpus cut with other batch sizes: refused."""
    case = ROTARY[0]
    torch.manual_seed(0)
    model = case.build().eval().double()  # float32 outputs depend on the batch's shape at round-off (BLAS blocking)
    big = case.inputs(batch=12, src=9)
    rows = [{k: v[i : i + 1] for k, v in big.items()} for i in range(12)]
    cat = lambda rs: {k: torch.cat([r[k] for r in rs]) for k in rs[0]}  # noqa: E731
    full = EmpiricalPrior.estimate(model, [cat(rows[i : i + 4]) for i in range(0, 12, 4)], progress=False)
    half = EmpiricalPrior.estimate(model, [cat(rows[i : i + 3]) for i in range(0, 6, 3)], progress=False)
    other = EmpiricalPrior.estimate(model, [cat(rows[i : i + 3]) for i in range(6, 12, 3)], progress=False)
    merged = EmpiricalPrior.merge(half, other)  # disjoint: fine, and equal to the full prior
    for name, s in full.sites.items():
        torch.testing.assert_close(merged.sites[name].mean, s.mean, atol=1e-10, rtol=0)
    with pytest.raises(nvib.PriorMismatchError, match="overlapping data"):
        EmpiricalPrior.merge(full, half)
    again = EmpiricalPrior.estimate(model, [cat(rows[0:2]), cat(rows[2:6])], progress=False)  # other batches
    with pytest.raises(nvib.PriorMismatchError, match="overlapping data"):
        EmpiricalPrior.merge(half, again)


@pytest.mark.parametrize("case", [ROTARY[0], TINY[0], TINY[4]], ids=lambda c: c.name)
def test_output_attentions_returns_the_weights_on_the_tokens(case) -> None:
    """At the default the NV weights are the stock eager ones; at a finite τ_α each row's sum is 1 − its prior mass."""
    torch.manual_seed(0)
    stock = case.build().eval()
    stock.set_attn_implementation("eager")
    inputs = case.inputs()
    with torch.no_grad():
        ref = stock(**inputs, output_attentions=True)
        nv = nvib.convert(copy.deepcopy(stock))
        got = nv(**inputs, output_attentions=True)
        names = [n for n in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions") if n in ref]
        valid = inputs["attention_mask"].bool()[:, None, :, None]  # queries of real tokens
        for name in names:
            for a, b in zip(getattr(got, name), getattr(ref, name), strict=True):
                assert a.shape == b.shape
                if name in ("attentions", "encoder_attentions") and a.shape[-2] == valid.shape[-2]:
                    a, b = a * valid, b * valid
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nvib.configure(nv, nvib.NVConfig(alpha_tau_e=-5.0, alpha_tau_c=-5.0, alpha_tau_d=-5.0))
        sums = torch.stack(getattr(nv(**inputs, output_attentions=True), names[0])).sum(-1)
    assert bool((sums < 1 - 1e-5).any()) and bool((sums <= 1 + 1e-5).all())
