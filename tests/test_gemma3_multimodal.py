"""Multimodal Gemma 3 (model type "gemma3", issue 38): the language model inside converts (key space, docs/method.md
§10), the vision tower stays stock; tiny random configs, with and without images."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as tf

import nvib
from nvib.core.hooks import PinnedConfig

IMAGE = 90  # image_token_id; an image is 4 of them (mm_tokens_per_image)
REGULARISED = nvib.NVConfig(alpha_tau_d=0.0, stdev_tau_d=0.3)
CLASSES = [tf.Gemma3ForConditionalGeneration, tf.Gemma3Model, tf.Gemma3ForSequenceClassification]


def build(cls=tf.Gemma3ForConditionalGeneration) -> torch.nn.Module:
    text = dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )  # fmt: skip
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=2
    )
    config = tf.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_id=IMAGE, boi_token_id=91,
        eoi_token_id=92, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return cls(config).eval()


def inputs(images: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of 12 tokens; with images, each row holds one image (4 image tokens) at positions 2-5."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 80, (2, 12), generator=g)
    if not images:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ids[:, 2:6] = IMAGE
    return {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": (ids == IMAGE).long(),
        "pixel_values": torch.randn(2, 3, 8, 8, generator=g),
    }  # fmt: skip


def result(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def converted(stock, config=None, prior=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the visible-prior warning of a finite τ_α
        return nvib.convert(copy.deepcopy(stock), config, prior=prior)


def vision_tower(model) -> torch.nn.Module:
    return next(m for n, m in model.named_modules() if n.endswith("vision_tower"))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("images", [False, True], ids=["text", "images"])
def test_identity_equals_stock_and_unload_gives_it_back(cls, images: bool) -> None:
    """The language model's attention modules are the sites; at the identity the NV model computes what the stock
    one does (to round-off), with or without an image; `unload` gives the stock model back exactly."""
    stock = build(cls)
    nv = converted(stock)
    sites = nvib.nv_layers(nv)
    assert sorted(sites) == ["decoder.0", "decoder.1", "decoder.2"]
    held = [n for n, m in nv.named_modules() if "_nv_slot" in m.__dict__]
    assert len(held) == 3 and all(".language_model.layers." in f".{n}" for n in held)
    batch = inputs(images)
    ref = result(stock, batch)
    torch.testing.assert_close(result(nv, batch), ref, rtol=1e-5, atol=1e-5)
    nvib.unload(nv)
    assert not nvib.is_converted(nv) and set(nv.state_dict()) == set(stock.state_dict())
    assert torch.equal(result(nv, batch), ref)


def test_the_vision_tower_is_untouched() -> None:
    """No NV slot, no pinned config and no change of implementation in the vision tower; its image features are
    the stock ones, also on a regularised NV model."""
    stock = build()
    nv = converted(stock, REGULARISED)
    tower = vision_tower(nv)
    assert not any("_nv_slot" in m.__dict__ for m in tower.modules())
    assert not any(isinstance(m.__dict__.get("config"), PinnedConfig) for m in tower.modules())
    assert tower.config._attn_implementation == vision_tower(stock).config._attn_implementation
    for (n, a), b in zip(tower.state_dict().items(), vision_tower(stock).state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    pixels = inputs(True)["pixel_values"]
    with torch.no_grad():
        got, ref = (m.model.get_image_features(pixels).pooler_output for m in (nv, stock))
    assert torch.equal(got, ref)
    batch = inputs(True)
    assert (result(nv, batch) - result(stock, batch)).abs().max() > 1e-3  # the language model is regularised


@pytest.mark.parametrize("images", [False, True], ids=["text", "images"])
def test_cache_matches_no_cache(images: bool) -> None:
    """Regularised, with a prior estimated on text: the last token's logits after a cached prefill equal those of
    the whole sequence at once, and greedy generation is the same with and without the cache."""
    stock = build()
    prior = nvib.EmpiricalPrior.estimate(stock, [inputs(False, seed=s) for s in range(3)], progress=False)
    assert sorted(prior.sites) == ["decoder.0", "decoder.1", "decoder.2"]
    nv = converted(stock, REGULARISED, prior=prior)
    nv.generation_config.pad_token_id = 0
    batch = inputs(images)
    full = result(nv, batch)
    head = {k: v[:, :-1] if k in ("input_ids", "attention_mask", "token_type_ids") else v for k, v in batch.items()}
    with torch.no_grad():
        cache = nv(**head, use_cache=True).past_key_values
        step = nv(
            input_ids=batch["input_ids"][:, -1:],
            attention_mask=batch["attention_mask"],
            past_key_values=cache,
            use_cache=True,
        ).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        cached = nv.generate(**batch, max_new_tokens=6, do_sample=False)
        plain = nv.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_save_and_load(tmp_path) -> None:
    nv = converted(build(), REGULARISED)
    batch = inputs(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nvib.save(nv, tmp_path)
        loaded = nvib.load(tmp_path)
    assert type(loaded) is tf.Gemma3ForConditionalGeneration
    assert torch.equal(result(loaded, batch), result(nv, batch))
