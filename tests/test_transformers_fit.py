"""A converted model is still a transformers model (issue 23): activation checkpointing, torch.compile, changing the
attention implementation, the meta device, standalone halves and sub-model modes, save_pretrained."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as tf
from cases import ROTARY, TINY, Case
from test_equivalence import generate, output

import nvib
from nvib.core import attention

BY_NAME = {case.name: case for case in TINY + ROTARY}
# a regularised setting: every term of the fast form is in use, the prior has a visible weight
KNOBS = nvib.NVConfig(
    alpha_tau_e=0.0, alpha_tau_c=0.0, alpha_tau_d=0.0, stdev_tau_e=0.3, stdev_tau_c=0.3, stdev_tau_d=0.3
)


def converted(case: Case, config: nvib.NVConfig = KNOBS, train: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = case.build().train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the visible-prior warning of a finite τ_α
        return nvib.convert(model, config)


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def train_grads(model: torch.nn.Module, case: Case) -> dict[str, torch.Tensor]:
    """Gradients of one training step (task loss + KL terms) with the sampling noise seeded."""
    inputs = case.inputs()
    labels = inputs["decoder_input_ids"] if case.kind == "seq2seq" else inputs["input_ids"]
    torch.manual_seed(1)
    loss = model(**inputs, labels=labels, use_cache=False).loss + nvib.kl_loss(model, 0.1, 0.1)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# ---- 1. activation checkpointing -----------------------------------------------------------------------------------


def enable_checkpointing(model: torch.nn.Module, **kwargs) -> None:
    """`activation_checkpointing_enable` where transformers has it (5.25 deprecates `gradient_checkpointing_enable`);
    the older name on releases without it (5.15), as the README says."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


@pytest.mark.parametrize("name", ["bart", "t5", "bert2bert", "gpt2", "llama"])
def test_gradient_checkpointing_replays_the_noise(name: str) -> None:
    """Non-reentrant checkpointing (transformers' default) recomputes each layer with the same noise, so the
    gradients equal those without checkpointing; reentrant checkpointing runs too."""
    case = BY_NAME[name]
    plain = train_grads(no_dropout(converted(case, train=True)), case)
    model = no_dropout(converted(case, train=True))
    enable_checkpointing(model)
    checkpointed = train_grads(model, case)
    assert plain.keys() == checkpointed.keys() and any("nvib_layers" in n for n in plain)
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g, rtol=1e-5, atol=1e-6, msg=n)
    model = no_dropout(converted(case, train=True))
    enable_checkpointing(model, use_reentrant=True)
    reentrant = train_grads(model, case)
    assert all(torch.isfinite(g).all() for g in reentrant.values())


# ---- 2. torch.compile ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", TINY + ROTARY, ids=lambda c: c.name)
def test_compile_fullgraph(case: Case) -> None:
    """The forward traces as one graph (no graph break) and computes what the eager NV model computes."""
    model = converted(case)
    inputs = case.inputs()
    ref = output(model, inputs)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    try:
        torch.testing.assert_close(output(compiled, inputs), ref, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["bart", "llama"])
def test_compiled_static_cache_generate(name: str) -> None:
    case = BY_NAME[name]
    model = converted(case)
    model.generation_config.pad_token_id = case.pad
    inputs = case.inputs()
    expected = generate(model, inputs, cache_implementation="static")
    model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
    try:
        assert torch.equal(generate(model, inputs, cache_implementation="static"), expected)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["bart", "gpt2"])
