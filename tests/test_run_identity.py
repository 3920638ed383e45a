"""Every result from what the run says it used (issue 36, items 5–7, 9–11, 13): a run is identified by the contents of
what it reads, a resumed study refuses a changed objective, a prior meets only its own weights, baseline studies
resume after kill -9, and lengths and start points are checked before the first forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from cases import MINILM
from rich.console import Console
from runs import DEMO_DATA, run_config, save_tiny_model, write_config
from test_cli import assert_user_error, invoke

import nvib
from nvib.workflow.baselines import AttentionTemperature, tune
from nvib.workflow.identity import RunMismatchError, check_identity, refuse_changes
from nvib.workflow.limits import LengthError, Lengths, fit_lengths, position_limit
from nvib.workflow.objectives import TrialResult
from nvib.workflow.run import Run
from nvib.workflow.search import ObjectiveMismatchError
from nvib.workflow.settings import ConfigError, RunConfig
from nvib.workflow.stages.records import start_run
from nvib.workflow.train.finetune import prepare_model

TEMPLATE = "Text: {source}\nSummary: {target}"


@pytest.fixture(scope="module")
def bart(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "bart")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "gpt2", kind="causal_lm")


def _run(config: dict, base: Path, run_dir: Path, n_trials: int | None = None) -> Run:
    cfg = RunConfig.from_dict(config, base, str(base / "run.yaml"))
    return Run(cfg, run_dir, console=Console(stderr=True, record=True), progress=False, n_trials=n_trials)


def _demos(path: Path, n: int = 12, words: int = 12) -> Path:
    rows = [{"source": " ".join(f"word{i}x{j}" for j in range(words)), "target": f"summary {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _prompt_config(model_dir: Path, demos: str, **data) -> dict:
    config = run_config(model_dir, search={"n_trials": 1, "slices": [4]})
    config["model"]["kind"] = "causal_lm"
    config["data"].update(data)
    config["prompt"] = {"template": TEMPLATE, "demonstrations": {"data": demos, "k": 2, "seed": 1}}
    return config


# ---- issue 37, item 4: one piece compares a stored record with the current one (run identity, fine-tuning settings)


def test_one_record_check_serves_the_run_identity_and_the_finetune_settings(tmp_path: Path) -> None:
    path = tmp_path / "run" / "run.json"
    check_identity(path, {"model": "a", "task": "lm"}, "use a new run directory")  # the first call writes it
    assert json.loads(path.read_text()) == {"model": "a", "task": "lm"}
    check_identity(path, {"model": "a", "task": "lm"}, "use a new run directory")
    with pytest.raises(RunMismatchError, match=r"another model \(model: 'a' then, 'b' now\).*Fix: use a new run"):
        check_identity(path, {"model": "b", "task": "lm"}, "use a new run directory")
    with pytest.raises(RunMismatchError, match="another prompt"):  # a key only one side has is a change
        check_identity(path, {"model": "a", "task": "lm", "prompt": "p"}, "use a new run directory")
    settings = tmp_path / "ft" / "finetune_args.json"
    refusal = "{dir} holds checkpoints of a run with different settings ({changed})"
    refuse_changes(settings, {"lr": 1.0}, refusal, "another directory", shared_keys_only=True)  # none: nothing to do
    assert not settings.exists()  # never written by the check
    settings.parent.mkdir()
    settings.write_text(json.dumps({"lr": 1.0, "max_steps": 4}))
    refuse_changes(settings, {"lr": 1.0, "new_option": 2}, refusal, "another directory", shared_keys_only=True)
    with pytest.raises(ValueError, match=r"different settings \(lr\)\. Fix: another directory"):
        refuse_changes(settings, {"lr": 2.0}, refusal, "another directory", shared_keys_only=True)
    settings.write_text("{not json")
    refuse_changes(settings, {"lr": 2.0}, refusal, "another directory", shared_keys_only=True, damaged_ok=True)
    path.write_text("{not json")
    with pytest.raises(RunMismatchError, match="is damaged.*Fix: use a new run directory"):
        check_identity(path, {"model": "a", "task": "lm"}, "use a new run directory")


# ---- item 5: the run identity hashes the demonstrations' contents, not their path


def test_demonstrations_are_identified_by_their_contents(gpt2: Path, tmp_path: Path) -> None:
    _demos(tmp_path / "demos.jsonl")
    relative = _run(_prompt_config(gpt2, "demos.jsonl"), tmp_path, tmp_path / "run")
    absolute = _run(_prompt_config(gpt2, str(tmp_path / "demos.jsonl")), tmp_path, tmp_path / "run")
    before = relative.identity()
    assert before == absolute.identity()  # one file, two names: the same run
    start_run(relative.dir, relative.config)
    start_run(absolute.dir, absolute.config)  # resumes it
    _demos(tmp_path / "demos.jsonl", words=13)  # edited in place: another prompt
    edited = _run(_prompt_config(gpt2, "demos.jsonl"), tmp_path, tmp_path / "run")
    assert edited.identity()["prompt"] != before["prompt"]
    with pytest.raises(RunMismatchError, match="another prompt.*Fix: use a new run directory") as err:
        start_run(edited.dir, edited.config)
    assert "\n" not in str(err.value)


# ---- item 6: a resumed study refuses a changed objective


@pytest.fixture(scope="module")
def rouge_study(bart: Path, tmp_path_factory) -> tuple[dict, Path]:
    base = tmp_path_factory.mktemp("rouge")
    config = run_config(bart)
    config["search"] = {"n_trials": 1, "slices": [4], "metric": "rougeL", "stdev_unit": "bias",
                        "ranges": {"stdev_tau": [0.0, 0.5]}, "min_diversity": 0.5}  # fmt: skip
    config["generation"] = {"max_new_tokens": 4, "batch_size": 8}
    run = _run(config, base, base / "run")
    run.prior()
    run.search()
    return config, base


@pytest.mark.parametrize(
    "section, key, value",
    [("search", "stdev_unit", "prior"), ("generation", "max_new_tokens", 12), ("search", "min_diversity", 0.9)],
)
def test_resumed_study_refuses_a_changed_objective(rouge_study, section: str, key: str, value) -> None:
    config, base = rouge_study
    changed = {**config, section: {**config[section], key: value}}
    with pytest.raises(ObjectiveMismatchError, match=f"created for {key}=.*asks for {key}={value!r}.*Fix:") as err:
        _run(changed, base, base / "run").search()
    assert "\n" not in str(err.value)
    _run(config, base, base / "run").search()  # the same objective resumes


# ---- item 7: a prior meets only the weights it was estimated on


def test_prior_of_another_checkpoint_is_refused_unless_allowed(bart: Path, tmp_path: Path) -> None:
    other = save_tiny_model(tmp_path / "other", seed=1)  # same architecture, other weights
    first = _run(run_config(bart), tmp_path, tmp_path / "a")
    prior_file = first.prior_path
    first.prior()
    config = write_config(tmp_path / "b.yaml", run_config(other))
    refused = invoke("search", config, "--run-dir", tmp_path / "b", "--prior", prior_file, "--no-progress")
    assert_user_error(refused, "was estimated on other weights", "Fix:", "--foreign-prior")
    allowed = invoke("search", config, "--run-dir", tmp_path / "b", "--prior", prior_file, "--foreign-prior",
                     "--no-progress", "--n-trials", "1")  # fmt: skip
    assert allowed.exit_code == 0, allowed.output
    assert "foreign prior allowed" in " ".join(allowed.output.split())
    # fine-tuning: the workflow refuses it too, unless asked; nvib.convert (core) still takes it
    model = tf.AutoModelForSeq2SeqLM.from_pretrained(other)
    with pytest.raises(nvib.PriorMismatchError, match="other weights"):
        prepare_model(model, prior=prior_file)
    with pytest.warns(UserWarning, match="foreign prior allowed"):
        prepare_model(model, prior=prior_file, allow_foreign_prior=True)


# ---- item 9: a baseline study resumes after kill -9 as the knob search does


class _Fake(AttentionTemperature):
    def __init__(self):  # no model: set() is a no-op
        self.low, self.high, self.modules, self.scalings = 0.5, 2.0, [], []


class _Killed(SystemExit):
    """What kill -9 leaves: the trial stays RUNNING (Optuna fails trials only on Exception and Ctrl-C)."""


def _objective(kill_at: int | None = None):
    calls = []

    def objective(knobs: dict, n: int) -> TrialResult:
        calls.append(knobs)
        if len(calls) == kill_at:
            raise _Killed()
        return TrialResult(-((knobs["temperature"] - 1.37) ** 2))

    return objective


def test_baseline_tune_resumes_after_kill_as_if_uninterrupted(tmp_path: Path) -> None:
    kw = dict(n_trials=8, slices=[4], study_name="t", seed=3, n_startup_trials=3, heartbeat_interval=1, grace_period=2)
    whole, study = tune(_Fake(), _objective(), storage=f"sqlite:///{tmp_path / 'a.db'}", **kw)
    killed_db = f"sqlite:///{tmp_path / 'b.db'}"
    with pytest.raises(_Killed):
        tune(_Fake(), _objective(kill_at=6), storage=killed_db, **kw)
    resumed, again = tune(_Fake(), _objective(), storage=killed_db, **kw)
    states = [t.state.name for t in again.trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 8  # the stale trial failed, asked again
    stale = next(t for t in again.trials if t.state.name == "FAIL")
    retried = again.trials[stale.number + 1]
    assert retried.params == stale.params == study.trials[stale.number].params
    assert resumed == whole
    assert [t.params for t in again.trials if t.state.name == "COMPLETE"] == [t.params for t in study.trials]


# ---- items 10 and 11: lengths against the model's positions, generation capped


def test_position_tables_are_found_and_rotary_models_have_none(bart: Path, gpt2: Path) -> None:
    assert position_limit(tf.AutoModelForSeq2SeqLM.from_pretrained(bart)) == 128
    assert position_limit(tf.AutoModelForCausalLM.from_pretrained(gpt2)) == 128
    bert = tf.BertModel(tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=64))  # fmt: skip
    assert position_limit(bert) == 64
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32))  # fmt: skip
    assert position_limit(llama) is None


def test_huge_max_new_tokens_is_capped_with_a_warning_and_does_not_hang(tmp_path: Path) -> None:
    llama = save_tiny_model(tmp_path / "llama", kind="llama")  # rotary: positions configured, no table
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 96}))
    _demos(tmp_path / "demos.jsonl")
    config = _prompt_config(llama, "demos.jsonl")
    config["generation"] = {"max_new_tokens": 1_000_000_000, "batch_size": 4}
    run = _run(config, tmp_path, tmp_path / "run")
    run.validate()
    assert run.config.generation.max_new_tokens == 96
    assert "generation.max_new_tokens 1000000000 exceeds" in run.console.export_text()
    run.prior()
    assert run.check_prompt()["stock"]["greedy_identical"]  # the start-up check ends


def test_lengths_beyond_learned_positions(bart: Path, gpt2: Path) -> None:
    model = tf.AutoModelForSeq2SeqLM.from_pretrained(bart)
    names = {"source": "--max-source-len", "target": "--max-target-len", "new_tokens": "--new"}
    with pytest.raises(LengthError, match="--max-source-len 512 exceeds the model's 128 .*Fix: --max-source-len 128"):
        fit_lengths(model, Lengths(512, 12), names=names, explicit={"source"})
    fitted, notes = fit_lengths(model, Lengths(512, 12, 500), names=names)
    assert fitted == Lengths(128, 12, 127) and len(notes) == 2
    lm = tf.AutoModelForCausalLM.from_pretrained(gpt2)  # source and target in one sequence of 128
    fitted, _ = fit_lengths(lm, Lengths(512, 128, 64), names=names)
    assert fitted.source + fitted.target == 128 and fitted.new_tokens == 128 - fitted.source


def _long_data(path: Path) -> Path:
    rows = [{"source": " ".join(f"w{j}" for j in range(300)), "target": "short"} for _ in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_nvib_prior_checks_the_source_length_against_the_positions(bart: Path, tmp_path: Path) -> None:
    data = _long_data(tmp_path / "long.jsonl")
    refused = invoke("prior", bart, data, "-o", tmp_path / "p.safetensors", "--max-source-len", "512", "--no-progress")
    assert_user_error(refused, "--max-source-len 512 exceeds the model's 128 learned positions",
                      "Fix: --max-source-len 128")  # fmt: skip
    clamped = invoke("prior", bart, data, "-o", tmp_path / "p.safetensors", "--no-progress")
    assert clamped.exit_code == 0, clamped.output
    assert "--max-source-len 512 exceeds" in " ".join(clamped.output.split())


def test_few_shot_prompt_beyond_gpt2_positions_is_one_line(gpt2: Path, tmp_path: Path) -> None:
    _demos(tmp_path / "demos.jsonl", words=40)
    config = _prompt_config(gpt2, "demos.jsonl", max_source_len=64)
    config["prompt"]["demonstrations"]["k"] = 4
    with pytest.raises(LengthError, match="128 learned positions .*prompt prefix.*Fix:") as err:
        _run(config, tmp_path, tmp_path / "run").all()
    assert "\n" not in str(err.value) and not (tmp_path / "run" / "prior.safetensors").exists()


# ---- item 13: what can be checked is checked before the prior is estimated


def _sliding_window_model(path: Path) -> Path:
    tokenizer = tf.AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    torch.manual_seed(0)
    config = tf.MistralConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, sliding_window=24,
                              pad_token_id=0, bos_token_id=101, eos_token_id=102)  # fmt: skip
    tf.MistralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("case", ["start point", "dev dataset", "sliding window"])
def test_errors_come_before_the_prior(case: str, gpt2: Path, tmp_path: Path) -> None:
    config = run_config(gpt2)
    config["model"]["kind"] = "causal_lm"
    if case == "start point":
        config["search"] = {"start_points": [{"alpha_tau_e": 0.0}]}
        expected = r"start_points\[0\] sets alpha_tau_e.*Fix"
    elif case == "dev dataset":
        config["data"]["dev"] = {"dataset": "./no-such-folder", "split": "validation"}
        expected = "no-such-folder"
    else:
        _demos(tmp_path / "demos.jsonl")
        config = _prompt_config(_sliding_window_model(tmp_path / "mistral"), "demos.jsonl")
        expected = "beyond the model's sliding window"
    with pytest.raises((ValueError, OSError), match=expected):
        _run(config, tmp_path, tmp_path / "run").all()
    assert not (tmp_path / "run" / "prior.safetensors").exists()


@pytest.mark.parametrize("name", ["a\0b", "x" * 300, "a:b", "tab\tname"])
def test_test_set_names_that_cannot_name_a_file_are_refused_at_load(name: str, bart: Path) -> None:
    config = run_config(bart)
    config["data"]["test"] = {name: str(DEMO_DATA / "test.jsonl")}
    with pytest.raises(ConfigError, match="test set name .*Fix:") as err:
        RunConfig.from_dict(config)
    assert "\n" not in str(err.value).replace(repr(name)[1:-1], "")
