"""Fine-tuning runs: the model prepared (converted, variances, what trains; or left plain), the trainer built,
checkpoints resumed, the fine-tuned model saved."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainingArguments, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from nvib.core import files
from nvib.core.config import KINDS, SUFFIX, NVConfig
from nvib.core.convert import LAYERS, configure, convert, enable_per_token_variance, is_converted, nv_layers
from nvib.core.io import save
from nvib.core.prior import EmpiricalPrior, weights_hash
from nvib.workflow.choices import START_STDEV_TAU
from nvib.workflow.data import Example, fingerprint
from nvib.workflow.identity import check_prior_weights, refuse_changes
from nvib.workflow.models import batch_kind
from nvib.workflow.train.features import Collator, as_examples, pad_id, tokenise
from nvib.workflow.train.regularisers import check_weight
from nvib.workflow.train.trainer import (
    KLClip,
    LambdaSchedule,
    NVCausalLMTrainer,
    NVTrainer,
    check_kl_clip,
    check_lambda,
)

__all__ = [
    "CHECKPOINTS",
    "RUN_ARGS",
    "RUN_LOG",
    "START_STDEV_TAU",
    "build_trainer",
    "finetune",
    "prepare_model",
    "set_trainable",
]

CHECKPOINTS = "checkpoints"  # under output_dir: the Trainer's checkpoints, for resuming
RUN_ARGS = "finetune_args.json"  # under output_dir: the settings of the run (checked on resume)
RUN_LOG = "finetune_log.json"  # under output_dir: the Trainer's log history of the finished run

# ----------------------------------------------------------------------------------------------
# model and data preparation


def prepare_model(
    model: nn.Module,
    nv_config: NVConfig | None = None,
    prior: EmpiricalPrior | str | Path | None = None,
    *,
    train_nv: bool = True,
    train_pretrained: bool = True,
    per_token_variance: bool | None = None,
    start_stdev_tau: float = START_STDEV_TAU,
    allow_foreign_prior: bool = False,
) -> nn.Module:
    """Convert `model` if needed (identity initialisation, so it computes what the pretrained model computes)
    and set which parameters train. An already converted model keeps its NV layers, unless `nv_config` is
    given: then they are re-initialised with it (`nvib.configure`).

    `per_token_variance` adds W_σ (zero at first) so that training can give every token its own variance
    (docs/method.md §2). None (the default) adds it when the starting knobs give the tokens a variance (some stdev_tau
    > 0) or the model has one already. From stdev_tau = 0 it would be dead weight: log σ² starts at
    log 1e-12, the gradients through the samples scale with σ, and AdamW moves log σ² by about the learning
    rate per step, so the variances stay negligible while evaluation pays for the general form. Hence, when
    per-token variances are asked for (True) and the layers are initialised here (a plain model, or
    `nv_config` given), every site kind whose stdev_tau is 0 starts at `start_stdev_tau` instead
    (σ² = τ_σ²·s0²: the task gradient reaches W_σ through z̃ = μ + σε, scaled by σ).

    A `prior` estimated on other weights than `model`'s is refused (`PriorMismatchError`), or used with a warning
    when `allow_foreign_prior`."""
    if not is_converted(model):
        prior = checked_prior(prior, model, allow_foreign_prior)
    elif isinstance(prior, str | Path):
        prior = EmpiricalPrior.load(prior)
    if nv_config is not None and not isinstance(nv_config, NVConfig):
        raise TypeError(f"nv_config must be an nvib.NVConfig, got {type(nv_config).__name__}")
    fresh = nv_config is not None or not is_converted(model)
    if per_token_variance and fresh and start_stdev_tau > 0:
        nv_config = nv_config or NVConfig()
        start = {f"stdev_tau_{SUFFIX[k]}": start_stdev_tau for k in KINDS if nv_config.stdev_tau(k) == 0}
        nv_config = nv_config.replace(**start) if start else nv_config
    if is_converted(model):
        if prior is not None and prior is not model.__dict__.get("nv_prior"):
            raise ValueError(
                "the model is already an NV model with its own prior; a prior can only be given for an "
                "unconverted model (nvib.unload it first, or pass prior=None)"
            )
        if nv_config is not None:
            configure(model, nv_config)
    else:
        convert(model, nv_config, prior=prior)
    has_variances = any(layer.per_token_variance for layer in nv_layers(model).values())
    if per_token_variance is None:
        per_token_variance = has_variances or any(model.nv_config.stdev_tau(kind) > 0 for kind in KINDS)
    if per_token_variance:
        enable_per_token_variance(model)
    elif has_variances:
        raise ValueError(
            "the model already has per-token variances (W_σ); train it with per_token_variance=True or None "
            "(--per-token-variance)"
        )
    set_trainable(model, train_nv=train_nv, train_pretrained=train_pretrained)
    return model


def checked_prior(
    prior: EmpiricalPrior | str | Path | None, model: nn.Module, allow_foreign: bool = False
) -> EmpiricalPrior | None:
    """`prior` loaded (from a path) and checked against `model`'s weights: refused in one line
    (`PriorMismatchError`) when estimated on other weights, or used with a warning when `allow_foreign`."""
    where = str(prior) if isinstance(prior, str | Path) else "given"
    if isinstance(prior, str | Path):
        prior = EmpiricalPrior.load(prior)
    if prior is not None:
        warning = check_prior_weights(prior, model, where, allow_foreign)
        if warning is not None:
            warnings.warn(warning, UserWarning, stacklevel=3)
    return prior


def set_trainable(model: nn.Module, *, train_nv: bool = True, train_pretrained: bool = True) -> None:
    """requires_grad = `train_nv` on the NV layers' parameters, `train_pretrained` on all the others."""
    if not (train_nv or train_pretrained):
        raise ValueError("nothing to train: both the NV parameters and the pretrained weights are frozen")
    nv_ids = {id(p) for p in model._modules[LAYERS].parameters()}
    for param in model.parameters():
        param.requires_grad_(train_nv if id(param) in nv_ids else train_pretrained)


