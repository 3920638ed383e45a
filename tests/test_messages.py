"""Messages that say what is wrong and how to fix it (issue 36, item 14): one line each, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers as tf
from cases import MINILM
from runs import DEMO_DATA, run_config, save_tiny_model, write_config
from test_cli import assert_user_error, invoke

from nvib.workflow.models import load_model
from nvib.workflow.settings import ConfigError, ModelSection, RunConfig
from nvib.workflow.storage import StorageError, open_storage


@pytest.fixture(scope="module")
def bart(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "bart")


def test_config_that_is_not_utf8_names_the_file_and_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes("task: summarisation\nmodel: {path: caf\u00e9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"run.yaml: byte 37 \(line 2\) is 0xe9, not UTF-8 text. Fix: save the file"):
        RunConfig.load(path)


def test_model_kind_lists_its_choices_and_refuses_others(bart: Path, tmp_path: Path) -> None:
    for command in ("prior", "finetune"):
        assert "[auto|seq2seq|causal_lm|bert2bert]" in invoke(command, "--help").output
    result = invoke("prior", bart, DEMO_DATA / "train.jsonl", "--kind", "seq2sq", "-o", tmp_path / "p.safetensors")
    assert_user_error(
        result, "--kind 'seq2sq' is not one of auto, seq2seq, causal_lm or bert2bert. Fix: --kind seq2seq"
    )
    assert len(result.output.strip().splitlines()) == 1
    assert "[constant|linear|cyclic]" in invoke("finetune", "--help").output


def test_unwritable_sqlite_storage_does_not_ask_for_a_server(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot write the Optuna storage .*Fix: free disk space") as err:
        open_storage(f"sqlite:///{tmp_path / 'no-such-folder' / 'study.db'}")
    assert "database server" not in str(err.value)


def test_run_directory_below_a_file_is_one_line(bart: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    config = write_config(tmp_path / "run.yaml", run_config(bart))
    result = invoke("run", config, "--run-dir", tmp_path / "file" / "x", "--no-progress")
    assert_user_error(result, f"cannot make the folder {tmp_path / 'file' / 'x'}", "Fix:")
    assert "Errno" not in result.output


def test_bert2bert_from_an_encoder_without_a_decoder_form(tmp_path: Path) -> None:
    tokenizer = tf.AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    config = tf.DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    tf.DistilBertModel(config).save_pretrained(tmp_path / "distil")
    tokenizer.save_pretrained(tmp_path / "distil")
    with pytest.raises(ValueError, match="distilbert model, which has no decoder form.*Fix: a BERT-style") as err:
        load_model(ModelSection(str(tmp_path / "distil"), kind="bert2bert"))
    assert len(str(err.value)) < 300


def test_finetune_lr_help_and_check_agree(tmp_path: Path) -> None:
    text = " ".join(invoke("finetune", "--help").output.split())
    lr = text[text.index("--lr ") : text.index("--nv-lr")]
    assert "> 0" in lr and "x>=0" not in lr
    result = invoke("finetune", tmp_path, DEMO_DATA / "train.jsonl", "-o", tmp_path / "out", "--lr", "0")
    assert_user_error(result, "--lr must be > 0, got 0. Fix:")


def test_prior_help_and_its_missing_model_error_describe_the_same_inputs(tmp_path: Path) -> None:
    """`nvib prior`'s help names what MODEL may be, and the error for a missing model suggests only what prior takes."""
    help_text = " ".join(invoke("prior", "--help").output.split())
    assert "hub id" in help_text and "--gguf-file" in help_text
    result = invoke("prior", tmp_path / "no-model", DEMO_DATA / "train.jsonl", "-o", tmp_path / "p.safetensors")
    assert_user_error(result, f"no model at {tmp_path / 'no-model'}", "--gguf-file", "hub id")
