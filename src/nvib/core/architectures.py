"""Where the attention sites of each architecture are (docs/method.md §1), as data.

Each `Architecture` lists, per site kind, a regular expression over module names (as in
`model.named_modules()`) that matches the attention modules of that kind; the first group is the
layer index. It also names the q/k/v projections and the attribute the module reshapes heads by.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclasses.dataclass(frozen=True)
class Architecture:
    sites: dict[str, str]  # kind -> regex over module names; group 1 = layer index
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    fused_qkv: str | None = None  # GPT-2: one Conv1D producing [q | k | v]
    head_dim_attr: str = "head_dim"
    uses_attention_interface: bool = True  # MPNet computes attention itself
    # key-space sites (docs/method.md §10): rotary decoder-only models; the unrotated key is the output of `k_norm`
    # (or of the k projection where there is none), laid out as "flat" [B, N, G·E], "heads" [B, N, G, E]
    # or "heads_first" [B, G, N, E]
    key_space: bool = False
    k_norm: str | None = None
    key_layout: str = "flat"

    @property
    def key_source(self) -> str:
        """The submodule whose output is the unrotated key (docs/method.md §10)."""
        return self.k_norm or self.k


_BART_LIKE = Architecture(
    sites={
        "encoder": r"(?:^|\.)encoder\.layers\.(\d+)\.self_attn$",
        "decoder": r"(?:^|\.)decoder\.layers\.(\d+)\.self_attn$",
        "cross": r"(?:^|\.)decoder\.layers\.(\d+)\.encoder_attn$",
    }
)
_BERT_LIKE = Architecture(
    sites={
        "self": r"(?:^|\.)encoder\.layer\.(\d+)\.attention\.self$",
        "cross": r"(?:^|\.)encoder\.layer\.(\d+)\.crossattention\.self$",
    },
    q="query",
    k="key",
    v="value",
    head_dim_attr="attention_head_size",
)

ARCHITECTURES: dict[str, Architecture] = {
    "bart": _BART_LIKE,
    "mbart": _BART_LIKE,
    "marian": _BART_LIKE,
    "pegasus": _BART_LIKE,
    "t5": Architecture(
        sites={
            "encoder": r"(?:^|\.)encoder\.block\.(\d+)\.layer\.0\.SelfAttention$",
            "decoder": r"(?:^|\.)decoder\.block\.(\d+)\.layer\.0\.SelfAttention$",
            "cross": r"(?:^|\.)decoder\.block\.(\d+)\.layer\.1\.EncDecAttention$",
        },
        q="q",
        k="k",
        v="v",
        head_dim_attr="key_value_proj_dim",
    ),
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "mpnet": Architecture(
        sites={"self": r"(?:^|\.)encoder\.layer\.(\d+)\.attention\.attn$"},
        q="q",
        k="k",
        v="v",
        head_dim_attr="attention_head_size",
        uses_attention_interface=False,
    ),
    "gpt2": Architecture(sites={"decoder": r"(?:^|\.)h\.(\d+)\.attn$"}, q="", k="", v="", fused_qkv="c_attn"),
}
_ROTARY_SITES = {"decoder": r"(?:^|\.)layers\.(\d+)\.self_attn$"}
_ROTARY = Architecture(sites=_ROTARY_SITES, key_space=True)
ARCHITECTURES.update(
    llama=_ROTARY,
    mistral=_ROTARY,
    qwen2=_ROTARY,
    gemma2=_ROTARY,  # logit soft-capping: the bias is added after the cap (docs/method.md §10)
    qwen3=Architecture(sites=_ROTARY_SITES, key_space=True, k_norm="k_norm", key_layout="heads"),
    gemma3_text=Architecture(sites=_ROTARY_SITES, key_space=True, k_norm="k_norm", key_layout="heads_first"),
    olmo2=Architecture(sites=_ROTARY_SITES, key_space=True, k_norm="k_norm"),  # RMSNorm over all heads at once
)
# multimodal models: model type -> (the sub-config of their language model, the attribute that holds it); only the
# language model is converted (its model type must be in ARCHITECTURES), the vision tower stays stock
LANGUAGE_MODELS: dict[str, tuple[str, str]] = {"gemma3": ("text_config", "language_model")}
SUPPORTED = sorted([*ARCHITECTURES, *LANGUAGE_MODELS, "encoder-decoder"])
FUSED_PROJECTIONS = ("qkv_proj", "query_key_value", "Wqkv", "c_attn", "qkv")


@dataclasses.dataclass
class Site:
    """One attention module and the NV site it belongs to (cross-attention modules share one site)."""

    name: str  # "encoder.3", "decoder.0", "cross"
    kind: str  # "encoder" | "decoder" | "cross"
    module: nn.Module
    module_name: str
    arch: Architecture

    @property
    def key_projection(self) -> nn.Module:
        """The module whose input is the key-side vector z (a fused q/k/v projection for GPT-2)."""
        return getattr(self.module, self.arch.fused_qkv or self.arch.k)

    @property
    def key_dim(self) -> int:
        """P, the size of z (key space: G·E, the size of all key heads)."""
        weight = self.key_projection.weight
        if self.arch.key_space:
            return weight.shape[0]
        return weight.shape[0] if self.arch.fused_qkv else weight.shape[1]  # Conv1D weights are [in, out]

    @property
    def noise(self) -> float:
        """The query noise variance √E, or 1/s where the module scales scores by s (docs/method.md §1)."""
        E = getattr(self.module, self.arch.head_dim_attr)
        if hasattr(self.module, "_nv_slot"):
            E = self.module._nv_slot.head_dim
        return 1.0 / float(getattr(self.module, "scaling", E**-0.5))


class UnsupportedModelError(ValueError):
    pass


def _with_cross() -> list[str]:
    return sorted(name for name, arch in ARCHITECTURES.items() if "cross" in arch.sites)


def architecture_of(config, model: nn.Module | None = None) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        fused = _fused_projection(model)
        hint = (
            f": its attention projects q/k/v with one fused module ({fused!r}), which nvib cannot split by name; "
            "unfuse it into q/k/v projections, or add an `Architecture` to nvib.core.architectures.ARCHITECTURES"
            if fused
            else "; to add one, describe its attention sites in nvib.core.architectures.ARCHITECTURES"
        )
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported by nvib{hint} (supported model types: {', '.join(SUPPORTED)})"
        )
    return ARCHITECTURES[model_type]


def _fused_projection(model: nn.Module | None) -> str | None:
    for name, _ in model.named_modules() if model is not None else ():
        last = name.rsplit(".", 1)[-1]
        if "attn" in name.lower() and last in FUSED_PROJECTIONS:
            return last
    return None


def _half(model: nn.Module) -> str:
    """ "encoder." or "decoder." for a standalone half of an encoder-decoder model (`BartDecoder`, a T5 stack), which
    its site patterns then match as inside the whole model; "" for a whole model."""
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        return ""
    if name.endswith("Stack"):
        return "decoder." if getattr(model.config, "is_decoder", False) else "encoder."
    return next((half.lower() + "." for half in ("Encoder", "Decoder") if name.endswith(half)), "")


def _parts(model: nn.Module) -> Iterator[tuple[str, object, str | None]]:
    """(module-name prefix, config, forced kind of 'self' sites) for each sub-model."""
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers model (it has no PretrainedConfig at .config); "
            f"nvib converts transformers models of the types {', '.join(SUPPORTED)}"
        )
    if config.model_type == "encoder-decoder":  # EncoderDecoderModel: two HF models side by side
        yield "encoder.", config.encoder, "encoder"
        yield "decoder.", config.decoder, "decoder"
    elif config.model_type in LANGUAGE_MODELS:
        sub_config, holder = LANGUAGE_MODELS[config.model_type]
        names = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == holder]
        if not names:
            raise UnsupportedModelError(
                f"found no {holder!r} module in {type(model).__name__} (a {config.model_type!r} model); nvib converts "
                f"the language model of {config.model_type!r} models"
            )
        yield names[0] + ".", getattr(config, sub_config), None
    else:
        yield "", config, None


def find_sites(model: nn.Module) -> list[Site]:
    """All attention modules of `model` with their site name and kind, in module order."""
    sites: list[Site] = []
    modules = dict(model.named_modules())
    half = _half(model)
    for prefix, config, forced in _parts(model):
        arch = architecture_of(config, model)
        if getattr(config, "add_cross_attention", False) and "cross" not in arch.sites:
            raise UnsupportedModelError(
                f"the {config.model_type!r} {'decoder' if prefix else 'model'} has cross-attention, which nvib "
                f"does not convert for {config.model_type!r} (its cross knobs would do nothing); "
                f"decoders with cross-attention: {', '.join(_with_cross())}"
            )
        self_kind = forced or ("decoder" if getattr(config, "is_decoder", False) else "encoder")
        for name, module in modules.items():
            if not name.startswith(prefix):
                continue
            for kind, pattern in arch.sites.items():
                match = re.search(pattern, half + name[len(prefix) :])
                if match is None:
                    continue
                kind = self_kind if kind == "self" else kind
                site_name = "cross" if kind == "cross" else f"{kind}.{int(match.group(1))}"
                sites.append(Site(site_name, kind, module, name, arch))
    if not sites:
        raise UnsupportedModelError(f"found no attention modules in {type(model).__name__}")
    return sites
