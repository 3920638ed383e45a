"""The common NV tester: every architecture, at the equivalence setting, is the pretrained model (docs/method.md §5)."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import REAL_SIZE, REAL_WEIGHTS, ROTARY, TINY, Case

import nvib
import nvib.core.attention
import nvib.core.masks

REGULARISED = nvib.NVConfig(
    alpha_tau_e=-3, alpha_tau_c=-7, alpha_tau_d=2, stdev_tau_e=0.35, stdev_tau_c=0.1, stdev_tau_d=0.2
)


def output(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def pair(case: Case, dtype=torch.float32):
    torch.manual_seed(0)
    stock = case.build().eval().to(dtype)
    return stock, nvib.convert(copy.deepcopy(stock))


def generate(model, inputs, **kw):
    ids = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model.generate(**ids, max_new_tokens=8, do_sample=False, **kw)


def check_case(case: Case, tol: float = 1e-4, beams=(1, 4)):
    stock, nv = pair(case)
    inputs = case.inputs()
    valid = _valid_positions(case, inputs)
    ref = output(stock, inputs)
    assert (output(nv, inputs) - ref)[valid].abs().max() <= tol
    if case.kind != "encoder":
        if case.kind == "lm":
            stock.generation_config.pad_token_id = nv.generation_config.pad_token_id = case.pad
        for num_beams in beams:
            expected = generate(stock, inputs, num_beams=num_beams)
            assert torch.equal(generate(nv, inputs, num_beams=num_beams), expected)
            assert torch.equal(generate(nv, inputs, num_beams=num_beams, use_cache=False), expected)
    return stock, nv, inputs, ref


def _valid_positions(case: Case, inputs) -> torch.Tensor:
    """Outputs at real (non-padding) positions: the only ones a model is answerable for."""
    mask = inputs.get("decoder_attention_mask", inputs["attention_mask"]).bool()
    return mask


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.name)
def test_tiny_equivalence_and_unload(case: Case):
    stock, nv, inputs, ref = check_case(case)
    nvib.unload(nv)
    assert not nvib.is_converted(nv)
    assert torch.equal(output(nv, inputs), ref)
    assert set(nv.state_dict()) == set(stock.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("case", REAL_SIZE, ids=lambda c: c.name)
def test_real_size_equivalence(case: Case):
    check_case(case)


@pytest.mark.parametrize("case", REAL_WEIGHTS, ids=lambda c: c.name)
def test_real_weights_equivalence(case: Case):
    check_case(case)


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.name)
def test_regularised_cache_matches_no_cache(case: Case):
    if case.kind == "encoder":
        pytest.skip("no generation")
    stock, nv = pair(case)
    nvib.configure(nv, REGULARISED)
    inputs = case.inputs()
    assert not torch.allclose(output(nv, inputs), output(stock, inputs), atol=1e-3)
    check_caches(case, nv, inputs)


def check_caches(case: Case, nv, inputs) -> None:
    """Greedy and beam search with the dynamic and the static cache give what no cache gives."""
    if case.kind == "lm":
        nv.generation_config.pad_token_id = case.pad
    for num_beams in (1, 4):
        expected = generate(nv, inputs, num_beams=num_beams, use_cache=False)
        assert torch.equal(generate(nv, inputs, num_beams=num_beams), expected)
        assert torch.equal(generate(nv, inputs, num_beams=num_beams, cache_implementation="static"), expected)


def randomise_variances(model, scale: float = 2.0) -> None:
    """Per-token variances as after fine-tuning: W_σ away from 0."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in nvib.nv_layers(model).values():
            w = torch.randn(layer.logvar_weight.shape, generator=g, dtype=torch.float64)
            layer.logvar_weight.copy_(scale / layer.dim**0.5 * w)


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.name)
def test_per_token_variances_general_form(case: Case):
    """The general form (docs/method.md §4) at W_σ = 0 is the fast form; with W_σ ≠ 0 the caches
    still match no cache."""
    _, nv = pair(case)
    nvib.configure(nv, REGULARISED)
    inputs = case.inputs()
    valid = _valid_positions(case, inputs)
    fast = output(nv, inputs)
    nvib.enable_per_token_variance(nv)
    assert all(layer.per_token_variance for layer in nvib.nv_layers(nv).values())
    assert (output(nv, inputs) - fast)[valid].abs().max() <= 1e-5
    randomise_variances(nv)
    assert (output(nv, inputs) - fast)[valid].abs().max() > 1e-4  # 10x the tolerance above
    if case.kind != "encoder":
        check_caches(case, nv, inputs)


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.name)
def test_no_attention_mask(case: Case):
    stock, nv = pair(case)
    inputs = {k: v for k, v in case.inputs().items() if "attention_mask" not in k}
    assert (output(nv, inputs) - output(stock, inputs)).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "case", [c for c in TINY if c.name in ("bart", "t5", "bert", "gpt2", "bert2bert")], ids=lambda c: c.name
)
def test_padding_never_leaks(case: Case):
    """Changing what sits under the padding changes nothing at real positions, regularised or not."""
    _, nv = pair(case)
    nvib.configure(nv, REGULARISED)
    inputs = case.inputs()
    other = {k: v.clone() for k, v in inputs.items()}
    for ids, mask in (("input_ids", "attention_mask"), ("decoder_input_ids", "decoder_attention_mask")):
        if ids in other:
            other[ids][other[mask] == 0] = 7
    valid = _valid_positions(case, inputs)
    assert torch.allclose(output(nv, inputs)[valid], output(nv, other)[valid], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", [c for c in TINY if c.name in ("bart", "t5", "gpt2")], ids=lambda c: c.name)
def test_dtypes(case: Case, dtype):
    stock, nv = pair(case, dtype)
    if dtype == torch.float64:  # at alpha_tau 10 the prior's weight is ~e^-15 on these tiny models: not round-off
        nvib.configure(nv, nvib.NVConfig(alpha_tau_e=40, alpha_tau_c=40, alpha_tau_d=40))
    inputs = case.inputs()
    out, ref = output(nv, inputs), output(stock, inputs)
    assert out.dtype == dtype and nv.nvib_layers[next(iter(nv.nvib_layers))].prior_var.dtype == dtype
    assert torch.isfinite(out).all()
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float64: 1e-10}[dtype]
    valid = _valid_positions(case, inputs)
    assert (out - ref)[valid].abs().max() <= tol
    nvib.configure(nv, REGULARISED)
    assert torch.isfinite(output(nv, inputs)).all()
    nvib.enable_per_token_variance(nv)
    randomise_variances(nv)
    assert torch.isfinite(output(nv, inputs)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_weights_half_precision_finite(dtype):
    case = REAL_WEIGHTS[1]
    stock, nv = pair(case, dtype)
    inputs = case.inputs()
    for config in (nvib.NVConfig(), REGULARISED):
        nvib.configure(nv, config)
        assert torch.isfinite(output(nv, inputs)).all()
        assert torch.isfinite(generate(nv, inputs, num_beams=2).float()).all()


def test_large_hidden_norms():
    """‖z‖²/(2√E) far beyond float32's exp range: log α stays in log space and equivalence holds."""
    case = TINY[0]
    stock, nv = pair(case)
    with torch.no_grad():
        for model in (stock, nv):
            model.model.encoder.layernorm_embedding.weight.mul_(300.0)
    inputs = case.inputs()
    seen = []
    nv.model.encoder.layers[0].self_attn.k_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    output(nv, inputs)
    layer = nvib.nv_layers(nv)["encoder.0"]
    assert (seen[0].double() ** 2).sum(-1).max() / (2 * layer.noise) > 1000  # exp() overflows even float64
    ref = output(stock, inputs)
    assert ((output(nv, inputs) - ref).abs() / ref.abs().max()).max() <= 1e-5
    nvib.configure(nv, REGULARISED)
    assert torch.isfinite(output(nv, inputs)).all()
    nv.train()
    out = nv(**inputs, labels=inputs["decoder_input_ids"])
    assert torch.isfinite(out.loss) and torch.isfinite(nvib.kl_loss(nv))


def test_two_models_from_one_config():
    import transformers as tf

    cfg = tf.BartConfig(
        vocab_size=96,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    before = cfg.to_dict()
    torch.manual_seed(0)
    a = tf.BartForConditionalGeneration(cfg).eval()
    b = copy.deepcopy(a)
    c = tf.BartForConditionalGeneration(cfg).eval()
    inputs = TINY[0].inputs()
    ref = output(b, inputs)
    nvib.convert(a, REGULARISED)
    assert cfg.to_dict() == before
    assert torch.equal(output(b, inputs), ref)  # the unconverted twin is untouched
    assert not nvib.is_converted(c)
    nvib.convert(c)
    assert nvib.is_converted(c)


def test_prior_mass_grows_as_alpha_tau_falls():
    case = TINY[0]
    stock, nv = pair(case)
    inputs = case.inputs()
    ref = output(stock, inputs)
    distances, masses = [], []
    for tau in (10, 2, -2, -6, -30):
        nvib.configure(nv, nvib.NVConfig(alpha_tau_e=tau, alpha_tau_c=tau, alpha_tau_d=tau))
        with nvib.record_prior_mass(nv) as mass:
            out = output(nv, inputs)
        distances.append(float((out - ref).abs().mean()))
        masses.append(mass["encoder"])
    assert masses == sorted(masses) and masses[0] < 1e-6 and masses[-1] > 0.999
    assert distances == sorted(distances)


def test_errors():
    import transformers as tf

    with pytest.raises(ValueError, match="finite"):
        nvib.NVConfig(alpha_tau_e=float("nan"))
    with pytest.raises(ValueError, match=r"stdev_tau_c must be in \[0, 100\], got -0.1"):
        nvib.NVConfig(stdev_tau_c=-0.1)
    vit = tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(nvib.UnsupportedModelError, match="supported model types: bart"):
        nvib.convert(vit)
    _, nv = pair(TINY[0])
    with pytest.raises(ValueError, match="already an NV model"):
        nvib.convert(nv)
    with pytest.raises(TypeError, match="NVConfig"):
        nvib.configure(nv, {"alpha_tau_e": 1})


def test_config_json_round_trip(tmp_path):
    path = tmp_path / "nv.json"
    REGULARISED.save(path)
    assert nvib.NVConfig.load(path) == REGULARISED
    with pytest.raises(ValueError, match="unknown NVConfig fields"):
        nvib.NVConfig.from_dict({"alpha": 1})


def test_convert_and_configure_inside_inference_mode():
    case = TINY[0]
    stock, _ = pair(case)
    inputs = case.inputs()
    ref = output(stock, inputs)
    with torch.inference_mode():
        nv = nvib.convert(copy.deepcopy(stock))
        assert (nv(**inputs).logits - ref).abs().max() <= 1e-4
    nvib.configure(nv, REGULARISED)  # outside: the NV parameters are ordinary tensors
    with torch.inference_mode():
        nvib.configure(nv, nvib.NVConfig())
        assert (nv(**inputs).logits - ref).abs().max() <= 1e-4


def test_split_and_prepended_prior_agree(monkeypatch):
    """The log-sum-exp merge of the prior (CPU evaluation) and the prepended prior give the same model."""
    case = TINY[0]
    _, nv = pair(case)
    nvib.configure(nv, REGULARISED)
    inputs = case.inputs()
    split = output(nv, inputs)
    split_beams = generate(nv, inputs, num_beams=4)
    monkeypatch.setattr(nvib.core.masks, "SPLIT_PRIOR", False)
    assert (output(nv, inputs) - split).abs().max() <= 1e-5
    assert torch.equal(generate(nv, inputs, num_beams=4), split_beams)
    check_caches(case, nv, inputs)


@pytest.mark.parametrize(
    "case", [c for c in TINY + ROTARY if c.name in ("bart", "gpt2", "bert", "llama")], ids=lambda c: c.name
)
def test_eval_mode_with_gradients(case: Case):
    """Evaluation-mode NV attention with autograd on (e.g. gradients w.r.t. the knobs' parameters) works and
    equals the no-grad output; the NV parameters receive gradients."""
    _, nv = pair(case)
    nvib.configure(nv, REGULARISED)
    inputs = case.inputs()
    expected = output(nv, inputs)
    out = nv(**inputs)
    logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.allclose(logits, expected, atol=1e-6)
    logits.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nv.nvib_layers.parameters())
