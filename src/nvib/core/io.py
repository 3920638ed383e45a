"""save / load an NV model as a HuggingFace directory plus the NV parts."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from nvib.core.architectures import find_sites
from nvib.core.config import NVConfig
from nvib.core.convert import convert
from nvib.core.layer import LAYERS, nv_layers
from nvib.core.prior import EmpiricalPrior
from nvib.core.saving import NV_CONFIG, NV_WEIGHTS, save

__all__ = ["NV_CONFIG", "load", "save", "saved_info_schema"]


@functools.cache
def saved_info_schema() -> type:
    """The schema of ``nv_config.json``: what `save` writes and `load` accepts (a pydantic model, imported on first
    use so that `import nvib` needs only torch, transformers and safetensors: issue 25)."""
    from pydantic import BaseModel, ConfigDict

    class SavedInfo(BaseModel):
        model_config = ConfigDict(extra="ignore", frozen=True)

        nv_config: dict[str, Any]
        model_class: str
        sites: list[str]
        prior: str | None = None
        per_token_variance: bool = False
        # the unit the knobs were evaluated in (docs/method.md §12); files before it used §3's
        stdev_unit: str = "prior"

    return SavedInfo


def load(path: str | Path, **from_pretrained_kwargs) -> nn.Module:
    """Rebuild an NV model saved by `save`, from local files only.

    ``from_pretrained_kwargs`` go to the model class's ``from_pretrained`` (with ``local_files_only=True`` and
    ``trust_remote_code=False`` unless given; the class is one of transformers' own, never an Auto class, so no
    code from the directory runs). Every file read is inside ``path``; the NV layer weights must be finite.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass the directory written by nvib.save")
    if not (path / NV_CONFIG).is_file():
        raise FileNotFoundError(
            f"{path} has no {NV_CONFIG}: it is not an NV model directory (write one with nvib.save; "
            "a plain HF model is converted with nvib.convert)"
        )
    info = _read_info(path / NV_CONFIG)
    cls = _model_class(info.model_class, path / NV_CONFIG)
    config = _knobs(info.nv_config, path / NV_CONFIG)
    prior_path = _inside(path, info.prior, "prior") if info.prior else None
    weights = _inside(path, NV_WEIGHTS, "NV layer weights")
    from_pretrained_kwargs.setdefault("local_files_only", True)
    from_pretrained_kwargs.setdefault("trust_remote_code", False)
    model = cls.from_pretrained(path, **from_pretrained_kwargs)
    if config.stdev_unit is None and info.stdev_unit != ("bias" if find_sites(model)[0].arch.key_space else "prior"):
        config = config.replace(stdev_unit=info.stdev_unit)  # the unit it ran in, where today's default differs
    prior = EmpiricalPrior.load(prior_path) if prior_path is not None else None
    state = _read_weights(weights)
    convert(model, config, prior=prior, per_token_variance=any(k.endswith(".logvar_weight") for k in state))
    if sorted(nv_layers(model)) != sorted(info.sites):
        raise ValueError(
            f"{path / NV_CONFIG} lists sites {sorted(info.sites)} but the model has {sorted(nv_layers(model))}. "
            "Fix: save the model again with nvib.save"
        )
    try:
        model._modules[LAYERS].load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise ValueError(
            f"{weights} does not fit the model ({first}). Fix: save the model again with nvib.save"
        ) from None
    return model.eval()


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """The NV layers' tensors of ``file``; a file that cannot be read or holds NaN or infinite values is an error."""
    fix = "Fix: save the model again with nvib.save, or copy the whole directory it wrote again"
    try:
        state = load_file(str(file))
    except Exception as err:  # safetensors raises its own error types (a truncated file, a damaged header)
        reason = " ".join(str(err).split())
        raise ValueError(f"{file} cannot be read ({reason}): it is damaged or truncated. {fix}") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{file}: {name} has NaN or infinite values: the file is damaged. {fix}")
    return state


def _read_info(file: Path):
    from pydantic import ValidationError

    try:
        return saved_info_schema().model_validate_json(file.read_bytes())
    except ValidationError as err:
        e = err.errors(include_url=False)[0]
        where = ".".join(str(p) for p in e["loc"])
        what = f"key {where!r}: {e['msg']}" if where else e["msg"]
        raise ValueError(
            f"{file} is not a valid NV model description ({what}). "
            "Fix: it is written by nvib.save; save the model again rather than editing it"
        ) from None


def _model_class(name: str, file: Path) -> type[transformers.PreTrainedModel]:
    """A model class of transformers itself (never an Auto class, which could run remote code)."""
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    concrete = isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
    if not (concrete and isinstance(getattr(cls, "config_class", None), type)):  # not an abstract base
        raise ValueError(
            f"{file}: model_class {name!r} is not a transformers model class. "
            "Fix: it must name a PreTrainedModel subclass of transformers, e.g. BartForConditionalGeneration"
        )
    return cls


# NVConfig fields added after files were first written, with the values that reproduce what those files computed
# (docs/method.md §11: before the floor, b_α = τ_α·ς, uncentred)
ADDED_LATER = {"alpha_scale_min": 0.0, "centre_alpha": False, "stdev_unit": None}  # stdev_unit: see `load`


def _knobs(data: dict[str, Any], file: Path) -> NVConfig:
    data = {**ADDED_LATER, **data}
    missing = [f.name for f in dataclasses.fields(NVConfig) if f.name not in data]
    if missing:
        raise ValueError(
            f"{file}: nv_config lacks the knobs {missing}; the saved weights were computed with values it does "
            "not record. Fix: save the model again with nvib.save"
        )
    try:
        return NVConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: nv_config: {err}. Fix: save the model again with nvib.save") from None


def _inside(root: Path, name: str, what: str) -> Path:
    """``root / name``, refusing absolute paths and paths that leave ``root`` (also through symlinks)."""
    file = root / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not file.resolve().is_relative_to(root.resolve()):
        raise ValueError(
            f"{root / NV_CONFIG}: the {what} path {name!r} leaves the model directory. "
            "Fix: keep every file of an NV model inside its directory (nvib.save does)"
        )
    if not file.is_file():
        raise FileNotFoundError(f"{root} lacks {name} ({what}). Fix: copy the whole directory written by nvib.save")
    return file
