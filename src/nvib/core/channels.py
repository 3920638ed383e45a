"""The channels per head of a z-space NV module: what its projections emit and its KV cache carries.

Per head: the E channels of the pretrained head, one channel carrying the per-key score bias c_n (keys), a constant
1/s (queries) or the prior indicator (values), then `spare` channels of the per-token ratios σ²_n/β_n (general form,
docs/method.md §4: half in the keys, half in the values, so they follow the cache's beam reordering) and `pad` zero
channels that round the width up to a multiple of `kernels.ALIGN` (a model converted on a GPU).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from nvib.core.memo import TensorCache

C_LIMIT = 1e4  # |c_n| bound so the bias channel stays finite in float16 (e^-1e4 is already 0)


@dataclasses.dataclass(eq=False, kw_only=True)
class HeadLayout:
    """Channel layout of `heads` heads of E = `head_dim` channels each."""

    heads: int
    head_dim: int  # E of the pretrained module
    spare: int = 0  # extra channels per head carrying σ²_n/β_n (general form only)
    pad: int = 0  # zero channels after the others
    tails: TensorCache = dataclasses.field(default_factory=TensorCache)  # `tail` tensors

    @property
    def width(self) -> int:
        """Channels per head the projections emit: E, the bias/indicator channel, the spare and the zero channels."""
        return self.head_dim + 1 + self.spare + self.pad

    def with_channel(
        self, out: torch.Tensor, extra: torch.Tensor | float, spare: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[..., H, E] plus one channel per head ([...] or a constant), the spare channels ([..., H, spare], zeros
        when None) and the zero channels -> [..., H·width], in one concatenation."""
        if isinstance(extra, float) and spare is None and not self.spare + self.pad:
            return F.pad(out, (0, 1), value=extra).flatten(-2)  # a constant channel: one padded copy, the fastest
        if isinstance(extra, float) and spare is None:  # the constant and the zeros after it: one cached tensor
            parts = [out, self.tail(extra, out)]
        else:
            channel = self.tail(extra, out)[:1] if isinstance(extra, float) else extra.clamp(-C_LIMIT, C_LIMIT)
            channel = (channel if channel.dtype == out.dtype else channel.to(out.dtype))[..., None, None]
            zeros = self.tail(0.0, out)
            parts = [out, channel, zeros[1:]]
            if spare is not None:
                parts[2:] = [spare.to(out.dtype), zeros[1 + self.spare :]]
        lead = out.shape[:-1]
        return torch.cat([t.expand(*lead, t.shape[-1]) for t in parts if t.shape[-1]], -1).flatten(-2)

    def tail(self, value: float, like: torch.Tensor) -> torch.Tensor:
        """[value, 0, …, 0] of 1 + spare + pad channels in `like`'s dtype and device (kept per value, dtype, device)."""

        def make() -> torch.Tensor:
            return torch.tensor([value] + [0.0] * (self.spare + self.pad), dtype=like.dtype, device=like.device)

        return self.tails.get_or_make((value, like.dtype, like.device), make)

    def split_ratio(self, ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """σ²/β [..., P] -> the key's and the value's spare channels, [..., H, spare] each."""
        padded = F.pad(ratio, (0, 2 * self.heads * self.spare - ratio.shape[-1]))
        padded = padded.view(*ratio.shape[:-1], self.heads, 2 * self.spare)
        return padded[..., : self.spare], padded[..., self.spare :]

    def gather_ratio(self, key: torch.Tensor, value: torch.Tensor, size: int) -> torch.Tensor:
        """Inverse of `split_ratio` on keys and values [B, H, N, width]: σ²/β [B, N, P = `size`]."""
        E1 = self.head_dim + 1
        both = torch.cat([key[..., E1 : E1 + self.spare], value[..., E1 : E1 + self.spare]], -1)  # [B, H, N, 2·spare]
        return both.transpose(1, 2).flatten(2)[..., :size]
