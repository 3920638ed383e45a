"""Bad input to the library: refused before anything changes, with one line naming the fix (issue 12, 3-8)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from cases import TINY, bert2bert
from safetensors.torch import load_file, save_file
from test_equivalence import output
from test_prior import batches
from torch import nn
from typer.testing import CliRunner

import nvib
from nvib.cli import app
from nvib.core import attention
from nvib.core.config import BOUNDS
from nvib.core.prior import weights_hash

CASES = {case.name: case for case in TINY}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CASES[name].build().eval()


def attn_implementations(model: nn.Module) -> list[str | None]:
    configs = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), tf.PretrainedConfig)]
    return [c._attn_implementation for c in configs]


def assert_untouched(model: nn.Module, reference: nn.Module, tmp_path: Path, name: str = "bart") -> None:
    """The model is the one it was: no NV state, same attention, same outputs; it converts and saves."""
    assert not nvib.is_converted(model)
    assert not any("_nv_slot" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    assert not {"_nv_sites", "nv_prior", "nv_config", "_nv_attn_original"} & set(model.__dict__)
    assert attn_implementations(model) == attn_implementations(reference)
    inputs = CASES[name].inputs()
    assert torch.equal(output(model, inputs), output(reference, inputs))
    nvib.convert(model)
    nvib.save(model, tmp_path / "saved")
    assert nvib.is_converted(nvib.load(tmp_path / "saved"))


# ----------------------------------------------------------------------------------------------
# 3. convert checks everything first and leaves the model unchanged on any error


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"config": {"alpha_tau_e": -3.0}}, TypeError, r"nvib.NVConfig, got dict. Fix: pass nvib.NVConfig\(\*\*"),
        ({"prior": "prior.safetensors"}, TypeError, r"prior=nvib.EmpiricalPrior, got str. Fix: EmpiricalPrior.load"),
        ({"prior": "t5"}, nvib.PriorMismatchError, "estimate a prior on this model"),
    ],
)  # fmt: skip
def test_convert_refuses_bad_arguments_before_touching_the_model(tmp_path, kwargs, error, message) -> None:
    reference = build("bart")
    if kwargs.get("prior") == "t5":
        kwargs = {"prior": nvib.EmpiricalPrior.estimate(build("t5"), batches(CASES["t5"], 1), progress=False)}
    model = copy.deepcopy(reference)
    with pytest.raises(error, match=message):
        nvib.convert(model, **kwargs)
    assert_untouched(model, reference, tmp_path)


@pytest.mark.parametrize(("name", "fail_at"), [("bart", 3), ("bert2bert", 2)])
def test_convert_rolls_back_a_failure_midway(tmp_path, monkeypatch, name: str, fail_at: int) -> None:
    reference = build(name)
    model = copy.deepcopy(reference)
    calls, install = [], attention.install

    def failing_install(site, layer):
        calls.append(site.name)
        if len(calls) == fail_at:
            raise RuntimeError("simulated failure")
        return install(site, layer)

    monkeypatch.setattr(attention, "install", failing_install)
    with pytest.raises(RuntimeError, match="simulated"):
        nvib.convert(model)
    monkeypatch.setattr(attention, "install", install)
    assert len(calls) == fail_at
    assert_untouched(model, reference, tmp_path, name)


# ----------------------------------------------------------------------------------------------
# 5. unsupported models


def test_unsupported_models_are_refused(tmp_path) -> None:
    with pytest.raises(nvib.UnsupportedModelError, match="Linear is not a transformers model"):
        nvib.convert(nn.Linear(4, 4))
    with pytest.raises(nvib.UnsupportedModelError, match="not a transformers model"):
        nvib.EmpiricalPrior.estimate(nn.Linear(4, 4), [], progress=False)
    torch.manual_seed(0)
    encoder = tf.BertModel(CASES["bert"].build().config)
    decoder = tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, is_decoder=True, add_cross_attention=True)
    )
    model = tf.EncoderDecoderModel(encoder=encoder, decoder=decoder).eval()
    reference = copy.deepcopy(model)
    with pytest.raises(nvib.UnsupportedModelError, match=r"'gpt2' decoder has cross-attention.*: bart, bert"):
        nvib.convert(model)
    assert not nvib.is_converted(model) and attn_implementations(model) == attn_implementations(reference)
    # the supported form of the same thing converts, cross-attention included
    supported = bert2bert(tf.BertModel(CASES["bert"].build().config), CASES["bert"].build().config)
    assert "cross" in nvib.nv_layers(nvib.convert(supported))


# ----------------------------------------------------------------------------------------------
# 4. prior files: schema and values checked on load; what a prior was estimated on; merges


def saved_prior(tmp_path: Path) -> Path:
    prior = nvib.EmpiricalPrior.estimate(build("bart"), batches(CASES["bart"], 2), progress=False)
    prior.save(tmp_path / "prior.safetensors")
    return tmp_path / "prior.safetensors"


def corrupt(path: Path, out: Path, key: str, change) -> Path:
    tensors = load_file(str(path))
    tensors[key] = change(tensors[key].clone()) if key in tensors else change(None)
    save_file(tensors, str(out))
    return out


def test_prior_files_are_validated_on_load(tmp_path) -> None:
    good = saved_prior(tmp_path)
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "unrelated.safetensors"))
    with pytest.raises(ValueError, match=r"'weight' is not a per-site statistic: not a prior file\. Fix: estimate"):
        nvib.EmpiricalPrior.load(tmp_path / "unrelated.safetensors")
    save_file({"encoder.0.weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"site 'encoder.0' lacks the statistics \['mean', 'm2', 'norm', 'count'\]"):
        nvib.EmpiricalPrior.load(tmp_path / "model.safetensors")

    def set_first(value):
        def change(t):
            t.view(-1)[0] = value
            return t

        return change

    bad = [
        ("encoder.0.mean", set_first(float("nan")), "encoder.0.mean has NaN or infinite values"),
        ("cross.m2", set_first(float("inf")), "cross.m2 has NaN or infinite values"),
        ("decoder.1.m2", set_first(-1.0), "decoder.1.m2: a sum of squared deviations is negative"),
        ("encoder.1.norm", set_first(float("nan")), "encoder.1.norm has NaN"),
        ("encoder.1.norm", lambda t: torch.tensor([t[0], -2.0], dtype=t.dtype), "encoder.1.norm: a sum of squared"),
        ("encoder.0.count", lambda t: -t, "encoder.0.count is a token count and is negative"),
        ("encoder.0.mean", lambda t: t[:-1], "mean and m2 differ in size"),
        # an extra per-site statistic is held to the same rules
        ("encoder.0.value_mean", lambda _: torch.tensor([0.0, float("inf")]), "encoder.0.value_mean has NaN"),
        ("encoder.0.value_m2", lambda _: torch.tensor([1.0, -1.0]), "encoder.0.value_m2: a sum of squared"),
    ]
    for i, (key, change, message) in enumerate(bad):
        path = corrupt(good, tmp_path / f"bad{i}.safetensors", key, change)
        with pytest.raises(ValueError, match=message) as info:
            nvib.EmpiricalPrior.load(path)
        assert "Fix:" in str(info.value) and "\n" not in str(info.value)
    extra = corrupt(good, tmp_path / "extra.safetensors", "encoder.0.value_mean", lambda _: torch.zeros(32))
    assert set(nvib.EmpiricalPrior.load(extra).sites) == set(nvib.EmpiricalPrior.load(good).sites)
    result = CliRunner().invoke(
        app, ["prior-merge", str(tmp_path / "unrelated.safetensors"), "-o", str(tmp_path / "m")]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output and "Fix:" in result.output


def test_priors_record_their_data_and_weights_and_merge_only_disjoint_shards(tmp_path) -> None:
    model, data = build("bart"), batches(CASES["bart"], 4)
    shards = [nvib.EmpiricalPrior.estimate(model, data[i::2], progress=False, shard=(i, 2)) for i in range(2)]
    a, b = shards
    assert a.metadata["weights_hash"] == b.metadata["weights_hash"] == weights_hash(model)
    assert a.metadata["shards"][0]["shard"] == [0, 2] and b.metadata["shards"][0]["shard"] == [1, 2]
    assert a.metadata["shards"][0]["data_sha256"] != b.metadata["shards"][0]["data_sha256"]
    # the fingerprint is of the data: the same batches give the same one, on any model
    again = nvib.EmpiricalPrior.estimate(build("bart", seed=1), data[0::2], progress=False)
    assert again.metadata["shards"][0]["data_sha256"] == a.metadata["shards"][0]["data_sha256"]
    merged = nvib.EmpiricalPrior.merge([a, b])
    as_args = nvib.EmpiricalPrior.merge(a, b)
    for name, s in merged.sites.items():
        assert s.count == as_args.sites[name].count and torch.equal(s.mean, as_args.sites[name].mean)
    assert [r["shard"] for r in merged.metadata["shards"]] == [[0, 2], [1, 2]]
    with pytest.raises(nvib.PriorMismatchError, match=r"priors 0 and 1 were estimated on the same data \(shard 0/2\)"):
        nvib.EmpiricalPrior.merge(a, a)
    with pytest.raises(nvib.PriorMismatchError, match="same data"):
        nvib.EmpiricalPrior.merge(merged, b)  # b is inside merged already
    with pytest.raises(nvib.PriorMismatchError, match="different model weights.*Fix: estimate every shard"):
        nvib.EmpiricalPrior.merge(again, b)  # same shape and config, other weights
    # the records survive a save/load, so merging files refuses the same things
    for i, p in enumerate(shards):
        p.save(tmp_path / f"{i}.safetensors")
    loaded = [nvib.EmpiricalPrior.load(tmp_path / f"{i}.safetensors") for i in (0, 0)]
    with pytest.raises(nvib.PriorMismatchError, match="same data"):
        nvib.EmpiricalPrior.merge(loaded)


def test_weights_hash_tells_checkpoints_apart() -> None:
    model = build("bart")
    assert weights_hash(model) == weights_hash(copy.deepcopy(model))
    assert weights_hash(model) != weights_hash(build("bart", seed=1))
    nv = nvib.convert(copy.deepcopy(model))
    nvib.configure(nv, nvib.NVConfig(alpha_tau_e=-3.0))
    assert weights_hash(nv) == weights_hash(model)  # the NV layers are not the pretrained weights
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0  # the first value of a tensor is always in the sample
    assert weights_hash(model) != weights_hash(copy.deepcopy(nv))


# ----------------------------------------------------------------------------------------------
# 6, 7. nvib.load: nv_config.json validated, transformers classes only, files inside the directory


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    model = build("bart")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prior = nvib.EmpiricalPrior.estimate(model, batches(CASES["bart"], 1), progress=False)
        nvib.convert(model, nvib.NVConfig(alpha_tau_e=-2.0), prior=prior)
    return nvib.save(model, tmp_path_factory.mktemp("nv") / "model")


def edited(saved: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "model"
    if not out.exists():
        import shutil

        shutil.copytree(saved, out)
    info = json.loads((saved / "nv_config.json").read_text())
    (out / "nv_config.json").write_text(edit(info) if callable(edit) else edit)
    return out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda i: json.dumps([i]), "not a valid NV model description .*Fix: it is written by nvib.save"),
        ("{not json", "not a valid NV model description"),
        (lambda i: json.dumps({k: v for k, v in i.items() if k != "nv_config"}), "key 'nv_config': Field required"),
        (lambda i: json.dumps({k: v for k, v in i.items() if k != "model_class"}), "key 'model_class': Field required"),
        (lambda i: json.dumps({**i, "nv_config": {k: v for k, v in i["nv_config"].items() if k != "mu_tau"}}),
         r"nv_config lacks the knobs \['mu_tau'\]; the saved weights were computed with values it does not record"),
        (lambda i: json.dumps({**i, "nv_config": {**i["nv_config"], "alpha_tau_c": 1e30}}),
         r"nv_config: NVConfig.alpha_tau_c must be in \[-1000, 1000\]"),
        (lambda i: json.dumps({**i, "model_class": "AutoModel"}), "'AutoModel' is not a transformers model class"),
        (lambda i: json.dumps({**i, "model_class": "PreTrainedModel"}), "not a transformers model class"),
        (lambda i: json.dumps({**i, "model_class": "os.system"}), "not a transformers model class"),
        (lambda i: json.dumps({**i, "prior": "/etc/passwd"}), "prior path '/etc/passwd' leaves the model directory"),
        (lambda i: json.dumps({**i, "prior": "../model/prior.safetensors"}), "leaves the model directory"),
        (lambda i: json.dumps({**i, "sites": i["sites"][:-1]}), "lists sites .* but the model has"),
    ],
)  # fmt: skip
def test_load_validates_nv_config_json(saved: Path, tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        nvib.load(edited(saved, tmp_path, edit))
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)


def test_load_keeps_files_inside_and_adds_no_keywords(saved: Path, tmp_path: Path, monkeypatch) -> None:
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((saved / "prior.safetensors").read_bytes())
    model_dir = edited(saved, tmp_path, lambda i: json.dumps({**i, "prior": "link.safetensors"}))
    (model_dir / "link.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="leaves the model directory"):
        nvib.load(model_dir)
    (model_dir / "nv_layers.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks nv_layers.safetensors .*Fix: copy the whole directory"):
        nvib.load(edited(saved, tmp_path, lambda i: json.dumps(i)))
    seen = []
    original = tf.BartForConditionalGeneration.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        seen.append(kwargs)
        return original(cls, path, **kwargs)

    monkeypatch.setattr(tf.BartForConditionalGeneration, "from_pretrained", classmethod(spy))
    model = nvib.load(saved)
    nvib.load(saved, revision="main")
    no = {"local_files_only": True, "trust_remote_code": False}  # local files, no remote code (issue 36)
    assert seen == [no, {"revision": "main", **no}]
    assert model.nv_config == nvib.NVConfig(alpha_tau_e=-2.0)


# ----------------------------------------------------------------------------------------------
# 8. knob bounds


def test_knob_bounds_are_named() -> None:
    for kwargs, message in [
        ({"alpha_tau_e": 1e30}, r"alpha_tau_e must be in \[-1000, 1000\], got 1e\+30"),
        ({"mu_tau": 1e4}, r"mu_tau must be in \(0, 10\], got 10000"),
        ({"mu_tau": 0.0}, r"mu_tau must be in \(0, 10\]"),
        ({"stdev_tau_d": 101.0}, r"stdev_tau_d must be in \[0, 100\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            nvib.NVConfig(**kwargs)


@pytest.mark.parametrize("name", ["bart", "gpt2", "bert2bert"])
def test_knob_bounds_keep_outputs_finite(name: str) -> None:
    """At every corner of the knob box, in float32, bfloat16 and float16, the outputs and KL terms are finite."""
    case = CASES[name]
    stock = build(name)
    prior = nvib.EmpiricalPrior.estimate(stock, batches(case, 2), progress=False)
    alphas, stdevs = (*BOUNDS["alpha_tau"][:2], math.inf), BOUNDS["stdev_tau"][:2]
    corners = list(itertools.product(alphas, stdevs, (1e-6, BOUNDS["mu_tau"][1])))
    inputs = case.inputs()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = copy.deepcopy(stock).to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nvib.convert(model, prior=prior)
        for alpha, stdev, mu in corners:
            knobs = {f"{k}_{s}": v for k, v in (("alpha_tau", alpha), ("stdev_tau", stdev)) for s in "ecd"}
            nvib.configure(model, nvib.NVConfig(**knobs, mu_tau=mu))
            for training in (False, True):
                model.train(training)
                assert torch.isfinite(output(model, inputs)).all(), (dtype, alpha, stdev, mu, training)
                if training:
                    assert torch.isfinite(nvib.kl_loss(model)), (dtype, alpha, stdev, mu)


def test_files_from_before_the_alpha_floor_load_with_their_scaling(saved: Path, tmp_path: Path) -> None:
    """nv_config.json written before docs/method.md §11 has no alpha_scale_min / centre_alpha: those files computed
    b_α = τ_α·ς, so they load with alpha_scale_min = 0 and no centring (and the saved layers as they are)."""
    old = edited(saved, tmp_path, lambda i: json.dumps({**i, "nv_config": {
        k: v for k, v in i["nv_config"].items() if k not in ("alpha_scale_min", "centre_alpha")}}))  # fmt: skip
    loaded = nvib.load(old)
    assert loaded.nv_config.alpha_scale_min == 0.0 and loaded.nv_config.centre_alpha is False
    inputs = CASES["bart"].inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, nvib.load(saved)(**inputs).logits)
