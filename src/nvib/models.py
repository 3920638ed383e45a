"""Loading a model and its tokenizer from a local directory, and telling what kind of model it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvib.settings import ModelSection, resolve_path

__all__ = ["batch_kind", "load_model"]


def load_model(section: ModelSection, task: str | None = None, base_dir: str | Path = ".") -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) from local files only."""
    import transformers as tf

    path = resolve_path(section.path, base_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no model at {path} (expected a directory with config.json). "
            "Fix: set the model path to a local Hugging Face model directory; nothing is downloaded"
        )
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    kind = section.kind if section.kind != "auto" else _detect_kind(config, task, path)
    tok_path = resolve_path(section.tokenizer, base_dir) if section.tokenizer else path
    tokenizer = tf.AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models (GPT-2) ship without one
    if kind == "seq2seq":
        model = tf.AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True)
    elif kind == "causal_lm":
        model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(section.seed)
            model = tf.EncoderDecoderModel.from_encoder_decoder_pretrained(path, path, local_files_only=True)
        special = {
            "decoder_start_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if None in special.values():
            raise ValueError(
                f"{tok_path}: the tokenizer lacks [CLS]/[SEP]/[PAD] tokens needed for bert2bert. "
                "Fix: use a BERT-style model, or a seq2seq/causal_lm model kind"
            )
        for cfg in (model.config, model.generation_config):
            for key, token in special.items():
                setattr(cfg, key, token)
    model.config._name_or_path = str(path)
    return model.eval(), tokenizer


def _detect_kind(config: Any, task: str | None, path: Path) -> str:
    if getattr(config, "is_encoder_decoder", False) or config.model_type == "encoder-decoder":
        return "seq2seq"
    architectures = getattr(config, "architectures", None) or []
    if task == "lm" or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal_lm"
    raise ValueError(
        f"{path} is an encoder-only model ({config.model_type}) and cannot generate. "
        "Fix: set model kind to bert2bert to warm-start an encoder-decoder from it "
        "(its cross-attention is then untrained)"
    )


def batch_kind(model: nn.Module) -> str:
    return "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "lm"