# ----------------------------------------------------------------------------------------------
# the trainer and the run


def build_trainer(
    model: nn.Module,
    train_examples: Iterable[Example],
    tokenizer: Any,
    *,
    output_dir: str | Path,
    lambda_g: float | None = None,
    lambda_d: float | None = None,
    l2sp: float = 0.0,
    feature_mean: float = 0.0,
    prior: EmpiricalPrior | str | Path | None = None,
    schedule: LambdaSchedule | None = None,
    nv_lr: float | None = None,
    kl_clip: KLClip = "separate",
    max_steps: int = 1000,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    lr: float = 5e-5,
    lr_scheduler: str = "linear",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    max_source_len: int = 512,
    max_target_len: int = 128,
    lm_separator: str = "\n",
    logging_steps: int = 50,
    save_steps: int = 500,
    save_total_limit: int | None = 2,
    progress: bool = True,
    callbacks: list | None = None,
    **training_args: Any,
) -> NVTrainer:
    """An `NVTrainer` over the tokenised `train_examples` for `model` (converted, or plain: then without KL terms).

    Loss = task loss + λ_G·Σ KL_G + λ_D·Σ KL_D + α·L2-SP + μ·FM, every weight following `schedule` (default
    constant). λ_G, λ_D (None: 1e-3 on an NV model, 0 on a plain one) weigh the KL terms of an NV model;
    `l2sp` = α weighs ½·Σ‖w − w_start‖² over the pretrained weights (w_start: the weights now); `feature_mean` = μ
    weighs the feature-mean penalty of a plain model, which reads the empirical `prior` (see `NVTrainer` and
    `nvib.workflow.train.regularisers`). AdamW with peak
    `lr` (`nv_lr` for the NV layers' parameters, default `lr`), `lr_scheduler` and `warmup_steps`;
    `max_source_len` / `max_target_len` truncate (`lm_separator` joins source and target for causal LMs);
    a checkpoint every `save_steps`. `kl_clip` (default ``separate``) clips the task and KL gradients to
    `max_grad_norm` each (see `NVTrainer`). Seq2seq models get an `NVTrainer`, causal LMs an `NVCausalLMTrainer`
    (plain `Trainer`; loss on the target tokens only). Extra keyword arguments go to their
    `Seq2SeqTrainingArguments` / `TrainingArguments`.
    """

    converted = is_converted(model)
    lambda_g = (1e-3 if converted else 0.0) if lambda_g is None else lambda_g
    lambda_d = (1e-3 if converted else 0.0) if lambda_d is None else lambda_d
    check_weight("l2sp", l2sp)
    check_weight("feature_mean", feature_mean)
    if isinstance(prior, str | Path):
        prior = EmpiricalPrior.load(prior)
    _check_positive(
        max_steps=max_steps,
        batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_source_len=max_source_len,
        max_target_len=max_target_len,
        logging_steps=logging_steps,
        save_steps=save_steps,
    )
    for name, value in (("lr", lr), ("nv_lr", 1.0 if nv_lr is None else nv_lr)):
        if isinstance(value, bool) or not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    check_kl_clip(kl_clip)
    kind = batch_kind(model, generative=True)
    features = tokenise(
        as_examples(train_examples),
        tokenizer,
        kind,
        max_source_len,
        max_target_len,
        lm_separator=lm_separator,
    )
    defaults: dict[str, Any] = {
        "output_dir": str(Path(output_dir) / CHECKPOINTS),
        "max_steps": max_steps,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "learning_rate": lr,
        "lr_scheduler_type": lr_scheduler,
        "warmup_steps": warmup_steps,
        "weight_decay": weight_decay,
        "max_grad_norm": max_grad_norm,
        "seed": seed,
        "data_seed": seed,
        "logging_steps": logging_steps,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "save_total_limit": save_total_limit,
        "report_to": "none",  # no integration phones home
        "disable_tqdm": not progress,
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
    }
    arguments, trainer = (
        (TrainingArguments, NVCausalLMTrainer) if kind == "lm" else (Seq2SeqTrainingArguments, NVTrainer)
    )
    args = arguments(**{**defaults, **training_args})
    return trainer(
        model=model,
        args=args,
        data_collator=Collator(pad_id(tokenizer, model)),
        train_dataset=features,
        processing_class=tokenizer,
        callbacks=callbacks,
        lambda_g=lambda_g,
        lambda_d=lambda_d,
        schedule=schedule,
        nv_lr=nv_lr,
        kl_clip=kl_clip,
        l2sp=l2sp,
        feature_mean=feature_mean,
        prior=prior if feature_mean else None,
    )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# the build_trainer options (besides the schedule) a resumed run must share with the run that wrote the checkpoints
