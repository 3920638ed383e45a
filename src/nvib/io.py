"""save / load an NV model as a HuggingFace directory plus the NV parts."""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from nvib.config import NVConfig
from nvib.convert import LAYERS, convert, nv_layers
from nvib.prior import EmpiricalPrior

NV_CONFIG = "nv_config.json"
NV_WEIGHTS = "nv_layers.safetensors"
PRIOR = "prior.safetensors"


def save(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write the pretrained weights the usual HF way, plus nv_config.json, the NV layers and the prior."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = nv_layers(model)
    plain = {k: v for k, v in model.state_dict().items() if not k.startswith(LAYERS + ".")}
    model.save_pretrained(out, state_dict=plain)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    nv_state = {k: v.contiguous() for k, v in model._modules[LAYERS].state_dict().items()}
    save_file(nv_state, str(out / NV_WEIGHTS))
    prior: EmpiricalPrior | None = model.__dict__.get("nv_prior")
    if prior is not None:
        prior.save(out / PRIOR)
    info = {
        "nv_config": model.nv_config.to_dict(),
        "sites": sorted(layers),
        "model_class": type(model).__name__,
        "prior": PRIOR if prior is not None else None,
        "per_token_variance": any(layer.per_token_variance for layer in layers.values()),
    }
    (out / NV_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    return out


def load(path: str | Path, **from_pretrained_kwargs) -> nn.Module:
    """Rebuild an NV model saved by `save`, from local files only."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass the directory written by nvib.save")
    if not (path / NV_CONFIG).is_file():
        raise FileNotFoundError(
            f"{path} has no {NV_CONFIG}: it is not an NV model directory (write one with nvib.save; "
            "a plain HF model is converted with nvib.convert)"
        )
    info = json.loads((path / NV_CONFIG).read_text())
    cls = getattr(transformers, info["model_class"], None)
    if cls is None:
        raise ValueError(f"unknown model class {info['model_class']!r} in {path / NV_CONFIG}")
    from_pretrained_kwargs.setdefault("local_files_only", True)
    model = cls.from_pretrained(path, **from_pretrained_kwargs)
    prior = EmpiricalPrior.load(path / info["prior"]) if info.get("prior") else None
    config = NVConfig.from_dict(info["nv_config"])
    state = load_file(str(path / NV_WEIGHTS))
    convert(model, config, prior=prior, per_token_variance=any(k.endswith(".logvar_weight") for k in state))
    model._modules[LAYERS].load_state_dict(state)
    return model.eval()
