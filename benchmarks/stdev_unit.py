"""docs/method.md §12's diagonal estimate of Std(B) against Std(B) computed directly on the prior's own tokens.

For every mixture (a z-space site; a key/value head of a key-space site) of real Gemma 3 270M (key space,
the three stdlib docstrings of the Gemma tests) and of the real MiniLM BERT2BERT (z-space), at τ_σ ∈ {0.1, 0.3, 1,
2} nats in the "bias" unit: λ from `nvib.core.layer.variance_scale` (the estimate), then the spread of
B_n = ½ Σ_d (1 − r_d) z_nd² / ν over the very tokens the prior was estimated on. Prints and writes the relative
error |Std_direct − τ_σ| / τ_σ per mixture (clamped mixtures left out), as a JSON next to the table in RESULTS.md.

    PYTHONPATH=src:tests:benchmarks .venv/bin/python benchmarks/stdev_unit.py --out /tmp/stdev_unit.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
from pathlib import Path

import torch

import nvib
from nvib.core import prior as prior_module
from nvib.core.layer import variance_scale

TAUS = (0.1, 0.3, 1.0, 2.0)


def tokens_and_prior(model, batches) -> tuple[nvib.EmpiricalPrior, dict[str, torch.Tensor]]:
    """The prior and, per site, the token vectors it was estimated on ([T, P] or [T, G, E]).

    `EmpiricalPrior.estimate` computes each site's statistics of a batch with `SiteStats.of`, once per site and
    batch in the forward pass's order; the calls are recorded, grouped by their place in that order and named by
    the site whose statistics they reproduce."""
    calls: list[torch.Tensor] = []
    original = prior_module.SiteStats.of

    def record(z, noise, values=None):
        calls.append(z.to(torch.float64))
        return original(z, noise, values)

    prior_module.SiteStats.of = staticmethod(record)
    try:
        prior = nvib.EmpiricalPrior.estimate(model, batches, progress=False)
    finally:
        prior_module.SiteStats.of = staticmethod(original)
    n_sites = len(prior.sites)
    per_site = {}
    for j in range(n_sites):
        z = torch.cat(calls[j::n_sites])
        mean = z.mean(0)
        name = min(
            (n for n, st in prior.sites.items() if st.mean.shape == mean.shape),
            key=lambda n: float((prior.sites[n].mean - mean).abs().max()),
        )
        assert float((prior.sites[name].mean - mean).abs().max()) < 1e-9, "could not match the recorded tokens"
        per_site[name] = z
    return prior, per_site


def errors(prior, per_site, noise_of) -> list[dict]:
    rows = []
    for name, stats in prior.sites.items():
        z = per_site[name]  # [T, P] or [T, G, E]
        z = z if z.dim() == 3 else z[:, None, :]
        s0sq, sq_var = stats.var.reshape(z.shape[1:]), stats.sq_var.reshape(z.shape[1:])
        spread = stats.log_alpha_std.reshape(-1).expand(z.shape[1])
        nu = noise_of[name]
        sample = stats.sample.reshape(-1, *z.shape[1:])
        for tau in TAUS:
            for method, kept in (("diagonal", None), ("sample", sample)):
                lam, clamped = variance_scale(s0sq, sq_var, spread, nu, tau, "bias", name, kept)
                sig2 = lam[:, None] * s0sq
                w = 0.5 * (1 - nu / (sig2 + nu)) / nu  # [G, D]
                direct = (w * z * z).sum(-1).std(0)  # over every token [T, G] -> [G]
                for g in range(z.shape[1]):
                    if not bool(clamped[g]):
                        rows.append({"site": name, "head": g, "tau": tau, "method": method, "direct": float(direct[g])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path[:0] = ["tests", "benchmarks"]
    import argparse as a1, json as j1, textwrap as t1  # noqa: E401, I001 (the texts the Gemma tests use)
    import gemma3_model
    from cases import minilm_bert2bert

    texts = [textwrap.dedent(m.__doc__).strip() for m in (a1, j1, t1)]
    result = {}
    models = {}
    if gemma3_model.available():
        model, tokenizer = gemma3_model.load_gemma3()
        models["gemma3-270m"] = (
            model,
            [tokenizer(t, return_tensors="pt", truncation=True, max_length=256) for t in texts],
        )
    from cases import MINILM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    bb = minilm_bert2bert().eval()
    batches = []
    for t in texts:
        enc = tok(t, return_tensors="pt", truncation=True, max_length=256)
        dec = tok(t[:400], return_tensors="pt", truncation=True, max_length=64)
        batches.append({**enc, "decoder_input_ids": dec["input_ids"], "decoder_attention_mask": dec["attention_mask"]})
    models["minilm-bert2bert"] = (bb, batches)
    for label, (model, data) in models.items():
        prior, per_site = tokens_and_prior(model, data)
        noise = {s.name: s.noise for s in nvib.core.architectures.find_sites(model)}
        rows = errors(prior, per_site, noise)
        for r in rows:
            r["error"] = abs(r["direct"] - r["tau"]) / r["tau"]
        result[label] = rows
        for tau, method in [(t, m) for t in TAUS for m in ("diagonal", "sample")]:
            e = sorted(r["error"] for r in rows if r["tau"] == tau and r["method"] == method)
            if e:
                q = statistics.quantiles(e, n=10) if len(e) > 1 else e
                print(
                    f"{label} {method} τσ={tau}: {len(e)} mixtures, median {statistics.median(e):.3f}, "
                    f"p90 {q[-1]:.3f}, max {e[-1]:.3f}, >20%: {sum(x > 0.2 for x in e)}"
                )
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
