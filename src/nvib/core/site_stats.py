"""`SiteStats`: the statistics of one site's key vectors, streaming and exactly mergeable (docs/method.md §7, §12).

Each batch's statistics are computed directly in float64 and folded into the running ones with Chan et al.'s
pairwise update (Pébay's for the third and fourth moments); the token sample keeps the `TOKEN_SAMPLE` smallest
random keys. So shards estimated by separate processes or machines merge exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

TOKEN_SAMPLE = 256  # token vectors kept per site for docs/method.md §12's Std(B)


@dataclasses.dataclass
class SiteStats:
    """Statistics of one site over `count` token vectors z, float64: z-space sites have z of size P (docs/method.md §7),
    key-space sites one key k of size E per key/value head, [G, E] (docs/method.md §10).

    mean, var: per-dimension mean and unbiased variance of z (m_0, s_0²);
    log_alpha_mean, log_alpha_std: mean and standard deviation of ‖z‖²/(2√E) (a_0, ς; one per head in key space);
    value_mean: key space only, the mean of the values (m_v) [G, E];
    m3, m4: Σ (z − mean)³ and Σ (z − mean)⁴ per dimension (docs/method.md §12), None in priors
    saved before they existed;
    sample, sample_key: `TOKEN_SAMPLE` of the tokens [K, ...] (float32) with the random keys that chose them (the K
    smallest keys: merging two samples keeps the K smallest of both, a uniform sample of the
    union), for docs/method.md §12.
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor  # Σ (z − mean)², per dimension
    norm_mean: torch.Tensor  # [] or [G]
    norm_m2: torch.Tensor
    value_mean: torch.Tensor | None = None
    m3: torch.Tensor | None = None
    m4: torch.Tensor | None = None
    sample: torch.Tensor | None = None
    sample_key: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.norm_mean = torch.as_tensor(self.norm_mean, dtype=torch.float64)
        self.norm_m2 = torch.as_tensor(self.norm_m2, dtype=torch.float64)

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.count - 1, 1)

    @property
    def sq_var(self) -> torch.Tensor | None:
        """Var(z_d²) per dimension over the tokens (docs/method.md §12), or None without the higher moments."""
        if self.m3 is None or self.m4 is None:
            return None
        n = max(self.count, 1)
        mu, v, t, q = self.mean, self.m2 / n, self.m3 / n, self.m4 / n
        second = mu * mu + v
        fourth = mu**4 + 6 * mu * mu * v + 4 * mu * t + q
        return (fourth - second * second).clamp(min=0)

    @property
    def log_alpha_mean(self) -> torch.Tensor:
        return self.norm_mean

    @property
    def log_alpha_std(self) -> torch.Tensor:
        return (self.norm_m2 / max(self.count - 1, 1)).sqrt()

    @classmethod
    def of(cls, z: torch.Tensor, noise: float, values: torch.Tensor | None = None) -> SiteStats:
        """Direct statistics of token vectors z [T, P] (or keys [T, G, E], with their values [T, G, E])."""
        z = z.to(torch.float64)
        mean = z.mean(0)
        r = (z * z).sum(-1) / (2 * noise)
        value_mean = None if values is None else values.to(torch.float64).mean(0)
        d = z - mean
        d2 = d * d
        seed = int(
            hashlib.sha256(z[:, ..., :1].numpy().tobytes()).hexdigest()[:8], 16
        )  # the same tokens, the same keys
        keys = torch.rand(z.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        keys, chosen = keys.sort()
        return cls(
            z.shape[0], mean, d2.sum(0), r.mean(0), ((r - r.mean(0)) ** 2).sum(0), value_mean,
            (d2 * d).sum(0), (d2 * d2).sum(0), z[chosen[:TOKEN_SAMPLE]].float(), keys[:TOKEN_SAMPLE],
        )  # fmt: skip

    def merge(self, other: SiteStats) -> SiteStats:
        """Chan et al.'s exact pairwise update."""
        n = self.count + other.count
        if self.count == 0 or other.count == 0:
            return other if self.count == 0 else self
        w = other.count / n
        delta = other.mean - self.mean
        norm_delta = other.norm_mean - self.norm_mean
        value_mean = None
        if self.value_mean is not None and other.value_mean is not None:
            value_mean = self.value_mean + (other.value_mean - self.value_mean) * w
        m3 = m4 = None
        if None not in (self.m3, self.m4, other.m3, other.m4):  # Pébay's pairwise update of the 3rd and 4th moments
            na, nb = self.count, other.count
            m3 = (
                self.m3 + other.m3 + delta**3 * na * nb * (na - nb) / n**2
                + 3 * delta * (na * other.m2 - nb * self.m2) / n
            )  # fmt: skip
            m4 = (
                self.m4 + other.m4 + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
                + 6 * delta**2 * (na * na * other.m2 + nb * nb * self.m2) / n**2
                + 4 * delta * (na * other.m3 - nb * self.m3) / n
            )  # fmt: skip
        sample = key = None
        if None not in (self.sample, other.sample):
            key, order = torch.cat([self.sample_key, other.sample_key]).sort()
            key, sample = key[:TOKEN_SAMPLE], torch.cat([self.sample, other.sample])[order[:TOKEN_SAMPLE]]
        return SiteStats(
            n,
            self.mean + delta * w,
            self.m2 + other.m2 + delta * delta * self.count * w,
            self.norm_mean + norm_delta * w,
            self.norm_m2 + other.norm_m2 + norm_delta * norm_delta * self.count * w,
            value_mean,
            m3,
            m4,
            sample,
            key,
        )
