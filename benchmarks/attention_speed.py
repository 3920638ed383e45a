"""NV attention vs stock attention: time and peak memory on a bart-base-sized model (random weights).

    python benchmarks/attention_speed.py [--reps 3] [--threads 2] [--out benchmarks/RESULTS.md]

(a) teacher-forced forward, batch 8, source 256, target 64; (b) greedy generation, batch 4, source 256,
64 new tokens. Variants: stock, NV at the equivalence setting, NV at a regularised setting (all three the fast
form of spec §6), and NV with per-token variances (W_σ ≠ 0, as after fine-tuning: the general form of §4). Each variant
runs in its own process so that its peak resident memory can be read; times are the best of `reps`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("stock", "nv-equivalence", "nv-regularised", "nv-per-token-variance")
BART_BASE = dict(  # facebook/bart-base (BartConfig's defaults are bart-large)
    d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
    encoder_ffn_dim=3072, decoder_ffn_dim=3072,
)  # fmt: skip
REGULARISED = dict(alpha_tau_e=-3, alpha_tau_c=-7, alpha_tau_d=2, stdev_tau_e=0.35, stdev_tau_c=0.1, stdev_tau_d=0.2)


def measure(variant: str, reps: int, threads: int) -> dict:
    import torch
    import transformers as tf

    import nvib

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = tf.BartForConditionalGeneration(tf.BartConfig(**BART_BASE)).eval()
    if variant != "stock":
        config = nvib.NVConfig(**REGULARISED) if variant != "nv-equivalence" else nvib.NVConfig()
        nvib.convert(model, config, per_token_variance=variant == "nv-per-token-variance")
    if variant == "nv-per-token-variance":
        with torch.no_grad():
            for layer in nvib.nv_layers(model).values():
                layer.logvar_weight.normal_(0, 0.1 / layer.dim**0.5)
    g = torch.Generator().manual_seed(0)
    fwd = dict(
        input_ids=torch.randint(4, 50000, (8, 256), generator=g),
        attention_mask=torch.ones(8, 256, dtype=torch.long),
        decoder_input_ids=torch.randint(4, 50000, (8, 64), generator=g),
    )
    fwd["attention_mask"][::2, 200:] = 0  # padding in half the rows
    gen = dict(input_ids=fwd["input_ids"][:4], attention_mask=fwd["attention_mask"][:4])
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def forward():
        model(**fwd)

    def generate():
        out = model.generate(**gen, max_new_tokens=64, min_new_tokens=64, do_sample=False, num_beams=1)
        assert out.shape[1] >= 64

    result = {}
    with torch.inference_mode():
        for name, fn in (("forward", forward), ("generate", generate)):
            fn()  # warm-up (and fast-form weights folded once)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            result[name] = min(times)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_rss_over_model_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args.reps, args.threads)))
        return
    rows = {}
    for variant in VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--reps",
            str(args.reps),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
        print(variant, rows[variant], flush=True)
    stock = rows["stock"]
    lines = [
        "| variant | forward (s) | ratio | generate (s) | ratio | peak RSS (MB) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, r in rows.items():
        lines.append(
            f"| {variant} | {r['forward']:.3f} | {r['forward'] / stock['forward']:.3f} | {r['generate']:.3f} | "
            f"{r['generate'] / stock['generate']:.3f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] / stock['peak_rss_mb']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    import torch

    header = (
        "## attention_speed.py\n\n"
        f"bart-base-sized BartForConditionalGeneration (random weights), torch {torch.__version__}, "
        f"{args.threads} threads, {platform.processor() or platform.machine()}, best of {args.reps}. "
        "(a) forward: batch 8, source 256 (half the rows padded from 200), target 64; "
        "(b) greedy generate: batch 4, source 256, 64 new tokens. Target: every ratio <= 1.10 for the fast form "
        "(equivalence, regularised); the per-token-variance row is the general form of spec §4, reported for "
        "its cost.\n\n"
        "Command: `python benchmarks/attention_speed.py`\n\n"
    )
    update_section(args.out, "attention_speed.py", header + table + "\n")


def update_section(path: Path, name: str, body: str) -> None:
    """Replace the `## name` section of a markdown results file (other sections are kept)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    marker = f"## {name}\n"
    if marker in text:
        start = text.index(marker)
        end = text.find("\n## ", start + 1)
        text = text[:start] + body.rstrip("\n") + "\n" + ("\n" + text[end + 1 :] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)


if __name__ == "__main__":
    main()
