"""Closed choices and defaults that the command line's ``--help`` shows, without importing torch.

The modules that use them (``nvib.workflow.train``) import them from here, so the help and the code agree.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["KL_CLIPS", "MODEL_KINDS", "SCHEDULES", "START_STDEV_TAU", "KLClip", "ModelKind"]

KLClip = Literal["joint", "separate"]
KL_CLIPS = ("separate", "joint")  # the default first
START_STDEV_TAU = 0.1  # per-token variances asked for: the starting τ_σ of the kinds whose knobs give none
ModelKind = Literal["auto", "seq2seq", "causal_lm", "bert2bert"]
MODEL_KINDS = ("auto", "seq2seq", "causal_lm", "bert2bert")
SCHEDULES = ("constant", "linear", "cyclic")  # the λ schedules of nvib.workflow.train.LambdaSchedule