SAME_RUN_OPTIONS = (
    "lambda_g", "lambda_d", "l2sp", "feature_mean", "kl_clip", "batch_size", "gradient_accumulation_steps", "lr",
    "nv_lr", "lr_scheduler", "warmup_steps", "weight_decay", "seed", "max_source_len", "max_target_len",
)  # fmt: skip


def finetune(
    model: nn.Module,
    train_examples: Iterable[Example | Mapping[str, str] | Sequence[str]],
    tokenizer: Any,
    *,
    output_dir: str | Path,
    nv_config: NVConfig | None = None,
    prior: EmpiricalPrior | str | Path | None = None,
    train_nv: bool = True,
    train_pretrained: bool = True,
    per_token_variance: bool | None = None,
    start_stdev_tau: float = START_STDEV_TAU,
    resume: bool = True,
    convert: bool = True,
    allow_foreign_prior: bool = False,
    **trainer_options: Any,
) -> nn.Module:
    """Fine-tune `model` with the NVIB regularisers; save it to `output_dir` with `nvib.save` (+ tokenizer).

    `model` is a HuggingFace seq2seq or causal LM (plain or already NV); a plain one is converted in place
    with `nv_config` (default: the equivalence setting) and `prior` (an `EmpiricalPrior` or its file), so
    step 0 computes what the pretrained model computes. With `convert=False` a plain model stays plain: the same
    trainer, clipping and schedule without the KL terms (λ_G = λ_D = 0), saved with `save_pretrained`; `prior` then
    only serves `feature_mean`. Fine-tuning's own regularisers, on either kind: `l2sp` = α (L2-SP, the weights pulled
    towards those at the start) and, on a plain model only, `feature_mean` = μ (each attention input pulled towards
    the prior's mean; on an NV model KL_G's mean term is that pull), both in `trainer_options`.
    `train_nv` / `train_pretrained` choose what trains; `per_token_variance` lets training give every token its own
    variance (W_σ; evaluation then takes the general form of docs/method.md §4, which costs more: see
    `nvib.core.attention`); None decides as `prepare_model` does, and with True the site kinds whose knobs give no
    variance start from τ_σ = `start_stdev_tau`.
    `trainer_options` go to `build_trainer`: λ_G, λ_D and their `schedule`, `max_steps`, `batch_size`, `lr`,
    ... and any `Seq2SeqTrainingArguments`. Checkpoints go to ``output_dir/checkpoints`` every `save_steps` steps; with
    `resume` (the default) a rerun continues from the last one (with `resume=False` they are deleted and
    training starts over). `allow_foreign_prior`: use a prior estimated on other weights (with a warning) rather
    than refuse it. Returns the fine-tuned model in eval mode.
    """

    defaults = {
        name: p.default
        for name, p in inspect.signature(build_trainer).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }
    options = {**defaults, **trainer_options}
    options["schedule"] = options["schedule"] or LambdaSchedule()
    for name in ("lambda_g", "lambda_d"):
        options[name] = (1e-3 if convert else 0.0) if options[name] is None else options[name]
        check_lambda(name, options[name])
    check_weight("l2sp", options["l2sp"])
    check_weight("feature_mean", options["feature_mean"])
    if not convert:
        _check_plain(model, nv_config, per_token_variance, train_pretrained, options)
    elif options["feature_mean"]:
        raise ValueError(
            "feature-mean matching is for a plain model; on an NV model KL_G's mean term is the same pull. "
            "Fix: use lambda_g (--lambda-g), or fine-tune the plain model (convert=False, --no-nv)"
        )
    if options["feature_mean"] and prior is None:
        raise ValueError(
            "feature_mean needs the model's empirical prior (its mean and variance per site). "
            "Fix: pass prior= (an EmpiricalPrior or its file; `nvib prior` estimates one, --prior)"
        )
    examples = as_examples(train_examples)
    out = Path(output_dir)
    if not convert:
        nv_settings = None
    else:
        nv_settings = (nv_config or (model.nv_config if is_converted(model) else NVConfig())).to_dict()
    settings = {
        "convert": convert,
        "nv_config": nv_settings,
        "prior": (prior if isinstance(prior, str | Path) else getattr(prior, "metadata", None)),
        "train_nv": train_nv,
        "train_pretrained": train_pretrained,
        "per_token_variance": per_token_variance,
        "start_stdev_tau": start_stdev_tau,
        **{name: options[name] for name in SAME_RUN_OPTIONS},
        "schedule": dataclasses.asdict(options["schedule"]),
        "examples": len(examples),
        "data": fingerprint(examples),
        "model": f"{getattr(model.config, '_name_or_path', '') or type(model).__name__} {weights_hash(model)[:16]}",
    }
    settings = json.loads(files.dumps(settings, default=str))  # as finetune_args.json holds them
    checkpoint_dir = out / CHECKPOINTS
    last = get_last_checkpoint(str(checkpoint_dir)) if resume and checkpoint_dir.is_dir() else None
    if last is not None:
        refuse_changes(
            out / RUN_ARGS, settings, "{dir} holds checkpoints of a run with different settings ({changed})",
            "use another output directory, the same settings, or --no-resume to start over",
            shared_keys_only=True, damaged_ok=True,
        )  # fmt: skip
    elif not resume and checkpoint_dir.is_dir():
        shutil.rmtree(checkpoint_dir)

    if convert:
        prepare_model(
            model,
            nv_config,
            prior,
            train_nv=train_nv,
            train_pretrained=train_pretrained,
            per_token_variance=per_token_variance,
            start_stdev_tau=start_stdev_tau,
            allow_foreign_prior=allow_foreign_prior,
        )
    else:
        for param in model.parameters():
            param.requires_grad_(True)
        options["prior"] = checked_prior(prior, model, allow_foreign_prior)
    trainer = build_trainer(model, examples, tokenizer, output_dir=out, **options)
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(out / RUN_ARGS, {**settings, "max_steps": options["max_steps"]})
    trainer.train(resume_from_checkpoint=last)
    model.eval()

    if convert:
        save(model, out, tokenizer=tokenizer)
    else:
        with files.usual_modes(out):
            model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    files.write_json(out / RUN_LOG, trainer.state.log_history)
    return model


def _check_plain(model: nn.Module, nv_config, per_token_variance, train_pretrained: bool, options: dict) -> None:
    """convert=False: refuse the options that only mean something for an NV model."""
    given = [
        name
        for name, on in (
            ("an NV model", is_converted(model)),
            ("nv_config", nv_config is not None),
            ("per_token_variance", bool(per_token_variance)),
            ("lambda_g", bool(options["lambda_g"])),
            ("lambda_d", bool(options["lambda_d"])),
            ("nv_lr", options["nv_lr"] is not None),
        )
        if on
    ]
    if given:
        raise ValueError(
            f"convert=False fine-tunes a plain model, but {given[0]} was given (NV only). "
            "Fix: drop it, or fine-tune in NV form (convert=True, without --no-nv)"
        )
    if not train_pretrained:
        raise ValueError(
            "nothing to train: a plain model with its pretrained weights frozen. Fix: train_pretrained=True"
        )
