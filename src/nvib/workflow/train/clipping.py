"""``kl_clip="separate"`` (docs/method.md §8): the regularisers' gradient (KL terms and penalties) taken by a backward
pass of its own, accumulated over the micro-batches, then clipped alone and added to the task gradient after the Trainer
clipped that one, so a large regulariser gradient cannot shrink the task update."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SeparateClipping"]


class SeparateClipping:
    """The regularisers' gradient of the current optimisation step, and the norms it had (before clipping) since
    the last log."""

    def __init__(self) -> None:
        self.grads: dict[int, torch.Tensor] = {}  # id(param) -> the regularisers' gradient so far
        self.norms: list[float] = []

    def accumulate(self, model: nn.Module, penalty: torch.Tensor) -> None:
        """Add the gradient of ``penalty`` (a scalar) with respect to ``model``'s trainable parameters."""
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(penalty, params, retain_graph=True, allow_unused=True)
        for param, grad in zip(params, grads, strict=True):
            if grad is not None:
                key = id(param)
                self.grads[key] = self.grads[key] + grad if key in self.grads else grad

    @torch.no_grad()
    def add_clipped(self, model: nn.Module, max_norm: float) -> None:
        """After the Trainer clipped the task gradient: clip the accumulated gradient alone to ``max_norm``, add it
        to the parameters' ``.grad`` and start the next step from none."""
        if not self.grads:
            return
        params = {id(p): p for p in model.parameters()}
        grads = self.grads
        self.grads = {}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for grad in grads.values():  # the Trainer's backward all-reduces the task gradient; do the same
                torch.distributed.all_reduce(grad)
                grad /= torch.distributed.get_world_size()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads.values()]))
        self.norms.append(float(norm))
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for key, grad in grads.items():
            param = params[key]
            if param.grad is None:
                param.grad = (grad * scale).to(param.dtype)
            else:
                param.grad.add_((grad * scale).to(param.grad.dtype))

    def mean_norm(self) -> float | None:
        """The mean norm since the last call (None if no step added one), and start over."""
        norms, self.norms = self.norms, []
        return sum(norms) / len(norms) if norms else None
