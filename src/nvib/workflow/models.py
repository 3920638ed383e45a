"""Loading a model and its tokenizer from a local directory, and telling what kind of model it is."""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from torch import nn

from nvib.workflow.data import BatchKind
from nvib.workflow.settings import ModelSection, resolve_path

__all__ = ["HUB_ID", "NO_REMOTE_CODE", "batch_kind", "device", "load_model", "model_location", "no_custom_code"]

#: Passed to every transformers load: code shipped with a model (its config's auto_map) never runs, and transformers
#: never asks on the terminal whether it may.
NO_REMOTE_CODE = {"trust_remote_code": False}


#: ``owner/name`` as the Hugging Face hub spells a repository id.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_location(value: str, base_dir: str | Path = ".") -> Path | str:
    """Where a config's model (or tokenizer) comes from: a local directory (relative to the config), or, when
    there is none and ``value`` reads ``owner/name``, that hub id (loaded from the hub, or its local cache
    under ``HF_HUB_OFFLINE=1``)."""
    path = resolve_path(value, base_dir)
    return value if not path.exists() and HUB_ID.match(value) and not value.startswith(".") else path


def load_model(section: ModelSection, task: str | None = None, base_dir: str | Path = ".") -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) from a local directory or a hub id (:func:`model_location`); with
    ``section.gguf_file``, from that GGUF file in the local ``section.path`` (dequantised to float32; the model
    then saves like any other)."""
    path = model_location(section.path, base_dir)
    if isinstance(path, str):
        if section.gguf_file is not None:
            raise ValueError(f"model.gguf_file needs a local model.path, got the hub id {path!r}. Fix: download it")
        try:
            return _load(section, task, base_dir, path, {})
        except OSError as e:  # no network, unknown id, gated repository: one line naming the fixes
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(
                f"model {path!r}: could not be loaded from the hub ({reason[:300]}). Fix: check the id; without hub "
                f"access set HF_HUB_OFFLINE=1 to use a cached copy, or download it (`hf download {path} --local-dir "
                "DIR`) and set model.path to DIR"
            ) from None
    gguf = _gguf_args(section, path)
    if not gguf and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no model at {path} (expected a directory with config.json). "
            "Fix: give a local Hugging Face model directory (with a GGUF file in it: model.gguf_file in a run "
            "config, --gguf-file on the command line), or a hub id such as facebook/bart-large-xsum"
        )
    return _load(section, task, base_dir, path, gguf)


@contextlib.contextmanager
def no_custom_code(path: Path | str) -> Iterator[None]:
    """Turn transformers' refusal of a model or tokenizer that needs its own Python code (``trust_remote_code``)
    into one line: nvib never runs such code."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ValueError(
            f"{path} needs custom code (its config's auto_map names Python files shipped with the model), which nvib "
            "never runs. Fix: use a model whose architecture transformers itself implements (its model_type)"
        ) from None


def _load(
    section: ModelSection, task: str | None, base_dir: str | Path, path: Path | str, gguf: dict
) -> tuple[nn.Module, Any]:
    """The loading itself; a hub id (``path`` a str) may download, a local directory never does."""
    with no_custom_code(path):
        return _load_trusting_nothing(section, task, base_dir, path, gguf)