def test_compiled_model_reads_the_fold_of_the_eager_call(name: str, monkeypatch) -> None:
    """After an eager evaluation call a compiled forward folds nothing itself (docs/method.md §6's weights are graph
    inputs), follows `nvib.configure`, and after training or `load_state_dict` (weights changed in place) folds again
    rather than read a stale memo."""
    case = BY_NAME[name]
    model, inputs = converted(case).eval(), case.inputs()
    ref = output(model, inputs)  # eager: folds
    traced, build = [], attention.fast_weights  # `static` of every fold built, eager (False) or traced (True)
    monkeypatch.setattr(attention, "fast_weights", lambda s, static=False: traced.append(static) or build(s, static))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    try:
        torch.testing.assert_close(output(compiled, inputs), ref, rtol=1e-5, atol=1e-5)
        assert True not in traced  # no fold in the graph
        other = nvib.NVConfig(alpha_tau_e=1.0, alpha_tau_c=1.0, alpha_tau_d=1.0, stdev_tau_e=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nvib.configure(model, other)
        before = output(compiled, inputs)
        torch.testing.assert_close(before, output(converted(case, other), inputs), rtol=1e-5, atol=1e-5)
        assert True not in traced
        model.train()
        model(**inputs)  # a training forward, then what an optimizer step does
        with torch.no_grad():
            for layer in nvib.nv_layers(model).values():
                layer.alpha_bias.sub_(3.0)
        model.eval()
        got = output(compiled, inputs)
        assert True in traced  # no memo: the graph folds
        torch.testing.assert_close(got, output(model, inputs), rtol=1e-5, atol=1e-5)
        assert (got - before).abs().max() > 1e-4  # the edit shows (10× the tolerance)
        output(model, inputs)  # eager: a memo again
        state = {k: v + 0.5 if "alpha_bias" in k else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)  # in place: the load drops the memo
        loaded = output(compiled, inputs)
        torch.testing.assert_close(loaded, output(model, inputs), rtol=1e-5, atol=1e-5)
        assert (loaded - got).abs().max() > 1e-4
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["bart", "llama"])
def test_output_attentions_set_in_the_config(name: str) -> None:
    """With `config.output_attentions` set (on the eager model: its setter refuses other implementations) transformers
    collects every attention module's weights and passes the modules nothing: NV returns what the argument gives."""
    case = BY_NAME[name]
    torch.manual_seed(0)
    model = case.build().eval()
    model.set_attn_implementation("eager")
    model.config.output_attentions = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nvib.convert(model, KNOBS)
    inputs = case.inputs()
    with torch.no_grad():
        got, asked = model(**inputs), model(**inputs, output_attentions=True)
    names = [n for n in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions") if n in asked]
    assert names and all(len(getattr(asked, n)) > 0 for n in names)
    for n in names:
        for a, b in zip(getattr(got, n), getattr(asked, n), strict=True):
            torch.testing.assert_close(a, b)
    with torch.no_grad():
        assert model(**inputs, output_attentions=False).get(names[0]) is None  # the argument still decides


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["bart", "llama"])
def test_returned_attention_weights_carry_the_outputs_gradient(name: str, train: bool) -> None:
    """As with transformers' eager attention, the output is computed from the weights returned, so that
    `retain_grad` on them sees the output's gradient (transformers' test_retain_grad_hidden_states_attentions)."""
    case = BY_NAME[name]
    model, inputs = converted(case, train=train), case.inputs()
    out = model(**inputs, output_attentions=True)
    names = [n for n in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions") if n in out]
    first = [getattr(out, n)[0] for n in names]
    for a in first:
        a.retain_grad()
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).square().sum().backward()
    assert all(a.grad is not None and a.grad.abs().max() > 0 for a in first), names


# ---- 3. the attention implementation after conversion --------------------------------------------------------------


@pytest.mark.parametrize("name", ["bart", "bert2bert", "gpt2", "llama"])
def test_set_attn_implementation_keeps_nv(name: str) -> None:
    case = BY_NAME[name]
    model = converted(case)
    inputs = case.inputs()
    ref = output(model, inputs)
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(output(model, inputs), ref, rtol=1e-5, atol=1e-5)
    for sub in model.modules():
        if isinstance(sub, tf.PreTrainedModel):
            sub.set_attn_implementation("sdpa")
            sub.config._attn_implementation = "eager"  # what transformers' assisted-decoding tests do
    model.set_attn_implementation({"": "eager"})
    assert nvib.is_converted(model)
    torch.testing.assert_close(output(model, inputs), ref, rtol=1e-5, atol=1e-5)  # NV, with eager masks
    with pytest.raises(ValueError, match="'flash_attention_2' cannot run NV attention.*nvib.unload"):
        model.set_attn_implementation("flash_attention_2")
    stock = nvib.unload(model)
    assert stock.config._attn_implementation == "eager"  # what was asked for last
    assert "set_attn_implementation" not in stock.__dict__
    torch.manual_seed(0)
    valid = inputs["attention_mask"].bool() if case.kind == "lm" else slice(None)  # eager and sdpa differ on pads
    torch.testing.assert_close(output(stock, inputs)[valid], output(case.build().eval(), inputs)[valid])


