"""save: write an NV model as a HuggingFace directory plus the NV parts (`io.load` reads them back)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from nvib.core import files
from nvib.core.layer import LAYERS, nv_layers
from nvib.core.prior import EmpiricalPrior

NV_CONFIG = "nv_config.json"
NV_WEIGHTS = "nv_layers.safetensors"
PRIOR = "prior.safetensors"


def save(model: nn.Module, out_dir: str | Path, tokenizer=None, **save_pretrained_kwargs) -> Path:
    """Write the pretrained weights the usual HF way (``save_pretrained_kwargs`` go to transformers'
    ``save_pretrained``; a ``state_dict`` given there is written as given, the Trainer's resumable checkpoints
    need the NV layers in it), plus nv_config.json, the NV layers and the prior, each written atomically (alpha_tau
    = +inf as the string "inf": `nvib.core.files`); `nvib.load` reads them back."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = nv_layers(model)
    state = save_pretrained_kwargs.pop("state_dict", None)  # given (the Trainer's checkpoints): written as given
    if state is None:
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(LAYERS + ".")}
    with files.usual_modes(out):
        type(model).save_pretrained(model, out, state_dict=state, **save_pretrained_kwargs)  # not the NV model's own
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    nv_state = {k: v.contiguous() for k, v in model._modules[LAYERS].state_dict().items()}
    files.save_tensors(nv_state, out / NV_WEIGHTS)
    prior: EmpiricalPrior | None = model.__dict__.get("nv_prior")
    if prior is not None:
        prior.save(out / PRIOR)
    info = {
        "nv_config": model.nv_config.to_dict(),
        "stdev_unit": model.nv_config.stdev_unit or next(iter(layers.values())).STDEV_UNIT,  # the unit it ran in
        "sites": sorted(layers),
        "model_class": type(model).__name__,
        "prior": PRIOR if prior is not None else None,
        "per_token_variance": any(layer.per_token_variance for layer in layers.values()),
    }
    files.write_json(out / NV_CONFIG, info)
    return out
