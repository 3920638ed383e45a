"""The one place the NV paths call `scaled_dot_product_attention`, in shapes a fused CUDA backend takes (issue 25).

On CUDA the flash backend takes no mask, and the memory-efficient and cuDNN backends want a head size that is a
multiple of 8 (4 for float32 in the memory-efficient one). NV attention always has a mask (the prior column is never
hidden) and its z-space heads carry E+1 channels, so off the CPU the call is reshaped: q, k and v zero-padded to a
multiple of 8 channels (a zero channel adds nothing to q·k and its output channel is sliced off), the scale passed
explicitly (the kernel's default would read the padded size), the mask a boolean or float 4D tensor that broadcasts,
last dimensions contiguous, and grouped key/value heads repeated as transformers' own sdpa path does with a mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ALIGN = 8  # head-size multiple every fused CUDA backend accepts, in every dtype
#: tests set "cuda" to run CPU tensors through the GPU shape rules (and off the CPU-only split path)
FORCE_DEVICE: str | None = None


def device_type(t: torch.Tensor) -> str:
    """The device whose rules apply to the attention of `t`."""
    return FORCE_DEVICE or t.device.type


def needs_fused_shapes(device: str) -> bool:
    """Whether calls on `device` are reshaped for the fused GPU backends (everything but the CPU)."""
    return device != "cpu"


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    dropout: float = 0.0,
    device: str | None = None,
) -> torch.Tensor:
    """Attention of q [B, Hq, Q, C], k/v [B, G, N, C or Cv] (G divides Hq) with an additive or boolean `mask`
    broadcastable to [B, Hq, Q, N]; returns [B, Hq, Q, Cv]. `device` (default: `device_type(query)`) chooses the
    shape rules."""
    G, Hq = key.shape[1], query.shape[1]
    if not needs_fused_shapes(device or device_type(query)):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=G != Hq
        )
    if G != Hq:  # the memory-efficient backend takes no grouped heads with a mask
        key, value = (t.repeat_interleave(Hq // G, 1) for t in (key, value))
    width = value.shape[-1]
    size = max(query.shape[-1], width)
    size += -size % ALIGN
    query, key, value = (_pad_to(t, size) for t in (query, key, value))
    if mask is not None:
        mask = _four_d(mask)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out[..., :width]


def _pad_to(t: torch.Tensor, size: int) -> torch.Tensor:
    t = t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))
    return t if t.stride(-1) == 1 else t.contiguous()


def _four_d(mask: torch.Tensor) -> torch.Tensor:
    while mask.dim() < 4:
        mask = mask[None]
    return mask if mask.stride(-1) == 1 else mask.contiguous()