# ---- 4. the meta device --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bart", "llama"])
def test_convert_on_the_meta_device(name: str) -> None:
    """Convert a model built on the meta device, then `to_empty` and transformers' `init_weights`: the NV layers
    are what a conversion of the materialised model gives (with its prior), and the default is the model itself."""
    case = BY_NAME[name]
    config = case.build().config
    real = case.build().eval()
    prior = nvib.EmpiricalPrior.estimate(real, [case.inputs(seed=s) for s in range(2)], progress=False)
    for knobs, with_prior in ((KNOBS, prior), (nvib.NVConfig(), None)):
        with torch.device("meta"):
            model = type(real)(config)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning that needs values
            nvib.convert(model, knobs, prior=with_prior)
        model.to_empty(device="cpu")
        model.init_weights()
        model.eval()
        stock = nvib.unload(copy.deepcopy(model))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = nvib.convert(copy.deepcopy(stock), knobs, prior=with_prior)
        ours, theirs = (m._modules["nvib_layers"].state_dict() for m in (model, fresh))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
        inputs = case.inputs()
        torch.testing.assert_close(output(model, inputs), output(fresh, inputs), rtol=0, atol=0)
        if with_prior is None:
            torch.testing.assert_close(output(model, inputs), output(stock, inputs), rtol=1e-5, atol=1e-5)


# ---- 5. sub-models -------------------------------------------------------------------------------------------------


def test_sub_model_eval_reaches_its_nv_layers() -> None:
    """`model.get_decoder().eval()` stops sampling at the decoder's sites (NV follows the attention module's mode),
    and an eval-mode decoder call over a filled cache with a mask works."""
    case = BY_NAME["bart"]
    model = no_dropout(converted(case, train=True))
    decoder = model.get_decoder().eval()
    inputs = case.inputs()
    enc = torch.randn(3, 11, 32)
    with torch.no_grad():
        first = decoder(input_ids=inputs["decoder_input_ids"], encoder_hidden_states=enc).last_hidden_state
        again = decoder(input_ids=inputs["decoder_input_ids"], encoder_hidden_states=enc).last_hidden_state
        assert torch.equal(first, again)
        out = decoder(
            input_ids=inputs["decoder_input_ids"][:, :4], encoder_hidden_states=enc, use_cache=True,
            encoder_attention_mask=inputs["attention_mask"],
        )  # fmt: skip
        step = decoder(
            input_ids=inputs["decoder_input_ids"][:, 4:5], encoder_hidden_states=enc, use_cache=True,
            past_key_values=out.past_key_values, encoder_attention_mask=inputs["attention_mask"],
            attention_mask=torch.ones(3, 5, dtype=torch.long),
        )  # fmt: skip
        full = decoder(
            input_ids=inputs["decoder_input_ids"][:, :5], encoder_hidden_states=enc,
            encoder_attention_mask=inputs["attention_mask"],
        ).last_hidden_state  # fmt: skip
    torch.testing.assert_close(step.last_hidden_state[:, 0], full[:, 4], rtol=1e-4, atol=1e-5)
    model.get_encoder().train()  # the encoder's sites sample again, the decoder's do not
    with torch.no_grad():
        a, b = (model.get_encoder()(input_ids=inputs["input_ids"]).last_hidden_state for _ in range(2))
    assert not torch.equal(a, b)


