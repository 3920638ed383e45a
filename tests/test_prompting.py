"""Few-shot prompts for causal LMs (issue 22 §1): the template's token ids, the demonstrations, the shared prefix
cache against the unshared prompt (stock and NV, dynamic and sliding-window caches), and a run with a prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from cases import MINILM
from runs import DEMO_DATA, run_config, save_tiny_model, write_config
from test_cli import invoke

import nvib
from nvib.workflow.data import Example, load_examples, pad_and_mask
from nvib.workflow.evaluate import Evaluator
from nvib.workflow.prompting import (
    FewShotPrompt,
    Scored,
    SharedPrefix,
    SharingError,
    Template,
    check_sharing,
    describe_sharing,
    draw_demonstrations,
    prompt_prior,
)
from nvib.workflow.settings import ConfigError, GenerationArgs, RunConfig

TEMPLATE = "Text: {source}\nSummary: {target}"


@pytest.fixture(scope="module")
def tokenizer():
    return tf.AutoTokenizer.from_pretrained(MINILM, local_files_only=True)


def tiny(kind: str, vocab: int, window: int = 128) -> tf.PreTrainedModel:
    torch.manual_seed(0)
    if kind == "gpt2":  # z-space sites
        config = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256, pad_token_id=0)
        return tf.GPT2LMHeadModel(config).eval()
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=256, pad_token_id=0, bos_token_id=101,
                  eos_token_id=102)  # fmt: skip
    if kind == "llama":  # a dynamic cache
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common)).eval()
    layers = ["sliding_attention", "sliding_attention", "full_attention"]  # sliding-window cache layers
    config = tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=window, layer_types=layers)
    return tf.Gemma3ForCausalLM(config).eval()


def examples(n: int = 4) -> list[Example]:
    return load_examples(DEMO_DATA / "dev.jsonl", limit=n)


def test_template_pieces_and_errors() -> None:
    t = Template.parse(TEMPLATE)
    assert (t.before, t.source_space, t.between, t.target_space) == ("Text:", " ", "\nSummary:", " ")
    for bad in ("{target} {source}", "{source}", "Text: {source} {target} end", "{source} {other} {target}"):
        with pytest.raises(ValueError, match="must hold"):
            Template.parse(bad)


def test_ids_are_the_pieces_tokenised_apart(tokenizer) -> None:
    demos = examples(2)
    prompt = FewShotPrompt(tokenizer, TEMPLATE, prefix="Summaries.", demonstrations=demos, max_source_tokens=5)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    e = prompt.encode(Example("one two three four five six seven", "a short one"))
    assert e.suffix == ids("Text:") + ids(" one two three four five six seven")[:5] + ids("\nSummary:")
    assert e.target == ids(" a short one")
    expected = [tokenizer.bos_token_id or tokenizer.cls_token_id] if tokenizer.bos_token_id else []
    expected += ids("Summaries.")
    for d in demos:
        de = prompt.encode(d)
        expected += de.suffix + de.target + ids("\n\n")
    assert prompt.prefix == expected
    assert FewShotPrompt(tokenizer, TEMPLATE, bos=False).prefix == []


def test_demonstrations_are_drawn_with_the_seed() -> None:
    pool = [Example(" ".join(["w"] * n), f"t{n}") for n in range(1, 30)] + [Example("no target here")]
    a, b = draw_demonstrations(pool, 3, seed=4), draw_demonstrations(pool, 3, seed=4)
    assert a == b and a != draw_demonstrations(pool, 3, seed=5) and all(e.target for e in a)
    assert all(10 <= len(e.source.split()) <= 12 for e in draw_demonstrations(pool, 3, 0, (10, 12)))
    with pytest.raises(ValueError, match="only 3 examples .* 10-12 source words"):
        draw_demonstrations(pool, 4, 0, (10, 12))


def test_stop_string_ends_generation_and_cuts_the_prediction(tokenizer) -> None:
    prompt = FewShotPrompt(tokenizer, TEMPLATE, stop="world")
    ids = tokenizer("hello big world again", add_special_tokens=False).input_ids
    assert not prompt.stopped(ids[:2], eos={102}) and prompt.stopped(ids[:3], eos={102})
    assert prompt.stopped([*ids[:1], 102], eos={102})
    assert prompt.prediction(ids) == "hello big"


def _engine(model, tokenizer, demos: int = 2, stop: str | None = "\n") -> SharedPrefix:
    prompt = FewShotPrompt(tokenizer, TEMPLATE, demonstrations=examples(6)[-demos:], stop=stop, max_source_tokens=24)
    return SharedPrefix(model, prompt)


def _stop_on_a_generated_word(engine: SharedPrefix, item) -> None:
    """Make the stop string a word the model generates second for `item`, so rows leave the batch early."""
    _, generated = engine.unshared(item, 4)
    engine.prompt.stop = engine.prompt.tokenizer.decode(generated[1:2])


@pytest.mark.filterwarnings("ignore:stdev_tau is above")  # random weights: tiny score-bias spreads
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_shared_prefix_is_the_unshared_prompt_stock_and_nv(kind: str, tokenizer) -> None:
    model = tiny(kind, tokenizer.vocab_size)
    engine = _engine(model, tokenizer)
    items = [engine.prompt.encode(e) for e in examples(4)]
    _stop_on_a_generated_word(engine, items[0])
    stock = check_sharing(engine, items, max_new_tokens=6, tol=1e-5)
    assert stock["greedy_identical"] and stock["nll_gap"] < 1e-5
    nll = [s.nll for s in engine.nll(items)]

    prior = prompt_prior(model, engine.prompt, examples(8), 4, progress=False)
    nvib.convert(model, prior=prior)
    engine.reset()
    assert [s.nll for s in engine.nll(items)] == pytest.approx(nll, abs=1e-4)  # identity knobs: the stock model
    nvib.configure(model, nvib.NVConfig(alpha_tau_d=0.0, stdev_tau_d=0.1))
    engine.reset()
    assert max(abs(a.nll - b) for a, b in zip(engine.nll(items), nll, strict=True)) > 1e-3  # the knobs act
    nv = check_sharing(engine, items, max_new_tokens=6, tol=1e-5)
    assert nv["greedy_identical"]


@pytest.mark.filterwarnings("ignore:stdev_tau is above", "ignore:at the finite alpha_tau")
@pytest.mark.parametrize(("kind", "window"), [("llama", 0), ("gpt2", 0), ("gemma3", 128), ("gemma3", 16)])
def test_prior_behind_the_shared_prefix_is_the_whole_prompts_prior(kind: str, window: int, tokenizer) -> None:
    """The prefix's cache shared in prior estimation: its tokens count once per row, as in the whole prompts, and
    every statistic is the whole prompts' to round-off (window 16: the prompts pass Gemma's sliding window)."""
    model = tiny(kind, tokenizer.vocab_size, window)
    prompt = _engine(model, tokenizer).prompt
    data = examples(7)
    pad = prompt.tokenizer.pad_token_id

    def whole_prompts():
        for start in range(0, len(data), 3):
            encoded = [prompt.encode(e) for e in data[start : start + 3]]
            ids, mask = pad_and_mask([prompt.prefix + e.suffix + e.target for e in encoded], pad)
            yield {"input_ids": ids, "attention_mask": mask}

    whole = nvib.EmpiricalPrior.estimate(model, whole_prompts(), progress=False)
    if kind == "llama":  # a converted model: estimated at the identity knobs, its cache continued as the stock one
        nvib.convert(model, prior=whole, config=nvib.NVConfig(alpha_tau_d=0.0, stdev_tau_d=0.1))
    shared = prompt_prior(model, prompt, data, 3, progress=False)
    assert set(shared.sites) == set(whole.sites)
    for name, w in whole.sites.items():
        s = shared.sites[name]
        assert s.count == w.count > len(prompt.prefix) * len(data)
        for stat in ("mean", "var", "sq_var", "log_alpha_mean", "log_alpha_std", "value_mean"):
            if getattr(w, stat) is not None:
                torch.testing.assert_close(getattr(s, stat), getattr(w, stat), rtol=1e-5, atol=1e-7, msg=stat)
        assert s.sample.shape == w.sample.shape


def test_a_shared_prefix_is_refused_for_seq2seq() -> None:
    config = tf.BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)  # fmt: skip
    batch = {"input_ids": torch.tensor([[5, 6, 2]]), "decoder_input_ids": torch.tensor([[2, 5]])}
    with pytest.raises(ValueError, match="decoder-only"):
        nvib.EmpiricalPrior.estimate(tf.BartForConditionalGeneration(config), [batch], prefix=[5], progress=False)


def test_changed_weights_need_a_reset(tokenizer) -> None:
    model = tiny("llama", tokenizer.vocab_size)
    engine = _engine(model, tokenizer)
    items = [engine.prompt.encode(e) for e in examples(2)]
    before = engine.nll(items)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(2.0)
    stale = engine.nll(items)  # the prefix's keys of the old weights
    engine.reset()
    fresh = engine.nll(items)
    assert abs(stale[0].nll - fresh[0].nll) > 1e-3 and abs(fresh[0].nll - before[0].nll) > 1e-3
    assert fresh[0].nll == pytest.approx(engine.unshared(items[0], 1)[0].nll, abs=1e-4)


def test_a_prompt_beyond_the_sliding_window_is_refused(tokenizer) -> None:
    engine = _engine(tiny("gemma3", tokenizer.vocab_size), tokenizer, demos=4)
    items = [engine.prompt.encode(e) for e in examples(2)]
    with pytest.raises(ValueError, match="beyond the model's sliding window \\(128\\).*Fix"):
        engine.evaluate(items, max_new_tokens=64)


def test_evaluator_uses_the_shared_prefix(tokenizer) -> None:
    model = tiny("llama", tokenizer.vocab_size)
    engine = _engine(model, tokenizer)
    evaluator = Evaluator(model, tokenizer, "summarisation", GenerationArgs(max_new_tokens=5, batch_size=3),
                          max_source_len=24, max_target_len=128, prompt=engine.prompt)  # fmt: skip
    xs = examples(4)
    outputs = evaluator.outputs(xs, generate=True, score=True)
    for x, o in zip(xs, outputs, strict=True):
        scored, generated = engine.unshared(engine.prompt.encode(x), 5)
        assert o.nll == pytest.approx(scored.nll, abs=1e-4) and o.nll_tokens == scored.n
        assert o.prediction == engine.prompt.prediction(generated) and o.n_tokens == len(generated)
    only = evaluator.outputs(xs, generate=False, score=True)
    assert [o.nll for o in only] == pytest.approx([o.nll for o in outputs], abs=1e-4)
    with pytest.raises(ValueError, match="greedily"):
        Evaluator(model, tokenizer, "summarisation", GenerationArgs(num_beams=2), max_source_len=8, max_target_len=8,
                  prompt=engine.prompt)  # fmt: skip


def _prompt_config(tmp_path: Path, **prompt) -> dict:
    config = run_config(save_tiny_model(tmp_path / "m", "llama"), search={"n_trials": 2, "slices": [4]})
    config["model"]["kind"] = "causal_lm"
    config["generation"] = {"max_new_tokens": 4, "batch_size": 4}
    config["prompt"] = {
        "template": TEMPLATE,
        "demonstrations": {"data": str(DEMO_DATA / "train.jsonl"), "k": 2, "seed": 1, "pool": 40},
        **prompt,
    }
    return config


def test_run_with_a_few_shot_prompt(tmp_path: Path) -> None:
    config = _prompt_config(tmp_path)
    result = invoke("run", write_config(tmp_path / "run.yaml", config), "--run-dir", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.output
    check = json.loads((tmp_path / "out" / "prompt_check.json").read_text())
    assert check["stock"]["greedy_identical"] and check["nv"]["greedy_identical"]
    assert max(check["stock"]["nll_gap"], check["nv"]["evaluate_nll_gap"]) <= 1e-4 and check["prefix_tokens"] > 10
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["equivalence_identical"] and "temperature" in scores["results"]
    rows = (tmp_path / "out" / "predictions" / "unconverted.docstrings.jsonl").read_text().splitlines()
    assert all("\n" not in json.loads(r)["prediction"] for r in rows)
    prior = nvib.EmpiricalPrior.load(tmp_path / "out" / "prior.safetensors")
    assert "prompt=" in prior.metadata["data"]
    # another prompt is another run: the directory refuses it
    config["prompt"]["demonstrations"]["seed"] = 2
    again = invoke("run", write_config(tmp_path / "run.yaml", config), "--run-dir", tmp_path / "out", "--no-progress")
    assert again.exit_code != 0 and "prompt" in again.output and "Traceback" not in again.output


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task": "lm"}, "task lm has none"),
        ({"generation": {"num_beams": 2}}, "greedy"),
        ({"prompt": {"template": "{source} only"}}, "must hold"),
        ({"prompt": {"demonstrations": {"data": "x.jsonl", "k": 0}}}, "k"),
    ],
)
def test_bad_prompt_configs(tmp_path: Path, change: dict, message: str) -> None:
    config = {**_prompt_config(tmp_path), **change}
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(config)


def test_the_check_fails_on_a_gap_or_a_different_output(tokenizer, monkeypatch) -> None:
    engine = _engine(tiny("llama", tokenizer.vocab_size), tokenizer)
    items = [engine.prompt.encode(e) for e in examples(2)]
    nll = engine.nll
    monkeypatch.setattr(engine, "nll", lambda xs, batch_size=16: [Scored(s.nll + 0.01 * s.n, s.n) for s in nll(xs)])
    with pytest.raises(SharingError, match="unshared NLL to 1.0e-02 nats per target token, greedy outputs identical"):
        check_sharing(engine, items, 3)
    monkeypatch.setattr(engine, "nll", nll)
    evaluate = engine.evaluate
    monkeypatch.setattr(
        engine, "evaluate", lambda *a, **k: (lambda s, g: (s, [x[:-1] + [0] for x in g]))(*evaluate(*a, **k))
    )
    with pytest.raises(SharingError, match="greedy outputs DIFFERENT"):
        check_sharing(engine, items, 3)


def test_the_check_reads_as_words() -> None:
    result = {"nll_gap": 7.4e-07, "evaluate_nll_gap": 2e-08, "greedy_identical": True}
    assert describe_sharing(result) == (
        "the shared prefix gives the unshared NLL to 7.4e-07 nats per target token, greedy outputs identical"
    )
    assert describe_sharing({**result, "evaluate_nll_gap": 3e-3, "greedy_identical": False}).endswith(
        "to 3.0e-03 nats per target token, greedy outputs DIFFERENT"
    )
