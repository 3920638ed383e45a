"""The NVIB training loss on the HuggingFace Trainer: λ schedules, the KL terms and fine-tuning's own regularisers
(L2-SP, feature-mean matching) in the loss and the logs, the separately clipped regulariser
gradients (docs/method.md §8)."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback

from nvib.core.convert import LAYERS, is_converted, kl_terms, nv_layers
from nvib.core.prior import EmpiricalPrior
from nvib.workflow.choices import KL_CLIPS, SCHEDULES, KLClip
from nvib.workflow.train.clipping import SeparateClipping
from nvib.workflow.train.regularisers import L2SP, FeatureMean, check_weight

__all__ = ["KL_CLIPS", "KLClip", "LambdaSchedule", "NVCausalLMTrainer", "NVTrainer", "check_kl_clip", "check_lambda"]

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
        if self.kind not in SCHEDULES:
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


class _NVLoss:
    """The NVIB part of `NVTrainer` / `NVCausalLMTrainer` (a mixin in front of a HuggingFace `Trainer`).

    compute_loss = task loss + λ_G(step)·Σ_sites KL_G + λ_D(step)·Σ_sites KL_D + α(step)·L2-SP + μ(step)·FM in
    training mode; in evaluation mode (no sampling, no KL) it is the task loss alone. The KL terms need an NV model
    (λ_G = λ_D = 0 on a plain one); `l2sp` = α weighs ½·Σ‖w − w_start‖² over the pretrained weights (`L2SP`, w_start:
    the weights when the trainer is built); `feature_mean` = μ weighs the feature-mean penalty of a plain model
    (`FeatureMean`, needs `prior`). All weights follow `schedule`. The training logs gain, averaged over the logging
    interval, ``kl_g_<kind>`` / ``kl_d_<kind>`` (Σ over the sites of that kind: encoder, cross, decoder),
    ``kl_<kind>`` (their sum), ``l2sp`` / ``feature_mean`` (the unweighted penalties, when their weight is > 0),
    ``task_loss``, and the current ``lambda_g`` / ``lambda_d`` (and ``lambda_l2sp`` / ``lambda_feature_mean``).

    `kl_clip` says how `max_grad_norm` applies: ``joint`` clips the gradient of the whole loss (the Trainer's
    usual clipping); ``separate`` clips the task gradient and the regularisers' gradient (KL terms and penalties
    together) to `max_grad_norm` each and adds them, so a large regulariser gradient can no longer shrink the task
    update (benchmarks/RESULTS.md, "kl gradients"). With ``separate`` the regularisers' gradient is taken by its own
    backward pass (about one more encoder backward per step) and is logged as ``kl_grad_norm`` (before clipping;
    ``grad_norm`` is then the task's).
    """

    def __init__(
        self,
        *args: Any,
        lambda_g: float = 0.0,
        lambda_d: float = 0.0,
        schedule: LambdaSchedule | None = None,
        nv_lr: float | None = None,
        kl_clip: KLClip = "joint",
        l2sp: float = 0.0,
        feature_mean: float = 0.0,
        prior: EmpiricalPrior | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        # Many models take **kwargs but ignore num_items_in_batch (BART computes a plain mean), so the
        # Trainer's token-count normalisation would leave their loss unscaled under gradient accumulation.
        # Every loss here is a per-batch mean instead, which the Trainer divides by the accumulation steps
        # (KL terms included).
        self.model_accepts_loss_kwargs = False
        check_lambda("lambda_g", lambda_g)
        check_lambda("lambda_d", lambda_d)
        check_kl_clip(kl_clip)
        check_weight("l2sp", l2sp)
        check_weight("feature_mean", feature_mean)
        base = _unwrap(self.model)
        if (lambda_g or lambda_d) and not is_converted(base):
            raise ValueError(
                f"lambda_g = {lambda_g:g}, lambda_d = {lambda_d:g} weigh the KL terms of NV layers, but the model is "
                "not converted. Fix: convert it first (nvib.workflow.train.prepare_model) or set both to 0"
            )
        self.lambda_g, self.lambda_d = float(lambda_g), float(lambda_d)
        self.l2sp, self.feature_mean = float(l2sp), float(feature_mean)
        self._l2sp = L2SP(base) if self.l2sp else None
        self._features = FeatureMean(base, prior) if self.feature_mean else None
        self.schedule = schedule or LambdaSchedule()
        self.nv_lr = nv_lr
        # without clipping (max_grad_norm <= 0) both ways add the same unclipped gradients: skip the extra pass
        self.kl_clip = kl_clip if self.args.max_grad_norm > 0 else "joint"
        self._kl_sums: dict[str, torch.Tensor] = {}
        self._kl_count = 0
        self._clipping = SeparateClipping() if self.kl_clip == "separate" else None
        if self._clipping is not None:
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
        if self._features is not None:
            self._features.clear()
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        base = _unwrap(model)
        if model.training:
            lambda_g, lambda_d = self.current_lambdas()
            per_kind = self._kl_per_kind(base) if is_converted(base) else {}
            penalty = loss.new_zeros(())
            if lambda_g:
                penalty = penalty + lambda_g * sum(g for g, _ in per_kind.values())
            if lambda_d:
                penalty = penalty + lambda_d * sum(d for _, d in per_kind.values())
            terms = {}
            if self._l2sp is not None:
                terms["l2sp"] = self._l2sp()
            if self._features is not None:
                terms["feature_mean"] = self._features(inputs)
            for name, term in terms.items():
                weight = self.schedule(getattr(self, name), self.state.global_step)
                if weight:
                    penalty = penalty + weight * term
            task = loss
            accumulated = getattr(self, "current_gradient_accumulation_steps", 1)
            scaled_for_ga = self._task_loss_scaled_for_ga(num_items_in_batch)
            if scaled_for_ga:
                # the task loss is already this batch's share of the accumulated batch; the KL terms are means
                penalty = penalty / accumulated
                task = loss * accumulated
            self._record(task, per_kind, terms)
            if self._clipping is not None and penalty.requires_grad and torch.is_grad_enabled():
                # training_step divides an unscaled loss by the accumulation steps before its backward
                self._clipping.accumulate(base, penalty if scaled_for_ga else penalty / accumulated)
                penalty = penalty.detach()  # logged in the loss, but its gradient goes through the callback
            loss = loss + penalty
        return (loss, outputs) if return_outputs else loss

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
    def _record(
        self,
        loss: torch.Tensor,
        per_kind: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        terms: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        values = {"task_loss": loss.detach().float(), **{k: v.detach().float() for k, v in (terms or {}).items()}}
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
            norm = self._clipping.mean_norm() if self._clipping is not None else None
            if norm is not None:
                logs["kl_grad_norm"] = norm
            lambda_g, lambda_d = self.current_lambdas()
            logs["lambda_g"], logs["lambda_d"] = lambda_g, lambda_d
            for name in ("l2sp", "feature_mean"):
                if getattr(self, name):
                    logs[f"lambda_{name}"] = self.schedule(getattr(self, name), self.state.global_step)
            self._kl_sums, self._kl_count = {}, 0
        super().log(logs, start_time)


class _AddClippedKLGradients(TrainerCallback):
    """kl_clip="separate": the Trainer calls this after clipping the (task) gradient, before the optimizer step."""

    def __init__(self, trainer: _NVLoss):
        self.trainer = weakref.proxy(trainer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._clipping.add_clipped(_unwrap(self.trainer.model), self.trainer.args.max_grad_norm)


class NVTrainer(_NVLoss, Seq2SeqTrainer):
    """`Seq2SeqTrainer` whose training loss adds the NVIB regularisers (seq2seq models; see `_NVLoss`)."""


class NVCausalLMTrainer(_NVLoss, Trainer):
    """`Trainer` whose training loss adds the NVIB regularisers (causal LMs: the loss covers the target tokens
    of each prompt + target example, `nvib.workflow.data.batches(kind="lm")`; see `_NVLoss`)."""


def check_kl_clip(value: str) -> None:
    if value not in KL_CLIPS:
        raise ValueError(f"kl_clip must be 'joint' or 'separate', got {value!r}")


def check_lambda(name: str, value: float) -> None:
    """A KL weight: a finite number >= 0, as every regulariser's weight (`check_weight`)."""
    check_weight(name, value)
