"""Tiny saved models and run configs for the pipeline and CLI tests (offline, seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
import yaml
from cases import MINILM

DEMO_DATA = Path(__import__("nvib").__file__).parent / "demo_data"


def save_tiny_model(path: Path, kind: str = "seq2seq", seed: int = 0) -> Path:
    """A random tiny BART (seq2seq), Marian (marian), GPT-2 (causal_lm) or Llama (llama) with MiniLM's tokenizer,
    saved under `path`."""
    tokenizer = tf.AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    special = {"pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102}
    torch.manual_seed(seed)
    if kind == "seq2seq":
        config = tf.BartConfig(
            vocab_size=tokenizer.vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_position_embeddings=128, decoder_start_token_id=101, forced_eos_token_id=None, **special,
        )  # fmt: skip
        model = tf.BartForConditionalGeneration(config)
    elif kind == "marian":
        config = tf.MarianConfig(
            vocab_size=tokenizer.vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_position_embeddings=128, decoder_start_token_id=0, **special,
        )  # fmt: skip
        model = tf.MarianMTModel(config)
    elif kind == "llama":  # rotary decoder-only, key space (docs/method.md §10)
        config = tf.LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, **special,
        )  # fmt: skip
        model = tf.LlamaForCausalLM(config)
    else:
        config = tf.GPT2Config(
            vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, **special
        )
        model = tf.GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_gguf(path: Path) -> tuple[Path, tf.GPT2LMHeadModel]:
    """A random tiny GPT-2 written as a float32 GGUF file (with a byte-level BPE tokenizer) in directory `path`,
    and the model it holds. Tensor names from the gguf package's own name map; GPT-2's Conv1D weights are
    stored transposed, as llama.cpp's converter does."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "Ġt", "es", "<|endoftext|>"]
    eos, n_layer = len(tokens) - 1, 2
    torch.manual_seed(0)
    config = tf.GPT2Config(
        vocab_size=len(tokens), n_embd=32, n_layer=n_layer, n_head=4, bos_token_id=eos, eos_token_id=eos
    )
    model = tf.GPT2LMHeadModel(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path / "tiny.gguf"), "gpt2")
    writer.add_block_count(n_layer)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * eos + [3])  # 3: a control token
    writer.add_token_merges(["Ġ t", "e s"])  # two: transformers 5.15 reads a one-element array as a scalar
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, n_layer)
    transposed = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
    for name, tensor in model.state_dict().items():
        base, _, suffix = name.rpartition(".")
        if (mapped := names.get_name(base)) is None:
            continue  # the tied lm_head
        array = tensor.numpy().astype(np.float32)
        writer.add_tensor(f"{mapped}.{suffix}", array.T.copy() if f"{mapped}.{suffix}".endswith(transposed) else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def run_config(model_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A run config over the toy data of `nvib tour` (demo_data/), small enough for a test; `overrides` replace whole
    sections."""
    config: dict[str, Any] = {
        "model": {"path": str(model_dir), "kind": "seq2seq"},
        "task": "summarisation",
        "data": {
            "train": str(DEMO_DATA / "train.jsonl"),
            "dev": str(DEMO_DATA / "dev.jsonl"),
            "test": {"docstrings": str(DEMO_DATA / "test.jsonl"), "debian": str(DEMO_DATA / "ood.jsonl")},
            "train_limit": 16,
            "dev_limit": 8,
            "test_limit": 6,
            "max_source_len": 32,
            "max_target_len": 12,
        },
        "prior": {"batch_size": 8},
        "generation": {"max_new_tokens": 5, "batch_size": 8},
        "search": {"n_trials": 4, "slices": [4, 8], "n_startup_trials": 2},
        "evaluation": {"bootstrap": 50},
    }
    config.update(overrides)
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and far faster on a CPU shared with other work (a module's tests use it
    with `pytestmark = pytest.mark.usefixtures("one_thread")` after importing it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
