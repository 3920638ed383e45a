"""What NV attention keeps between calls, each with the one rule that says when it is stale.

`FoldMemo` keeps the fast-form weights of a module (docs/method.md §6) while the tensors they were folded from keep
their values; `CallState` hands one module call's validated weights from its query projection to the rest of the call;
`PairMemo` and `TensorCache` keep small per-call and per-dtype products; `SampleReplay` shares one reparameterised
sample among a site's modules and draws it again for activation checkpointing (docs/method.md §8). None of them keeps
anything keyed by tensor identity or version while torch.compile traces: those are not graph inputs.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable

import torch
from torch import nn

from nvib.core.masks import compiling


def tensor_state(tensors) -> tuple:
    """What identifies the values of `tensors`: in-place updates bump `_version`, `.to()` moves the data."""
    return tuple((0 if t.is_inference() else t._version, t.data_ptr(), t.dtype) for t in tensors if t is not None)


class FoldMemo:
    """Weights derived from some tensors, rebuilt only when one of them changed (in place, dtype or device).

    The one rule: a memo is kept only while no gradient flows, and `drop` forgets it wherever the tensors may change
    without a version check seeing it (training, gradients, `load_state_dict`: a compiled call reads the memo without
    checking). Eager calls compare the tensors' `tensor_state` before using it; traced calls take it as it is (as a
    graph input) when it matches the weights' dtype and device, and otherwise trace the build with every term
    (`build(static=True)`).
    """

    def __init__(self, tensors: Callable[[], tuple], build: Callable[..., dict], probe: str):
        self.tensors = tensors  # () -> every tensor the weights depend on (read each time: `.to()` replaces them)
        self.build = build  # (static: bool) -> the weights
        self.probe = probe  # the entry whose dtype and device a traced call checks against the first tensor
        self.value: dict | None = None
        self.key: tuple | None = None

    def get(self) -> dict:
        if compiling():
            if torch.is_grad_enabled():
                self.drop()
            memo, weight = self.value, self.tensors()[0]
            if memo is None or (memo[self.probe].dtype, memo[self.probe].device) != (weight.dtype, weight.device):
                memo = self.build(static=True)
            return memo
        ts = self.tensors()
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)
        if not grad and self.value is not None and tensor_state(ts) == self.key:
            return self.value
        with torch.set_grad_enabled(grad):
            value = self.build()
        self.value, self.key = (None, None) if grad else (value, tensor_state(ts))
        return value

    def drop(self, *_) -> None:
        """Forget the memo (its signature fits a `load_state_dict` post-hook)."""
        self.value = None

    def refresh(self) -> None:
        """Build again now where a memo exists (`nvib.configure`), so a compiled model reads the new knobs."""
        if self.value is not None:
            with torch.no_grad():
                self.get()

    def watch(self, *modules: nn.Module) -> list:
        """Drop the memo after each `load_state_dict` of `modules`; returns the hook handles."""
        return [m.register_load_state_dict_post_hook(self.drop) for m in modules]


class PairMemo:
    """One value kept for the identity of two objects (the first held weakly if `weak`: the value goes with it)."""

    def __init__(self, weak: bool = False):
        self.weak = weak
        self.entry: tuple | None = None  # (first or a weak reference to it, second, value)

    def get(self, first, second):
        entry = self.entry
        if entry is None or compiling():
            return None
        held = entry[0]() if self.weak else entry[0]
        return entry[2] if held is first and entry[1] is second else None

    def keep(self, first, second, value) -> None:
        if compiling():
            return
        self.entry = (weakref.ref(first, self.clear) if self.weak else first, second, value)

    def clear(self, *_) -> None:
        self.entry = None


class TensorCache(dict):
    """Small constant tensors kept per key (value, dtype, device); made afresh while torch.compile traces."""

    def get_or_make(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if compiling():
            return make()
        if key not in self:
            with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
                self[key] = make()
        return self[key]


@dataclasses.dataclass(eq=False)
class CallState:
    """One module call's state: the folded weights its query projection validated (`begin`), read by the key and
    value projections and the attention of that call (`weights`), the key point made once for the key and value
    projections, and in training this forward's sampled prior key and value."""

    memo: FoldMemo
    last: dict | None = None  # the weights of the current call
    checked: bool = False  # `last` was validated by this call's query projection
    point: PairMemo = dataclasses.field(default_factory=PairMemo)  # (x, weights) -> key_scale ⊙ x + key_shift
    prior_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # training: this forward's sampled prior k, v

    def fold(self) -> dict:
        self.last = self.memo.get()
        return self.last

    def begin(self, training: bool) -> None:
        """The query projection starts every call (self- and cross-attention, cached or not): validate the weights
        once; training drops the memo instead (the weights change in place)."""
        if training:
            self.memo.drop()
            return
        self.fold()
        self.checked = True

    def weights(self) -> dict:
        """The folded weights for this call: `last` when the call's query projection validated them."""
        return self.last if self.checked else self.fold()

    def end(self) -> None:
        """Leave this call's weights in `last` for its attention, and let the next call validate again."""
        self.weights()
        self.checked = False
        self.point.clear()


@dataclasses.dataclass(eq=False)
class SampleReplay:
    """A site's last reparameterised sample (docs/method.md §8), shared by every module and projection of the site
    that sees the same key vectors z.

    The caller (module and projection) that drew it asking again for the same z is activation checkpointing
    recomputing that module with the RNG state restored: `reuse` then gives nothing, so the sample is drawn again and
    the recomputation repeats the original's operations and noise. A sample drawn without gradients is not reused
    where gradients are wanted (reentrant checkpointing's first pass)."""

    z: torch.Tensor | None = None
    out: tuple | None = None  # what `sample` returned
    posterior: tuple | None = None  # (μ, log σ², log α) it was drawn from, for the KL terms
    caller: object = None
    grad: bool = False  # drawn where gradients were wanted

    def reuse(self, z: torch.Tensor, caller, grad: bool) -> tuple | None:
        if self.out is not None and self.z is z and self.caller != caller and self.grad == grad:
            return self.out
        return None

    def keep(self, z: torch.Tensor, out: tuple, posterior: tuple, caller, grad: bool) -> None:
        self.z, self.out, self.posterior, self.caller, self.grad = z, out, posterior, caller, grad
