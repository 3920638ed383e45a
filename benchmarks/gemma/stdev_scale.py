"""What the key-space stdev knob does to Gemma 3 270M's attention scores (docs/method.md §10), measured on real keys.

    python benchmarks/gemma/stdev_scale.py [--prior runs/gemma/prior-<key>.safetensors] [--examples 16]

At τ_μ = 1 a shared variance σ² = (τ_σ s_0)² adds to every token's score the bias
c_n = Σ_p k̂²_np w_p with w_p = ½(1/√E − 1/β_p), β_p = σ²_p + √E (and rescales q·k by √E/β). Its spread across
the tokens of a sequence is what moves attention: a spread of 1 nat already reorders attention weights
by a factor e. For small τ_σ, c_n ≈ τ_σ² Σ_p k̂²_np s²_0p / (2E), so key dimensions that are large in both k̂
and s_0 (outliers of the key norm's gain) dominate, to the fourth power of their scale. This script hooks the
key norm's output on in-domain prompts and prints, per τ_σ, the standard deviation over tokens of c_n (per layer
and head, then its median and maximum over layers and heads) next to the spread of the stock scores q̂·k̂·s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import nvib
from nvib.core.keyspace import KeySpaceLayer, token_bias

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
from experiment import DEMO_WORDS, POOL, TEMPLATE  # noqa: E402
from gemma3_model import load_gemma3  # noqa: E402

from nvib.workflow.data import load_examples  # noqa: E402
from nvib.workflow.prompting import FewShotPrompt, draw_demonstrations  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STDEVS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", type=Path, help="key-space prior file (default: the newest in runs/gemma)")
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "build")
    parser.add_argument("--examples", type=int, default=16, help="Debian dev prompts (3-shot, as in experiment.py)")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)
    newest = lambda p: p.stat().st_mtime  # noqa: E731
    prior_path = args.prior or max((ROOT / "runs" / "gemma").glob("prior-*.safetensors"), key=newest)

    model, tokenizer = load_gemma3()
    demos = draw_demonstrations(load_examples(args.data / "debian" / "train.jsonl", limit=POOL), 3, 0, DEMO_WORDS)
    prompt = FewShotPrompt(tokenizer, TEMPLATE, demonstrations=demos, max_source_tokens=128)
    rows = [prompt.prefix + (e := prompt.encode(x)).suffix + e.target
            for x in load_examples(args.data / "debian" / "dev.jsonl", limit=args.examples)]  # fmt: skip

    keys: dict[int, list[torch.Tensor]] = {}
    queries: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn

        def keep(_m, _inp, out, i=i):
            keys.setdefault(i, []).append(out[0].transpose(0, 1))  # [N, G, E] (k_norm acts on [B, G, N, E])

        def keep_q(_m, _inp, out, i=i):
            queries.setdefault(i, []).append(out[0].transpose(0, 1))

        hooks += [attn.k_norm.register_forward_hook(keep), attn.q_norm.register_forward_hook(keep_q)]
    with torch.inference_mode():
        for row in rows:
            model.model(input_ids=torch.tensor([row]))
    for h in hooks:
        h.remove()

    nvib.convert(model, prior=nvib.EmpiricalPrior.load(prior_path))
    layers = [m for m in model.modules() if isinstance(m, KeySpaceLayer)]
    E = layers[0].head_dim
    table = {}
    stock = []
    for i in range(len(layers)):
        attn = model.model.layers[i].self_attn
        for k, q in zip(keys[i], queries[i], strict=True):  # k [N, G, E], q [N, H, E]; unrotated (spread only)
            s = torch.einsum("nhe,mhe->hnm", q, k.repeat_interleave(q.shape[1] // k.shape[1], 1)) * attn.scaling
            stock.append(float(s[:, :, 1:].std(-1).median()))
    for tau in STDEVS:
        nvib.configure(model, nvib.NVConfig(stdev_tau_d=tau))
        spread, per_layer = [], []
        for i, layer in enumerate(layers):
            with torch.no_grad():
                weight = layer.terms()["key_weight"]  # [G, E], the factor NV attention uses (None: no variance)
            # c_n per token [G, N-1] (BOS left out), then its spread over the tokens: [G] per sequence
            spreads = torch.stack(
                [torch.zeros(k.shape[1], dtype=torch.float64) if weight is None
                 else token_bias(k.transpose(0, 1)[None, :, 1:], weight)[0].std(-1) for k in keys[i]]
            )  # fmt: skip
            spread.append(spreads.flatten())
            per_layer.append(round(float(spreads.max()), 3))
        spread = torch.cat(spread)
        table[tau] = {"median": float(spread.median()), "max": float(spread.max()), "max_per_layer": per_layer}
        print(f"stdev_tau {tau:<6g} spread of c_n over tokens (nats): median {table[tau]['median']:.3g}, "
              f"max {table[tau]['max']:.3g}; max per layer {per_layer}")  # fmt: skip
    med = float(torch.tensor(stock).median())
    print(f"stock scores q̂·k̂·s (unrotated): median over layers/heads/queries of the spread over keys: {med:.3g} nats")
    print(f"E = {E}, √E = {layers[0].noise:g}; prior s_0² per layer: max "
          + ", ".join(f"{float(l.prior_var.max()):.3g}" for l in layers))  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"stdev_tau": table, "stock_spread": med, "prior": str(prior_path)}, indent=1))


if __name__ == "__main__":
    main()