def test_training_over_a_filled_cache_has_kl_terms() -> None:
    """A training-mode z-space forward on top of a cache, with a mask: KL over this call's sampled tokens."""
    case = BY_NAME["bart"]
    model = converted(case, train=True)
    inputs = case.inputs()
    out = model(**{k: v[:, :4] if k.startswith("decoder") else v for k, v in inputs.items()}, use_cache=True)
    model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
        decoder_input_ids=inputs["decoder_input_ids"][:, 4:6], past_key_values=out.past_key_values,
        decoder_attention_mask=torch.ones(3, 6, dtype=torch.long), use_cache=True,
    )  # fmt: skip
    assert torch.isfinite(nvib.kl_loss(model))


@pytest.mark.parametrize("half", ["encoder", "decoder"])
def test_standalone_half_converts(half: str) -> None:
    """A `BartEncoder` / `BartDecoder` or a T5 stack on its own: sites found, default NV equals it."""
    for name in ("bart", "t5"):
        whole = BY_NAME[name].build().eval()
        part = getattr(whole, f"get_{half}")()
        nv = nvib.convert(copy.deepcopy(part))
        kinds = {layer.kind for layer in nvib.nv_layers(nv).values()}
        assert kinds == ({"encoder"} if half == "encoder" else {"decoder", "cross"})
        ids = BY_NAME[name].inputs()["input_ids"]
        extra = {} if half == "encoder" else {"encoder_hidden_states": torch.randn(3, 11, 32)}
        with torch.no_grad():
            torch.testing.assert_close(
                nv(input_ids=ids, **extra).last_hidden_state, part(input_ids=ids, **extra).last_hidden_state,
                rtol=1e-5, atol=1e-5,
            )  # fmt: skip


