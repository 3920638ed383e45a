"""The `nvib` command line: help, an end-to-end run and its resumption, sharded priors, clear errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from runs import DEMO_DATA, run_config, save_tiny_model, write_config
from typer.testing import CliRunner

from nvib.cli import app
from nvib.core.prior import EmpiricalPrior

COMMANDS = ["prior", "prior-merge", "search", "evaluate", "run", "tour", "finetune", "schema"]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> None:
    """Exit code 2, one readable line, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bart")


@pytest.fixture(scope="module")
def finished_run(model_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("run")
    config = write_config(tmp / "run.yaml", run_config(model_dir))
    result = invoke("run", config, "--run-dir", tmp / "out", "--no-progress")
    assert result.exit_code == 0, result.output
    return config, tmp / "out"


def trials(run_dir: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="nvib", storage=f"sqlite:///{run_dir / 'study.db'}").trials


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None) -> None:
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    if command is None:
        for name in COMMANDS:
            assert name in result.output


def test_run_writes_everything(finished_run: tuple[Path, Path]) -> None:
    _, out = finished_run
    for name in (
        "prior.safetensors",
        "study.db",
        "nv_config.json",
        "scores.json",
        "report.md",
        "report.html",
    ):
        assert (out / name).is_file(), name
    for plot in ("search_history", "knobs", "prior_stats", "prior_mass", "differences"):
        assert (out / "plots" / f"{plot}.png").is_file(), plot
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["results"]) == {"unconverted", "temperature", "nv_equivalence", "nv_tuned"}  # the default
    for variant in scores["results"]:
        for test_set in ("docstrings", "debian"):
            rows = [json.loads(line) for line in (out / "predictions" / f"{variant}.{test_set}.jsonl").open()]
            assert len(rows) == 6
            assert {"source", "reference", "prediction", "generated_tokens", "nll", "tokens"} <= set(rows[0])
            assert scores["tokens"][variant][test_set] == sum(r["generated_tokens"] for r in rows) > 0
            assert set(scores["results"][variant][test_set]) == {"rouge1", "rouge2", "rougeL", "nll"}
            assert set(scores["diversity"][variant][test_set]) == {"n", "distinct", "top_share", "distinct_2"}
    for test_set in ("docstrings", "debian"):
        assert set(scores["differences"]["nv_tuned"][test_set]["rougeL"]) >= {"delta", "ci_low", "ci_high"}
        assert set(scores["prior_mass"][test_set]) == {"encoder", "decoder", "cross"}
    assert len(trials(out)) == 4
    report = (out / "report.md").read_text()
    assert "NV tuned" in report and "Prior statistics" in report and "Attention on the prior" in report
    assert "## Verdict" in report and "the best baseline, temperature" in report
    assert "Output diversity" in report and "sampler seed" in report and " s per trial = " in report
    assert "search metric | nll (the search maximises its negative)" in report
    assert "diversity guard | not needed (likelihood objective)" in report
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_equivalence_scores_identical(finished_run: tuple[Path, Path]) -> None:
    _, out = finished_run
    scores = json.loads((out / "scores.json").read_text())
    assert scores["equivalence_identical"] is True
    for test_set in ("docstrings", "debian"):
        base, eq = scores["results"]["unconverted"][test_set], scores["results"]["nv_equivalence"][test_set]
        assert {m: v for m, v in eq.items() if m != "nll"} == {m: v for m, v in base.items() if m != "nll"}
        # the reference NLL moves a little: a random model's tiny prior spread leaves the prior some weight
        assert eq["nll"] == pytest.approx(base["nll"], rel=1e-4)
        assert scores["equivalence"][test_set]["max_relative_difference"] == pytest.approx(
            abs(eq["nll"] - base["nll"]) / base["nll"]
        )
        a, b = ([json.loads(line)["prediction"] for line in (out / "predictions" / f"{v}.{test_set}.jsonl").open()]
                for v in ("unconverted", "nv_equivalence"))  # fmt: skip
        assert a == b
        assert scores["differences"]["nv_equivalence"][test_set]["rouge1"]["delta"] == 0
    # the equivalence trial of the search is the first one
    assert trials(out)[0].user_attrs["start_point"] == "equivalence"


