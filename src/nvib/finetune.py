"""Fine-tuning an NV model with the NVIB regularisers (spec §8), on the HuggingFace `Seq2SeqTrainer`.

Loss = task loss + λ_G(step)·Σ_sites KL_G + λ_D(step)·Σ_sites KL_D, where λ(step) follows a
`LambdaSchedule`. The model is converted with the identity initialisation first (with the empirical
prior if one is given), so step 0 is the pretrained model; in `model.train()` the NV layers sample and
compute their KL terms, in `model.eval()` they use the exact fast form, or the general form of §4 once
the layers have per-token variances (W_σ, see `prepare_model`).

Entry points: `finetune` (Python) and `finetune_cli` (the typer command `nvib finetune`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import shutil
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import typer
from torch import nn
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback

from nvib.config import KINDS, SUFFIX, NVConfig
from nvib.convert import LAYERS, configure, convert, enable_per_token_variance, is_converted, kl_terms, nv_layers
from nvib.data import BatchKind, Example, batches
from nvib.prior import EmpiricalPrior

__all__ = [
    "LambdaSchedule",
    "NVCausalLMTrainer",
    "NVTrainer",
    "build_trainer",
    "finetune",
    "finetune_cli",
    "prepare_model",
    "set_trainable",
    "tokenise",
]

CHECKPOINTS = "checkpoints"  # under output_dir: the Trainer's checkpoints, for resuming
RUN_ARGS = "finetune_args.json"  # under output_dir: the settings of the run (checked on resume)
RUN_LOG = "finetune_log.json"  # under output_dir: the Trainer's log history of the finished run
START_STDEV_TAU = 0.1  # per-token variances asked for: the starting τ_σ of the kinds whose knobs give none

ScheduleKind = Literal["constant", "linear", "cyclic"]


# ----------------------------------------------------------------------------------------------
# λ schedules


@dataclasses.dataclass(frozen=True)
class LambdaSchedule:
    """How λ_G and λ_D move with the optimisation step (the number of completed updates, from 0).

    - ``constant``: λ at every step.
    - ``linear``: warm-up from 0 at step 0 to λ at step ``steps``, then λ.
    - ``cyclic``: cyclic annealing (Fu et al., 2019) with period ``steps``: in every period λ rises
      linearly from 0 over the first ``ramp`` fraction of the period, then stays at λ.
    """

    kind: ScheduleKind = "constant"
    steps: int = 0
    ramp: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "cyclic"):
            raise ValueError(f"schedule must be 'constant', 'linear' or 'cyclic', got {self.kind!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"schedule steps must be an integer >= 0, got {self.steps!r}")
        if self.kind != "constant" and self.steps < 1:
            raise ValueError(
                f"the {self.kind} schedule needs its number of steps (>= 1), got {self.steps}; "
                f"e.g. LambdaSchedule({self.kind!r}, steps=1000) or --schedule-steps 1000"
            )
        if not (0 < self.ramp <= 1):
            raise ValueError(f"schedule ramp is a fraction of the period in (0, 1], got {self.ramp}")

    def factor(self, step: int) -> float:
        """The multiplier of λ at `step`, in [0, 1]."""
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear":
            return min(1.0, max(step, 0) / self.steps)
        rise = self.ramp * self.steps
        return min(1.0, (max(step, 0) % self.steps) / rise)

    def __call__(self, base: float, step: int) -> float:
        return base * self.factor(step)


# ----------------------------------------------------------------------------------------------
# the trainer


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DataParallel / DDP
        model = model.module
    return model


KLClip = Literal["joint", "separate"]
KL_CLIPS = ("joint", "separate")


class _NVLoss:
    """The NVIB part of `NVTrainer` / `NVCausalLMTrainer` (a mixin in front of a HuggingFace `Trainer`).

    compute_loss = task loss + λ_G(step)·Σ_sites KL_G + λ_D(step)·Σ_sites KL_D in training mode; in
    evaluation mode (no sampling, no KL) it is the task loss alone. The training logs gain, averaged over
    the logging interval, ``kl_g_<kind>`` / ``kl_d_<kind>`` (Σ over the sites of that kind: encoder,
    cross, decoder), ``kl_<kind>`` (their sum), ``task_loss``, and the current ``lambda_g`` / ``lambda_d``.

    `kl_clip` says how `max_grad_norm` applies: ``joint`` clips the gradient of the whole loss (the Trainer's
    usual clipping); ``separate`` clips the task gradient and the KL gradient to `max_grad_norm` each and adds
    them, so a large KL gradient can no longer shrink the task update (benchmarks/RESULTS.md, "kl
    gradients"). With ``separate`` the KL gradient is taken by its own backward pass (about one more encoder
    backward per step) and is logged as ``kl_grad_norm`` (before clipping; ``grad_norm`` is then the task's).
    """

    def __init__(
        self,
        *args: Any,
        lambda_g: float = 0.0,
        lambda_d: float = 0.0,
        schedule: LambdaSchedule | None = None,
        nv_lr: float | None = None,
        kl_clip: KLClip = "joint",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        # Many models take **kwargs but ignore num_items_in_batch (BART computes a plain mean), so the
        # Trainer's token-count normalisation would leave their loss unscaled under gradient accumulation.
        # Every loss here is a per-batch mean instead, which the Trainer divides by the accumulation steps
        # (KL terms included).
        self.model_accepts_loss_kwargs = False
        _check_lambda("lambda_g", lambda_g)
        _check_lambda("lambda_d", lambda_d)
        _check_kl_clip(kl_clip)
        self.lambda_g, self.lambda_d = float(lambda_g), float(lambda_d)
        self.schedule = schedule or LambdaSchedule()
        self.nv_lr = nv_lr
        # without clipping (max_grad_norm <= 0) both ways add the same unclipped gradients: skip the extra pass
        self.kl_clip = kl_clip if self.args.max_grad_norm > 0 else "joint"
        self._kl_sums: dict[str, torch.Tensor] = {}
        self._kl_count = 0
        self._kl_grads: dict[int, torch.Tensor] = {}  # kl_clip="separate": id(param) -> KL gradient so far
        self._kl_grad_norms: list[float] = []
        if self.kl_clip == "separate":
            self.add_callback(_AddClippedKLGradients(self))

    def create_optimizer(self, *args: Any, **kwargs: Any):
        """The Trainer's optimizer, with the NV layers' parameters in groups of their own at `nv_lr`."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.nv_lr is None or getattr(optimizer, "_nv_split", False):
            return optimizer
        nv_ids = {id(p) for p in _unwrap(self.model)._modules[LAYERS].parameters()}
        groups = []
        for group in optimizer.param_groups:
            for is_nv in (False, True):
                params = [p for p in group["params"] if (id(p) in nv_ids) == is_nv]
                if params:
                    groups.append({**group, "params": params, **({"lr": self.nv_lr} if is_nv else {})})
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        optimizer._nv_split = True
        return optimizer

    def current_lambdas(self, step: int | None = None) -> tuple[float, float]:
        """(λ_G, λ_D) at `step` (default: the current optimisation step)."""
        step = self.state.global_step if step is None else step
        return self.schedule(self.lambda_g, step), self.schedule(self.lambda_d, step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        base = _unwrap(model)
        if model.training and is_converted(base):
            lambda_g, lambda_d = self.current_lambdas()
            per_kind = self._kl_per_kind(base)
            penalty = loss.new_zeros(())
            if lambda_g:
                penalty = penalty + lambda_g * sum(g for g, _ in per_kind.values())
            if lambda_d:
                penalty = penalty + lambda_d * sum(d for _, d in per_kind.values())
            task = loss
            accumulated = getattr(self, "current_gradient_accumulation_steps", 1)
            scaled_for_ga = self._task_loss_scaled_for_ga(num_items_in_batch)
            if scaled_for_ga:
                # the task loss is already this batch's share of the accumulated batch; the KL terms are means
                penalty = penalty / accumulated
                task = loss * accumulated
            self._record(task, per_kind)
            if self.kl_clip == "separate" and penalty.requires_grad and torch.is_grad_enabled():
                # training_step divides an unscaled loss by the accumulation steps before its backward
                self._accumulate_kl_gradients(base, penalty if scaled_for_ga else penalty / accumulated)
                penalty = penalty.detach()  # logged in the loss, but its gradient goes through the callback
            loss = loss + penalty
        return (loss, outputs) if return_outputs else loss

    def _accumulate_kl_gradients(self, model: nn.Module, penalty: torch.Tensor) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(penalty, params, retain_graph=True, allow_unused=True)
        for param, grad in zip(params, grads, strict=True):
            if grad is not None:
                key = id(param)
                self._kl_grads[key] = self._kl_grads[key] + grad if key in self._kl_grads else grad

    @torch.no_grad()
    def _add_clipped_kl_gradients(self, model: nn.Module) -> None:
        """After the Trainer clipped the task gradient: clip the accumulated KL gradient alone and add it."""
        if not self._kl_grads:
            return
        params = {id(p): p for p in model.parameters()}
        grads = self._kl_grads
        self._kl_grads = {}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for grad in grads.values():  # the Trainer's backward all-reduces the task gradient; do the same
                torch.distributed.all_reduce(grad)
                grad /= torch.distributed.get_world_size()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads.values()]))
        self._kl_grad_norms.append(float(norm))
        scale = (self.args.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for key, grad in grads.items():
            param = params[key]
            if param.grad is None:
                param.grad = (grad * scale).to(param.dtype)
            else:
                param.grad.add_((grad * scale).to(param.grad.dtype))

    def _task_loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    @staticmethod
    def _kl_per_kind(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """kind -> (Σ KL_G, Σ KL_D) over that kind's sites, float32, of the last training forward."""
        layers = nv_layers(model)
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for site, (g, d) in kl_terms(model).items():
            kind = layers[site].kind
            g0, d0 = out.get(kind, (0.0, 0.0))
            out[kind] = (g0 + g.float(), d0 + d.float())
        return out

    @torch.no_grad()
    def _record(self, loss: torch.Tensor, per_kind: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        values = {"task_loss": loss.detach().float()}
        for kind, (g, d) in per_kind.items():
            values[f"kl_g_{kind}"] = g.detach()
            values[f"kl_d_{kind}"] = d.detach()
            values[f"kl_{kind}"] = (g + d).detach()
        for key, value in values.items():
            self._kl_sums[key] = self._kl_sums[key] + value if key in self._kl_sums else value.clone()
        self._kl_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the KL terms since the last one and the λ values
            if self._kl_count:
                for key, total in self._kl_sums.items():
                    logs[key] = float(total) / self._kl_count
            if self._kl_grad_norms:
                logs["kl_grad_norm"] = sum(self._kl_grad_norms) / len(self._kl_grad_norms)
            lambda_g, lambda_d = self.current_lambdas()
            logs["lambda_g"], logs["lambda_d"] = lambda_g, lambda_d
            self._kl_sums, self._kl_count, self._kl_grad_norms = {}, 0, []
        super().log(logs, start_time)


class _AddClippedKLGradients(TrainerCallback):
    """kl_clip="separate": the Trainer calls this after clipping the (task) gradient, before the optimizer step."""

    def __init__(self, trainer: _NVLoss):
        self.trainer = weakref.proxy(trainer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._add_clipped_kl_gradients(_unwrap(self.trainer.model))


class NVTrainer(_NVLoss, Seq2SeqTrainer):
    """`Seq2SeqTrainer` whose training loss adds the NVIB regularisers (seq2seq models; see `_NVLoss`)."""


class NVCausalLMTrainer(_NVLoss, Trainer):
    """`Trainer` whose training loss adds the NVIB regularisers (causal LMs: the loss covers the target tokens
    of each prompt + target example, `nvib.data.batches(kind="lm")`; see `_NVLoss`)."""


def _check_kl_clip(value: str) -> None:
    if value not in KL_CLIPS:
        raise ValueError(f"kl_clip must be 'joint' or 'separate', got {value!r}")


def _check_lambda(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


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
) -> nn.Module:
    """Convert `model` if needed (identity initialisation, so it computes what the pretrained model computes)
    and set which parameters train. An already converted model keeps its NV layers, unless `nv_config` is
    given: then they are re-initialised with it (`nvib.configure`).

    `per_token_variance` adds W_σ (zero at first) so that training can give every token its own variance
    (spec §2). None (the default) adds it when the starting knobs give the tokens a variance (some stdev_tau
    > 0) or the model has one already. From stdev_tau = 0 it would be dead weight: log σ² starts at
    log 1e-12, the gradients through the samples scale with σ, and AdamW moves log σ² by about the learning
    rate per step, so the variances stay negligible while evaluation pays for the general form. Hence, when
    per-token variances are asked for (True) and the layers are initialised here (a plain model, or
    `nv_config` given), every site kind whose stdev_tau is 0 starts at `start_stdev_tau` instead
    (σ² = τ_σ²·s0²: the task gradient reaches W_σ through z̃ = μ + σε, scaled by σ)."""
    if isinstance(prior, str | Path):
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


def set_trainable(model: nn.Module, *, train_nv: bool = True, train_pretrained: bool = True) -> None:
    """requires_grad = `train_nv` on the NV layers' parameters, `train_pretrained` on all the others."""
    if not (train_nv or train_pretrained):
        raise ValueError("nothing to train: both the NV parameters and the pretrained weights are frozen")
    nv_ids = {id(p) for p in model._modules[LAYERS].parameters()}
    for param in model.parameters():
        param.requires_grad_(train_nv if id(param) in nv_ids else train_pretrained)


def batch_kind(model: nn.Module) -> BatchKind:
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq"
    architectures = type(model).__name__
    if architectures.endswith(("ForCausalLM", "LMHeadModel")) or getattr(model.config, "is_decoder", False):
        return "lm"
    raise ValueError(
        f"{type(model).__name__} is an encoder-only model with no generation loss to fine-tune. "
        "Fix: fine-tune a seq2seq or causal LM model, or warm-start an encoder-decoder (bert2bert) from it"
    )


def _as_examples(examples: Iterable[Example | Mapping[str, str] | Sequence[str]]) -> list[Example]:
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, Example):
            out.append(ex)
        elif isinstance(ex, Mapping) and "source" in ex:
            out.append(Example(ex["source"], ex.get("target")))
        elif isinstance(ex, Sequence) and not isinstance(ex, str) and 1 <= len(ex) <= 2:
            out.append(Example(*ex))
        else:
            raise ValueError(
                f"training example {i} is {type(ex).__name__}; give nvib.data.Example, (source, target) or "
                '{"source": ..., "target": ...}'
            )
    if not out:
        raise ValueError("no training examples. Fix: pass at least one example (check the data file)")
    return out


def tokenise(
    examples: Iterable[Example],
    tokenizer: Any,
    kind: BatchKind,
    max_source_len: int,
    max_target_len: int,
    *,
    lm_separator: str = "\n",
    chunk: int = 256,
) -> list[dict[str, list[int]]]:
    """One unpadded feature dict per example, tokenised exactly as `nvib.data.batches` does."""
    features: list[dict[str, list[int]]] = []
    for batch in batches(examples, tokenizer, chunk, max_source_len, max_target_len, kind, lm_separator=lm_separator):
        lengths = batch["attention_mask"].sum(1).tolist()
        for row, n in enumerate(lengths):
            item = {"input_ids": batch["input_ids"][row, :n].tolist(), "attention_mask": [1] * n}
            if "labels" in batch:
                labels = batch["labels"][row]
                if kind == "seq2seq":
                    real = (labels != -100).nonzero()
                    n = int(real[-1]) + 1 if len(real) else 0
                item["labels"] = labels[:n].tolist()
            features.append(item)
    return features


@dataclasses.dataclass
class Collator:
    """Right-pads features: input_ids with the pad id, attention_mask with 0, labels with -100."""

    pad_id: int

    def __call__(self, features: Sequence[Mapping[str, list[int]]]) -> dict[str, torch.Tensor]:
        pads = {"input_ids": self.pad_id, "attention_mask": 0, "labels": -100}
        out = {}
        for key in features[0]:
            width = max(len(f[key]) for f in features)
            out[key] = torch.tensor([f[key] + [pads[key]] * (width - len(f[key])) for f in features], dtype=torch.long)
        return out


def _pad_id(tokenizer: Any, model: nn.Module) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if value is not None:
            return int(value)
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else 0


# ----------------------------------------------------------------------------------------------
# the trainer and the run


def build_trainer(
    model: nn.Module,
    train_examples: Iterable[Example],
    tokenizer: Any,
    *,
    output_dir: str | Path,
    lambda_g: float = 1e-3,
    lambda_d: float = 1e-3,
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
    """An `NVTrainer` over the tokenised `train_examples` for a converted `model`.

    Loss = task loss + λ_G·Σ KL_G + λ_D·Σ KL_D, λ following `schedule` (default constant). AdamW with peak
    `lr` (`nv_lr` for the NV layers' parameters, default `lr`), `lr_scheduler` and `warmup_steps`;
    `max_source_len` / `max_target_len` truncate (`lm_separator` joins source and target for causal LMs);
    a checkpoint every `save_steps`. `kl_clip` (default ``separate``) clips the task and KL gradients to
    `max_grad_norm` each (see `NVTrainer`). Seq2seq models get an `NVTrainer`, causal LMs an `NVCausalLMTrainer`
    (plain `Trainer`; loss on the target tokens only). Extra keyword arguments go to their
    `Seq2SeqTrainingArguments` / `TrainingArguments`.
    """
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

    if not is_converted(model):
        raise ValueError("build_trainer needs an NV model: call nvib.finetune.prepare_model (or nvib.convert) first")
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
    _check_kl_clip(kl_clip)
    kind = batch_kind(model)
    features = tokenise(
        _as_examples(train_examples),
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
        data_collator=Collator(_pad_id(tokenizer, model)),
        train_dataset=features,
        processing_class=tokenizer,
        callbacks=callbacks,
        lambda_g=lambda_g,
        lambda_d=lambda_d,
        schedule=schedule,
        nv_lr=nv_lr,
        kl_clip=kl_clip,
    )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# the build_trainer options (besides the schedule) a resumed run must share with the run that wrote the checkpoints
SAME_RUN_OPTIONS = (
    "lambda_g", "lambda_d", "kl_clip", "batch_size", "gradient_accumulation_steps", "lr", "nv_lr", "lr_scheduler",
    "warmup_steps", "weight_decay", "seed", "max_source_len", "max_target_len",
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
    **trainer_options: Any,
) -> nn.Module:
    """Fine-tune `model` with the NVIB regularisers; save it to `output_dir` with `nvib.save` (+ tokenizer).

    `model` is a HuggingFace seq2seq or causal LM (plain or already NV); a plain one is converted in place
    with `nv_config` (default: the equivalence setting) and `prior` (an `EmpiricalPrior` or its file), so
    step 0 computes what the pretrained model computes. `train_nv` / `train_pretrained` choose what trains;
    `per_token_variance` lets training give every token its own variance (W_σ; evaluation then takes the
    general form of spec §4, which costs more: see `nvib.attention`); None decides as `prepare_model` does, and
    with True the site kinds whose knobs give no variance start from τ_σ = `start_stdev_tau`.
    `trainer_options` go to `build_trainer`: λ_G, λ_D and their `schedule`, `max_steps`, `batch_size`, `lr`,
    ... and any `Seq2SeqTrainingArguments`. Checkpoints go to ``output_dir/checkpoints`` every `save_steps` steps; with
    `resume` (the default) a rerun continues from the last one (with `resume=False` they are deleted and
    training starts over). Returns the fine-tuned model in eval mode.
    """
    from transformers.trainer_utils import get_last_checkpoint

    defaults = {
        name: p.default
        for name, p in inspect.signature(build_trainer).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }
    options = {**defaults, **trainer_options}
    options["schedule"] = options["schedule"] or LambdaSchedule()
    _check_lambda("lambda_g", options["lambda_g"])
    _check_lambda("lambda_d", options["lambda_d"])
    examples = _as_examples(train_examples)
    out = Path(output_dir)
    settings = {
        "nv_config": (nv_config or (model.nv_config if is_converted(model) else NVConfig())).to_dict(),
        "prior": (prior if isinstance(prior, str | Path) else getattr(prior, "metadata", None)),
        "train_nv": train_nv,
        "train_pretrained": train_pretrained,
        "per_token_variance": per_token_variance,
        "start_stdev_tau": start_stdev_tau,
        **{name: options[name] for name in SAME_RUN_OPTIONS},
        "schedule": dataclasses.asdict(options["schedule"]),
        "examples": len(examples),
    }
    settings = json.loads(json.dumps(settings, default=str))
    checkpoint_dir = out / CHECKPOINTS
    last = get_last_checkpoint(str(checkpoint_dir)) if resume and checkpoint_dir.is_dir() else None
    if last is not None:
        _check_same_run(out / RUN_ARGS, settings)
    elif not resume and checkpoint_dir.is_dir():
        shutil.rmtree(checkpoint_dir)

    prepare_model(
        model,
        nv_config,
        prior,
        train_nv=train_nv,
        train_pretrained=train_pretrained,
        per_token_variance=per_token_variance,
        start_stdev_tau=start_stdev_tau,
    )
    trainer = build_trainer(model, examples, tokenizer, output_dir=out, **options)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_ARGS).write_text(json.dumps({**settings, "max_steps": options["max_steps"]}, indent=2) + "\n")
    trainer.train(resume_from_checkpoint=last)
    model.eval()
    from nvib.io import save

    save(model, out, tokenizer=tokenizer)
    (out / RUN_LOG).write_text(json.dumps(trainer.state.log_history, indent=2) + "\n")
    return model


def _check_same_run(path: Path, settings: dict) -> None:
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except json.JSONDecodeError:
        return
    changed = sorted(k for k in settings if k in before and before[k] != settings[k])
    if changed:
        raise ValueError(
            f"{path.parent} holds checkpoints of a run with different settings ({', '.join(changed)}). "
            "Fix: use another output directory, the same settings, or --no-resume to start over"
        )


# ----------------------------------------------------------------------------------------------
# command line


def _arg(help: str) -> Any:
    return typer.Argument(help=help, show_default=False)


def _opt(*decls: str, **kwargs: Any) -> Any:
    return typer.Option(*decls, **kwargs)


def _friendly(fn: Callable) -> Callable:
    """Errors a user can fix become one red line and exit code 2; Ctrl-C exits 130 (rerun to resume)."""
    from rich.console import Console
    from rich.text import Text

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        console = Console(stderr=True, soft_wrap=True)
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            console.print(Text("interrupted. Rerun the same command to resume from the last checkpoint.", "yellow"))
            raise typer.Exit(130) from None
        except (ValueError, TypeError, OSError) as err:
            message = " ".join(str(err).split()) or type(err).__name__
            console.print(Text(f"error: {message}", style="bold red"))
            raise typer.Exit(2) from None

    return wrapper


def _load_for_finetuning(path: Path, kind: str, seed: int):
    """(model, tokenizer, already_nv) from a local HF model directory or an NV model directory."""
    import transformers as tf

    from nvib.io import NV_CONFIG, load

    if not path.is_dir():
        raise FileNotFoundError(f"no model directory at {path}. Fix: pass a local Hugging Face model directory")
    if (path / NV_CONFIG).is_file():
        model = load(path)
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer, True
    from nvib.models import load_model
    from nvib.settings import ModelSection

    model, tokenizer = load_model(ModelSection(str(path), kind=kind, seed=seed))
    return model, tokenizer, False


@_friendly
def finetune_cli(
    model: Annotated[
        Path,
        _arg(
            "Local Hugging Face model directory (seq2seq, causal LM, or an encoder with --kind "
            "bert2bert), or an NV model directory written by nvib.save / an earlier `nvib finetune`."
        ),
    ],
    train: Annotated[Path, _arg("Training data: .jsonl/.csv/.tsv or a save_to_disk directory.")],
    output_dir: Annotated[
        Path,
        _opt("--output-dir", "-o", help="Where the fine-tuned NV model, its tokenizer and checkpoints go."),
    ],
    source_column: Annotated[
        str | None, _opt(help="Source column (default: document/summary, source/target or text).")
    ] = None,
    target_column: Annotated[str | None, _opt(help="Target column.")] = None,
    split: Annotated[str | None, _opt(help="Split of a save_to_disk DatasetDict.")] = None,
    limit: Annotated[int | None, _opt(help="Use only the first LIMIT training examples.", min=1)] = None,
    kind: Annotated[
        str, _opt(help="Model kind: auto, seq2seq, causal_lm or bert2bert (warm-start from an encoder).")
    ] = "auto",
    prior: Annotated[
        Path | None,
        _opt(help="Empirical prior (.safetensors from `nvib prior`) for the conversion; default: the unit prior."),
    ] = None,
    knobs: Annotated[
        Path | None,
        _opt(
            help="NVConfig JSON (e.g. nv_config.json of `nvib search`) to initialise the NV layers with; "
            "default: the equivalence setting (step 0 is the pretrained model)."
        ),
    ] = None,
    lambda_g: Annotated[float, _opt("--lambda-g", help="Weight λ_G of the Gaussian KL.", min=0)] = 1e-3,
    lambda_d: Annotated[float, _opt("--lambda-d", help="Weight λ_D of the Dirichlet KL.", min=0)] = 1e-3,
    schedule: Annotated[
        str,
        _opt(
            help="λ schedule: constant; linear (warm-up from 0 over --schedule-steps); cyclic "
            "(annealing with period --schedule-steps, rising over its first half)."
        ),
    ] = "constant",
    schedule_steps: Annotated[int, _opt(help="Warm-up length or cyclic period, in steps.", min=0)] = 0,
    train_nv: Annotated[
        bool, _opt("--train-nv/--freeze-nv", help="Train the NV layers' parameters, or keep them fixed.")
    ] = True,
    train_pretrained: Annotated[
        bool,
        _opt("--train-pretrained/--freeze-pretrained", help="Train the pretrained weights, or keep them fixed."),
    ] = True,
    per_token_variance: Annotated[
        bool | None,
        _opt(
            "--per-token-variance/--shared-variance",
            help="Learn a variance per token (W_σ; evaluation then uses the slower general form), or keep one "
            "shared variance per site (the fast form). Default: per token when the starting knobs give the "
            "tokens a variance (some stdev_tau > 0, see --knobs); from stdev_tau = 0 training cannot grow it.",
            show_default=False,
        ),
    ] = None,
    start_stdev_tau: Annotated[
        float,
        _opt(
            help="With --per-token-variance: the starting τ_σ of the site kinds whose knobs give the tokens no "
            "variance (σ² = τ_σ²·s0²; the task gradient reaches W_σ scaled by σ).",
            min=0,
        ),
    ] = START_STDEV_TAU,
    kl_clip: Annotated[
        str,
        _opt(
            help="Gradient clipping: separate (the task and the KL gradients are clipped to --max-grad-norm each, "
            "so the KL terms cannot shrink the task update) or joint (the whole loss's gradient, one clip)."
        ),
    ] = "separate",
    max_grad_norm: Annotated[float, _opt(help="Gradient clipping norm (0: none).", min=0)] = 1.0,
    max_steps: Annotated[int, _opt(help="Optimisation steps.", min=1)] = 1000,
    batch_size: Annotated[int, _opt(help="Examples per batch.", min=1)] = 8,
    grad_accum: Annotated[int, _opt(help="Batches accumulated per optimisation step.", min=1)] = 1,
    lr: Annotated[float, _opt(help="Peak learning rate (AdamW), > 0.", min=0)] = 5e-5,
    nv_lr: Annotated[
        float | None,
        _opt(
            help="Peak learning rate of the NV layers' parameters (default: --lr). Their log-variances start "
            "far from where they matter, so they may need a larger one.",
            min=0,
        ),
    ] = None,
    lr_scheduler: Annotated[str, _opt(help="Learning-rate schedule: linear, constant, cosine, ...")] = "linear",
    warmup_steps: Annotated[int, _opt(help="Learning-rate warm-up steps.", min=0)] = 0,
    seed: Annotated[int, _opt(help="Random seed (data order, sampling, bert2bert warm start).")] = 0,
    max_source_len: Annotated[int, _opt(help="Truncate sources to this many tokens.", min=1)] = 512,
    max_target_len: Annotated[int, _opt(help="Truncate targets to this many tokens.", min=1)] = 128,
    logging_steps: Annotated[int, _opt(help="Log loss, KL terms and λ every this many steps.", min=1)] = 50,
    save_steps: Annotated[int, _opt(help="Write a checkpoint every this many steps.", min=1)] = 500,
    resume: Annotated[
        bool,
        _opt("--resume/--no-resume", help="Continue from the last checkpoint in OUTPUT_DIR/checkpoints."),
    ] = True,
    progress: Annotated[bool, _opt("--progress/--no-progress", help="Show a progress bar with ETA.")] = True,
) -> None:
    """Fine-tune with the NVIB regularisers: loss = task + λ_G·ΣKL_G + λ_D·ΣKL_D; save the NV model.

    A plain model is first converted with the identity initialisation (with --prior and --knobs if given), so
    step 0 is the pretrained model. OUTPUT_DIR receives the NV model (load it with nvib.load) and its
    tokenizer, finetune_args.json and finetune_log.json (loss, task loss, KL terms per site kind, λ values).
    Checkpoints go to OUTPUT_DIR/checkpoints every --save-steps steps: rerunning the same command after an
    interruption resumes from the last one (--no-resume deletes them and starts over).
    """
    from rich.console import Console

    from nvib.data import load_examples

    if schedule not in ("constant", "linear", "cyclic"):
        raise ValueError(f"--schedule must be constant, linear or cyclic, got {schedule!r}")
    if kl_clip not in KL_CLIPS:
        raise ValueError(f"--kl-clip must be separate or joint, got {kl_clip!r}")
    lambda_schedule = LambdaSchedule(schedule, schedule_steps)  # type: ignore[arg-type]
    if not (train_nv or train_pretrained):
        raise ValueError("nothing to train: --freeze-nv and --freeze-pretrained together freeze everything")
    if not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    if knobs is not None and not knobs.is_file():
        raise FileNotFoundError(f"no knobs file at {knobs}. Fix: pass an NVConfig JSON such as nv_config.json")
    if prior is not None and not prior.is_file():
        raise FileNotFoundError(f"no prior file at {prior}. Fix: estimate one with `nvib prior`")
    examples = load_examples(train, source_column, target_column, split=split, limit=limit)
    loaded, tokenizer, already_nv = _load_for_finetuning(model, kind, seed)
    if already_nv and prior is not None:
        raise ValueError(f"{model} is already an NV model with its own prior. Fix: drop --prior")
    nv_config = NVConfig.load(knobs) if knobs is not None else None
    finetune(
        loaded,
        examples,
        tokenizer,
        output_dir=output_dir,
        nv_config=nv_config,
        prior=prior,
        lambda_g=lambda_g,
        lambda_d=lambda_d,
        schedule=lambda_schedule,
        train_nv=train_nv,
        train_pretrained=train_pretrained,
        per_token_variance=per_token_variance,
        start_stdev_tau=start_stdev_tau,
        kl_clip=kl_clip,
        max_grad_norm=max_grad_norm,
        max_steps=max_steps,
        batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        lr=lr,
        nv_lr=nv_lr,
        lr_scheduler=lr_scheduler,
        warmup_steps=warmup_steps,
        seed=seed,
        max_source_len=max_source_len,
        max_target_len=max_target_len,
        logging_steps=logging_steps,
        save_steps=save_steps,
        resume=resume,
        progress=progress,
    )
    Console(stderr=True, soft_wrap=True).print(f"fine-tuned NV model ({len(examples)} examples) -> {output_dir}")