# ---- 6. save_pretrained --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bart", "llama"])
def test_save_pretrained_writes_the_nv_model(name: str, tmp_path) -> None:
    case = BY_NAME[name]
    model = converted(case).eval()
    prior = nvib.EmpiricalPrior.estimate(model, [case.inputs(seed=s) for s in range(2)], progress=False)
    stock = nvib.unload(copy.deepcopy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nvib.convert(copy.deepcopy(stock), KNOBS, prior=prior)
    inputs = case.inputs()
    with pytest.warns(UserWarning, match=r"nvib.load\(.*from_pretrained on that directory gives the stock"):
        model.save_pretrained(tmp_path, safe_serialization=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = nvib.load(tmp_path)
    torch.testing.assert_close(output(loaded, inputs), output(model, inputs), rtol=0, atol=0)
    plain = type(stock).from_pretrained(tmp_path).eval()  # the stock model (the NV weights are ignored)
    assert not nvib.is_converted(plain)
    torch.testing.assert_close(output(plain, inputs), output(stock, inputs), rtol=0, atol=0)


# ---- 7. attention weights and the config's implementation (issue 38) -----------------------------------------------


def weights_of(out) -> dict[str, tuple[torch.Tensor, ...]]:
    names = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
    return {n: getattr(out, n) for n in names if getattr(out, n, None) is not None}


@pytest.mark.parametrize("name", ["gpt2", "bart", "t5", "bert", "llama", "gemma3_text"])
def test_attention_weights_as_the_stock_model_returns_them(name: str) -> None:
    """`output_attentions=True` gives one weight tensor per attention module, as the eager stock model does (GPT-2
    drops the argument: transformers' output-capturing hooks ask for them), equal to stock's at the identity."""
    case = BY_NAME[name]
    torch.manual_seed(0)
    stock = case.build().eval()
    stock.set_attn_implementation("eager")
    nv = nvib.convert(copy.deepcopy(stock))
    inputs = case.inputs()
    with torch.no_grad():
        ref, got = weights_of(stock(**inputs, output_attentions=True)), weights_of(nv(**inputs, output_attentions=True))
    assert ref.keys() == got.keys() and any(len(w) > 0 for w in ref.values())
    for n in ref:
        assert len(got[n]) == len(ref[n]), n
        for a, b in zip(got[n], ref[n], strict=True):
            torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)  # row 0 has no padding


def test_assisted_generation_returns_attention_weights() -> None:
    """GPT-2's assisted decoding with output_attentions and return_dict_in_generate (an IndexError when NV returned
    no weights) gives what the stock models give."""
    case = BY_NAME["gpt2"]
    outs = []
    for convert in (False, True):
        torch.manual_seed(0)
        model, assistant = case.build().eval(), case.build().eval()
        for m in (model, assistant):
            m.set_attn_implementation("eager")  # stock sdpa returns no weights
            m.generation_config.pad_token_id = case.pad
            if convert:
                nvib.convert(m)
        ids = case.inputs()["input_ids"][:1]
        with torch.no_grad():
            outs.append(
                model.generate(
                    input_ids=ids,
                    assistant_model=assistant,
                    max_new_tokens=4,
                    do_sample=False,
                    output_attentions=True,
                    return_dict_in_generate=True,
                )  # fmt: skip
            )
    ref, got = outs
    assert torch.equal(got.sequences, ref.sequences)
    assert len(got.attentions) == len(ref.attentions) > 0
    assert [len(step) for step in got.attentions] == [len(step) for step in ref.attentions]


@pytest.mark.parametrize("name", ["bart", "bert2bert", "gpt2", "llama", "t5"])
def test_config_keeps_the_users_implementation(name: str, monkeypatch) -> None:
    """The configs keep the implementation the user chose ("eager" here), so `config.output_attentions = True`
    (refused for any other name) works and returns what it returns on the stock model; the masks are still NV's
    (`masks.nv_mask`), and only on converted models; `unload` leaves the names as they were."""
    from nvib.core import masks

    case = BY_NAME[name]
    torch.manual_seed(0)
    stock = case.build().eval()
    stock.set_attn_implementation("eager")
    model = copy.deepcopy(stock)
    before = [m.config._attn_implementation for m in model.modules() if isinstance(m, tf.PreTrainedModel)]
    nvib.convert(model)
    after = [m.config._attn_implementation for m in model.modules() if isinstance(m, tf.PreTrainedModel)]
    assert after == before and model.config._attn_implementation == "eager"
    made, nv_mask = [], masks.nv_mask

    def counted(*args, **kwargs):
        made.append(1)
        return nv_mask(*args, **kwargs)

    monkeypatch.setattr(masks, "nv_mask", counted)
    for m in (stock, model):
        m.config.output_attentions = True  # a ValueError when the config read "nvib"
    inputs = case.inputs()
    with torch.no_grad():
        ref, got = weights_of(stock(**inputs)), weights_of(model(**inputs))
    assert made  # the masks were NV's
    assert name in ("bert2bert", "t5") or any(len(w) > 0 for w in got.values())  # their halves have own configs
    assert {n: len(w) for n, w in got.items()} == {n: len(w) for n, w in ref.items()}
    model.config.output_attentions = False
    with pytest.raises(ValueError, match='`attn_implementation="foo"` is not supported'):  # transformers' own error
        model.set_attn_implementation("foo")
    nvib.unload(model)
    assert [m.config._attn_implementation for m in model.modules() if isinstance(m, tf.PreTrainedModel)] == before
    made.clear()
    with torch.no_grad():
        model(**inputs)
    assert not made  # a stock model's masks are the stock ones


def test_a_non_host_implementation_becomes_sdpa_until_unload() -> None:
    """A config naming an implementation NV cannot stand in for (flex here) reads "sdpa" while converted."""
    case = BY_NAME["llama"]
    torch.manual_seed(0)
    model = case.build().eval()
    inputs = case.inputs()
    ref = output(model, inputs)
    model.config._attn_implementation = "flex_attention"
    nvib.convert(model)
    assert model.config._attn_implementation == "sdpa"
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(output(model, inputs)[valid], ref[valid], rtol=1e-5, atol=1e-5)
    nvib.unload(model)
    assert model.config._attn_implementation == "flex_attention"