def _load_trusting_nothing(
    section: ModelSection, task: str | None, base_dir: str | Path, path: Path | str, gguf: dict
) -> tuple[nn.Module, Any]:
    only = {"local_files_only": True, **NO_REMOTE_CODE} if isinstance(path, Path) else NO_REMOTE_CODE
    config = tf.AutoConfig.from_pretrained(path, **only, **gguf)
    kind = section.kind if section.kind != "auto" else _detect_kind(config, task, path)
    if gguf and kind == "bert2bert":
        raise ValueError("model.gguf_file cannot warm-start bert2bert. Fix: use kind seq2seq or causal_lm")
    tok_path = model_location(section.tokenizer, base_dir) if section.tokenizer else path
    tok_only = {"local_files_only": True, **NO_REMOTE_CODE} if isinstance(tok_path, Path) else NO_REMOTE_CODE
    tokenizer = tf.AutoTokenizer.from_pretrained(tok_path, **tok_only, **({} if section.tokenizer else gguf))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models (GPT-2) ship without one
    if kind == "seq2seq":
        model = tf.AutoModelForSeq2SeqLM.from_pretrained(path, **only, **gguf)
    elif kind == "causal_lm":
        model = tf.AutoModelForCausalLM.from_pretrained(path, **only, **gguf)
    else:
        _check_bert2bert(config, path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(section.seed)
            plain = {k: v for k, v in only.items() if k not in NO_REMOTE_CODE}  # the rest becomes config keys
            model = tf.EncoderDecoderModel.from_encoder_decoder_pretrained(
                path, path, **plain, encoder_trust_remote_code=False, decoder_trust_remote_code=False
            )
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
    if gguf:  # dequantised: drop the quantizer so that save_pretrained / nvib.save accept the model (docs/method.md §9)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.config._name_or_path = str(path)
    check_vocabulary(model, tokenizer, tok_path)
    return model.to(device(section.device)).eval(), tokenizer


def device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU; a CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(name)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device is {name!r} but torch sees no CUDA device. Fix: model.device: auto or cpu")
    return chosen


def check_vocabulary(model: nn.Module, tokenizer, tok_path) -> None:
    """Refuse a tokenizer with ids beyond the model's embeddings (they would fail deep inside the forward)."""
    embeddings = model.get_input_embeddings()
    size = getattr(embeddings, "num_embeddings", None)
    if size is not None and len(tokenizer) > size:
        raise ValueError(
            f"the tokenizer at {tok_path} has {len(tokenizer)} tokens but the model's embeddings only {size}: they "
            "do not belong together. Fix: point model.tokenizer at the model's own tokenizer"
        )


def _gguf_args(section: ModelSection, path: Path) -> dict[str, str]:
    """``{"gguf_file": name}`` for ``from_pretrained`` when the section names a GGUF file, checked; else {}."""
    if section.gguf_file is None:
        return {}
    name = section.gguf_file
    if Path(name).is_absolute() or ".." in Path(name).parts or not (path / name).is_file():
        raise FileNotFoundError(
            f"no GGUF file {name!r} in {path}. Fix: set model.gguf_file to the name of a .gguf file inside model.path"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"{path / name}: loading GGUF needs the gguf package. Fix: pip install 'nvib[gguf]'")
    return {"gguf_file": name}


#: Encoders whose decoder form (with cross-attention) a bert2bert warm start can make: named in its error
BERT2BERT_EXAMPLES = ("bert", "roberta", "xlm-roberta", "electra", "camembert")


def _check_bert2bert(config: Any, path: Path | str) -> None:
    """Refuse (one line) an encoder that has no causal-LM form to be the decoder of a bert2bert warm start."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"{path} is a {config.model_type} model, which has no decoder form, so it cannot warm-start bert2bert. "
            f"Fix: a BERT-style encoder ({', '.join(BERT2BERT_EXAMPLES)}, ...), or model kind seq2seq or causal_lm"
        )


def _detect_kind(config: Any, task: str | None, path: Path | str) -> str:
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


def batch_kind(model: nn.Module, *, generative: bool = False) -> BatchKind:
    """How `nvib.workflow.data.batches` tokenises for `model`: "seq2seq" (encoder-decoder) or "lm". With
    `generative`, an encoder-only model (which has no generation loss) is an error naming the fix."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq"
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) or getattr(model.config, "is_decoder", False)
    if generative and not causal:
        raise ValueError(
            f"{type(model).__name__} is an encoder-only model with no generation loss to fine-tune. "
            "Fix: fine-tune a seq2seq or causal LM model, or warm-start an encoder-decoder (bert2bert) from it"
        )
    return "lm"