def test_rerun_resumes(finished_run: tuple[Path, Path]) -> None:
    config, out = finished_run
    before = {t.number: (t.datetime_start, t.value) for t in trials(out)}
    prior_mtime = (out / "prior.safetensors").stat().st_mtime_ns
    result = invoke("run", config, "--run-dir", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "reusing" in result.output and "4 finished trials; 0 to run" in result.output
    assert {t.number: (t.datetime_start, t.value) for t in trials(out)} == before
    assert (out / "prior.safetensors").stat().st_mtime_ns == prior_mtime
    # more trials: only the new one runs
    result = invoke("search", config, "--run-dir", out, "--n-trials", "5", "--no-progress")
    assert result.exit_code == 0, result.output
    after = trials(out)
    assert len(after) == 5
    assert {t.number: (t.datetime_start, t.value) for t in after[:4]} == before


def test_evaluate_command_uses_given_knobs(finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    config, out = finished_run
    knobs = tmp_path / "knobs.json"
    knobs.write_text(json.dumps({"alpha_tau_e": -3.0, "stdev_tau_d": 0.2}))
    result = invoke("evaluate", config, "--run-dir", out, "--knobs", knobs, "--no-progress")
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "scores.json").read_text())
    # alpha_tau = +inf is the string "inf": JSON has no Infinity (issue 36)
    assert scores["tuned"]["alpha_tau_e"] == -3.0 and scores["tuned"]["alpha_tau_c"] == "inf"


def test_shard_priors_merge_to_full(model_dir: Path, tmp_path: Path) -> None:
    data = DEMO_DATA / "train.jsonl"
    common = ["--batch-size", "4", "--limit", "18", "--max-source-len", "24", "--no-progress"]
    assert invoke("prior", model_dir, data, "-o", tmp_path / "full.safetensors", *common).exit_code == 0
    parts = []
    for i in range(3):  # 5 batches (the last one short): shards get batches {0, 3}, {1, 4}, {2}
        parts.append(tmp_path / f"part{i}.safetensors")
        result = invoke("prior", model_dir, data, "-o", parts[-1], "--shard", f"{i}/3", *common)
        assert result.exit_code == 0, result.output
    result = invoke("prior-merge", *parts, "-o", tmp_path / "merged.safetensors")
    assert result.exit_code == 0, result.output
    full = EmpiricalPrior.load(tmp_path / "full.safetensors")
    merged = EmpiricalPrior.load(tmp_path / "merged.safetensors")
    assert merged.metadata["complete"] is True
    assert set(full.sites) == set(merged.sites)
    for name, a in full.sites.items():
        b = merged.sites[name]
        assert a.count == b.count
        torch.testing.assert_close(a.mean, b.mean, atol=1e-10, rtol=0)
        torch.testing.assert_close(a.var, b.var, atol=1e-10, rtol=0)
        assert abs(a.log_alpha_mean - b.log_alpha_mean) < 1e-10
        assert abs(a.log_alpha_std - b.log_alpha_std) < 1e-10


def test_error_bad_model_path(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.yaml", run_config(tmp_path / "no-such-model"))
    result = invoke("run", config, "--run-dir", tmp_path / "out", "--no-progress")
    assert_user_error(result, "no model at", "Fix:")


def test_error_malformed_data(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a b c", "target": "a"}\n{"source": "oops"\n')
    config = run_config(model_dir)
    config["data"] = {**config["data"], "train": str(bad)}
    result = invoke("run", write_config(tmp_path / "run.yaml", config), "--run-dir", tmp_path / "out", "--no-progress")
    assert_user_error(result, "bad.jsonl, line 2: malformed JSON", "Fix:")


def test_error_unknown_config_key(model_dir: Path, tmp_path: Path) -> None:
    config = run_config(model_dir, search={"n_trails": 3})
    result = invoke("run", write_config(tmp_path / "run.yaml", config), "--no-progress")
    assert_user_error(result, "unknown key 'search.n_trails'", "did you mean 'n_trials'", "Fix:")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"task": "summarization"}, "task must be one of summarisation, translation, lm"),
        ({"search": {"slices": [8, 4]}}, "strictly increasing"),
        ({"search": {"ranges": {"alpha_tau_x": [0, 1]}}}, "unknown keys ['alpha_tau_x']"),
        ({"generation": {"num_beams": "four"}}, "generation.num_beams must be an integer"),
    ],
)
def test_error_bad_config_values(model_dir: Path, tmp_path: Path, section: dict, message: str) -> None:
    config = write_config(tmp_path / "run.yaml", run_config(model_dir, **section))
    assert_user_error(invoke("run", config, "--no-progress"), message)


def test_schema_command_prints_the_config_schema() -> None:
    result = invoke("schema")
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    assert schema["additionalProperties"] is False and set(schema["required"]) == {"model", "task", "data"}
    assert "nvib schema" in " ".join(invoke("run", "--help").output.split())


def test_tour_is_the_toy_run_and_demo_its_hidden_old_name(tmp_path: Path) -> None:
    """One name per thing: `make demo` is the Gemma benchmark, `nvib tour` the toy run (`demo`: hidden alias)."""
    commands = invoke("--help").output.split("Commands:")[1].split()
    assert "tour" in commands and "demo" not in commands
    assert "--demo" not in invoke("run", "--help").output and "--tour" in invoke("run", "--help").output
    result = invoke("demo", "--help")
    assert result.exit_code == 0 and "Old name of `nvib tour`" in result.output
    config = tmp_path / "run.yaml"
    config.write_text("task: lm\n")
    result = invoke("run", config, "--demo")
    assert "`nvib run --demo` is now `nvib run --tour`" in result.output
    assert_user_error(result, "give a config file or --tour (not both)")


def test_error_missing_files(model_dir: Path, tmp_path: Path) -> None:
    assert_user_error(invoke("run", tmp_path / "nope.yaml"), "no config file at", "Fix:")
    assert_user_error(
        invoke("prior-merge", tmp_path / "a.safetensors", "-o", tmp_path / "m.safetensors"), "no prior file"
    )
    data = DEMO_DATA / "train.jsonl"
    assert_user_error(invoke("prior", model_dir, data, "--shard", "3/2"), "need 0 <= i < n", "Fix:")
    assert_user_error(invoke("prior", model_dir, tmp_path / "none.jsonl"), "file not found", "Fix:")
    config = write_config(tmp_path / "run.yaml", run_config(model_dir))
    assert_user_error(invoke("search", config, "--run-dir", tmp_path / "empty"), "no prior at", "Fix:")
    assert_user_error(invoke("run", config, "--tour"), "not both")


def test_metric_option(finished_run: tuple[Path, Path]) -> None:
    config, out = finished_run
    assert_user_error(
        invoke("search", config, "--run-dir", out, "--metric", "bleu", "--no-progress"),
        "search.metric 'bleu' is not computed for task 'summarisation'",
    )
    # the stored study optimised the default (nll): another objective is refused, not mixed in
    assert_user_error(
        invoke("search", config, "--run-dir", out, "--metric", "rougeL", "--no-progress"),
        "was created for metric='nll', this run asks for metric='rougeL'",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prior_under_accelerate_launch_equals_single_process(model_dir: Path, tmp_path: Path) -> None:
    """`accelerate launch --num_processes 2 -m nvib prior`: ranks shard the batches, rank 0 writes the merge."""
    data = DEMO_DATA / "train.jsonl"
    common = ["--batch-size", "4", "--limit", "18", "--max-source-len", "24", "--no-progress"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks: the same float32 kernels give the same token vectors
    try:
        assert invoke("prior", model_dir, data, "-o", tmp_path / "single.safetensors", *common).exit_code == 0
    finally:
        torch.set_num_threads(threads)
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "nvib",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["prior", str(model_dir), str(data), "-o", str(tmp_path / "launched.safetensors"), *common]
    result = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from 2 processes" in result.stderr
    single = EmpiricalPrior.load(tmp_path / "single.safetensors")
    launched = EmpiricalPrior.load(tmp_path / "launched.safetensors")
    assert launched.metadata["complete"] is True
    assert set(single.sites) == set(launched.sites)
    for name, a in single.sites.items():
        b = launched.sites[name]
        assert a.count == b.count
        assert (a.mean - b.mean).abs().max() <= 1e-9
        assert (a.m2 - b.m2).abs().max() <= 1e-9 * max(1.0, float(a.m2.abs().max()))
        assert (a.var - b.var).abs().max() <= 1e-9
        assert abs(a.norm_mean - b.norm_mean) <= 1e-9 and abs(a.log_alpha_std - b.log_alpha_std) <= 1e-9


def test_prior_launch_and_shard_conflict(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("prior", model_dir, DEMO_DATA / "train.jsonl", "--shard", "0/2")
    assert_user_error(result, "under a 2-process launch", "Fix: drop --shard")


def test_error_storage_driver_missing(
    finished_run: tuple[Path, Path], model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out = finished_run
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the PostgreSQL driver were not installed
    raw = run_config(model_dir, search={"storage": "postgresql://nvib:secret@127.0.0.1:5432/nvib"})
    config = write_config(tmp_path / "run.yaml", raw)
    result = invoke("search", config, "--run-dir", tmp_path / "o", "--prior", out / "prior.safetensors")
    assert_user_error(result, "needs the database driver 'psycopg'", "Fix: pip install 'psycopg[binary]'")
    assert "secret" not in result.output
