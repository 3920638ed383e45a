"""NV attention vs stock attention: time and peak memory, one data row per model (`MODELS`).

    python benchmarks/attention_speed.py [--reps 7] [--threads 2] [--models bart-base gemma3-270m] [--out ...]

Workloads: (a) teacher-forced forward, batch 8, source 256 (half the rows padded from 200), target 64 (decoder-only
models: batch 4, prompt 256 + target 64, logits of the target positions); (b) greedy generation, batch 4,
source 256, 64 new tokens ("generate"); (c) greedy generation, batch 4, source 128, 24 new tokens ("short
generate": the per-step overhead). Variants: stock, NV at the equivalence setting,
NV at a regularised setting (the fast form of docs/method.md §6 for z-space models, the key-space form of §10 for rotary
decoder-only ones), and NV with per-token variances (W_σ ≠ 0, entries from N(0, 1e-3²): the general form of §4; z-space
models only).

Time: one process per (model, variant) holds the stock model and its NV copy and alternates them, `reps` times per
workload after one warm-up each; a row reports best-of-N (NV best / stock best) and the median of the N pairwise
ratios (each NV run over the stock run next to it), so a noisy, shared machine shifts both sides alike.
Memory: one fresh process per (model, variant) builds (and converts) the model, resets the kernel's peak-RSS mark
(`/proc/self/clear_refs`), runs every workload once and reads the peak (`VmHWM`): weights plus the workload's
peak, without the other variant's allocations in the same heap.
`--flops` instead counts the FLOPs of one run per workload (stock and NV): the arithmetic NV adds, the
floor under any wall-clock ratio, unaffected by the machine's load.
`--compile` times both models with their forward under `torch.compile(dynamic=True)` (inductor), printed only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BART_BASE = dict(  # facebook/bart-base (BartConfig's defaults are bart-large)
    d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
    encoder_ffn_dim=3072, decoder_ffn_dim=3072,
)  # fmt: skip
REGULARISED = dict(alpha_tau_e=-3, alpha_tau_c=-7, alpha_tau_d=2, stdev_tau_e=0.35, stdev_tau_c=0.1, stdev_tau_d=0.2)
WORKLOADS = ("forward", "generate", "short generate")


def _bart(vocab_size: int = 50265):
    import transformers as tf

    return tf.BartForConditionalGeneration(tf.BartConfig(**BART_BASE, vocab_size=vocab_size)).eval()


def _gemma():
    sys.path.insert(0, str(Path(__file__).parent))
    from gemma3_model import load_gemma3

    return load_gemma3()[0]


def _gemma_available() -> bool:
    sys.path.insert(0, str(Path(__file__).parent))
    from gemma3_model import available

    return available()


@dataclasses.dataclass(frozen=True)
class ModelRow:
    """One benchmarked model: how to build it (eval mode), its vocabulary range, what it runs."""

    build: Callable
    vocab: int
    workloads: tuple[str, ...]
    variants: tuple[str, ...]
    available: Callable[[], bool] = lambda: True
    note: str = ""


MODELS = {
    "bart-base": ModelRow(
        _bart, 50000, WORKLOADS, ("nv-equivalence", "nv-regularised", "nv-per-token-variance"),
        note="bart-base-sized BartForConditionalGeneration, random weights",
    ),
    # issue 25's per-step-overhead workload: a small vocabulary leaves the LM head less of each decoding step
    "bart-base-v8k": ModelRow(
        functools.partial(_bart, 8000), 8000, ("forward", "short generate"),
        ("nv-regularised", "nv-per-token-variance"),
        note="bart-base-sized, vocabulary 8,000, random weights (the per-step-overhead workload of issue 25)",
    ),
    "gemma3-270m": ModelRow(
        _gemma, 200000, WORKLOADS, ("nv-equivalence", "nv-regularised"), _gemma_available,
        note="Gemma 3 270M, real weights (key space, docs/method.md §10)",
    ),
}  # fmt: skip


def _convert(model, variant: str):
    import torch

    import nvib

    if variant == "stock":
        return model
    config = nvib.NVConfig(**REGULARISED) if variant != "nv-equivalence" else nvib.NVConfig()
    nvib.convert(model, config, per_token_variance=variant == "nv-per-token-variance")
    if variant == "nv-per-token-variance":
        with torch.no_grad():
            for layer in nvib.nv_layers(model).values():
                layer.logvar_weight.normal_(0, 1e-3)
    return model


def _runners(model, row: ModelRow) -> dict[str, Callable[[], None]]:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, row.vocab, (8, 256), generator=g)
    mask = torch.ones(8, 256, dtype=torch.long)
    mask[::2, 200:] = 0  # padding in half the rows
    target = torch.randint(4, row.vocab, (8, 64), generator=g)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or 0

    def generate(src: int, new: int) -> Callable[[], None]:
        rows = mask[:4, :src] if model.config.is_encoder_decoder else torch.ones(4, src, dtype=torch.long)
        kw = dict(input_ids=ids[:4, :src], attention_mask=rows)

        def run() -> None:
            out = model.generate(**kw, max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1)
            assert out.shape[1] >= new

        return run

    if model.config.is_encoder_decoder:
        forward = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=target)
    else:  # batch 4, a 256-token prompt and its 64-token target, logits of the target positions only
        forward = dict(input_ids=torch.cat([ids[:4], target[:4]], 1), logits_to_keep=64)
    return {
        "forward": lambda: model(**forward),
        "generate": generate(256, 64),
        "short generate": generate(128, 24),
    }


def _stock_and_nv(name: str, variant: str, compiled: bool = False) -> dict[str, dict[str, Callable[[], None]]]:
    """The workloads of the stock model and of its NV copy, {"stock": runners, "nv": runners}; `compiled`: after one
    eager forward (which folds the fast-form weights), each model's forward through `torch.compile(dynamic=True)`
    (inductor; compiled at the warm-up)."""
    import torch

    torch.manual_seed(0)
    row = MODELS[name]
    stock = row.build()
    models = {"stock": stock, "nv": _convert(copy.deepcopy(stock), variant)}
    runs = {side: _runners(model, row) for side, model in models.items()}
    if compiled:
        for side, model in models.items():
            with torch.inference_mode():
                runs[side]["forward"]()
            model.forward = torch.compile(model.forward, dynamic=True)
    return runs


def measure_time(name: str, variant: str, reps: int, threads: int, works: list[str], compiled: bool = False) -> dict:
    import torch

    torch.set_num_threads(threads)
    runs = _stock_and_nv(name, variant, compiled)
    result = {}
    with torch.inference_mode():
        for work in works:
            times = {"stock": [], "nv": []}
            for side in ("stock", "nv"):  # warm-up: fast-form weights folded once; compiled (a second call: the
                for _ in range(1 + compiled):  # first step's graph and the decoding steps' are two)
                    runs[side][work]()
            for _ in range(reps):
                for side in ("stock", "nv"):
                    t0 = time.perf_counter()
                    runs[side][work]()
                    times[side].append(time.perf_counter() - t0)
            result[work] = times
    return result


def count_flops(name: str, variant: str, works: list[str]) -> dict:
    """FLOPs (2 per multiply-add) of one run of each workload, stock and NV (torch's FlopCounterMode; its registry
    lacks the CPU flash kernel, so it is registered here with the standard SDPA count): the arithmetic NV adds,
    which no noise on a shared machine changes."""
    import torch
    from torch.utils import flop_counter

    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if cpu_flash not in flop_counter.flop_registry:

        def sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:  # shapes, not tensors
            return flop_counter.sdpa_flop_count(query, key, value)

        flop_counter.register_flop_formula(cpu_flash)(sdpa_flops)
    runs = _stock_and_nv(name, variant)
    result = {}
    with torch.inference_mode():
        for work in works:
            result[work] = {}
            for side, run in runs.items():
                run[work]()  # fold the fast-form weights outside the count
                with flop_counter.FlopCounterMode(display=False) as counter:
                    run[work]()
                result[work][side] = counter.get_total_flops()
    return result


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_memory(name: str, variant: str, threads: int, works: list[str]) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    row = MODELS[name]
    model = _convert(row.build(), variant)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (Linux): drop the build's transients
    loaded = _peak_rss_mb()
    runs = _runners(model, row)
    with torch.inference_mode():
        for work in works:
            runs[work]()
    return {"peak_rss_mb": _peak_rss_mb(), "model_rss_mb": loaded}


def _child(args: argparse.Namespace, mode: str, name: str, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, name, variant, "--reps", str(args.reps)]
    cmd += ["--threads", str(args.threads)]
    cmd += ["--workloads", *_workloads(args, MODELS[name])] + ["--compile"] * args.compile
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _workloads(args: argparse.Namespace, row: ModelRow) -> list[str]:
    return [w for w in row.workloads if not args.workloads or w in args.workloads]


def _table(name: str, row: ModelRow, timed: dict, memory: dict, works: list[str]) -> str:
    head = "| variant | " + " | ".join(f"{w}: stock s, NV s, best-of-N, median" for w in works)
    lines = [head + " | peak RSS MB (stock, NV, ratio) |", "|---" * (len(works) + 2) + "|"]
    stock_mem = memory["stock"]["peak_rss_mb"]
    for variant in timed:
        cells = []
        for work in works:
            t = timed[variant][work]
            pairs = [n / s for s, n in zip(t["stock"], t["nv"], strict=True)]
            best = min(t["nv"]) / min(t["stock"])
            cells.append(f"{min(t['stock']):.3f}, {min(t['nv']):.3f}, **{best:.3f}**, {statistics.median(pairs):.3f}")
        mem = memory[variant]["peak_rss_mb"]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {stock_mem:.0f}, {mem:.0f}, {mem / stock_mem:.3f} |")
    return f"**{name}** ({row.note})\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, help="a subset (default: each model's own)")
    parser.add_argument("--variants", nargs="+", help="a subset of each model's NV variants (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--flops", action="store_true", help="only count FLOPs, NV/stock per workload (print)")
    parser.add_argument(
        "--compile", action="store_true", help="time both models under torch.compile (print, do not write)"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # mode, model, variant
    args = parser.parse_args(argv)
    if args.child:
        mode, name, variant = args.child
        works = args.workloads
        if mode == "time":
            print(json.dumps(measure_time(name, variant, args.reps, args.threads, works, args.compile)))
        elif mode == "flops":
            print(json.dumps(count_flops(name, variant, works)))
        else:
            print(json.dumps(measure_memory(name, variant, args.threads, works)))
        return
    tables = []
    for name in args.models:
        row = MODELS[name]
        if not row.available():
            print(f"{name}: not available here, skipped", flush=True)
            continue
        variants = [v for v in row.variants if not args.variants or v in args.variants]
        if args.flops:  # counts are printed, not written
            for variant in variants:
                counted = _child(args, "flops", name, variant)
                ratios = {w: round(c["nv"] / c["stock"], 4) for w, c in counted.items()}
                print(f"{name} {variant} FLOPs NV/stock: {ratios}  ({json.dumps(counted)})", flush=True)
            continue
        memory = {v: _child(args, "memory", name, v) for v in ("stock", *variants)}  # (eager)
        print(name, "memory", memory, flush=True)
        timed = {}
        for variant in variants:
            timed[variant] = _child(args, "time", name, variant)
            print(name, variant, json.dumps(timed[variant]), flush=True)
        tables.append(_table(name, row, timed, memory, _workloads(args, row)))
        print(tables[-1], flush=True)
    if args.flops or args.compile:
        return
    import torch

    header = (
        "## attention_speed.py\n\n"
        f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"N = {args.reps} alternating runs per workload. Forward: batch 8, source 256 (half the rows padded from "
        "200), target 64; generate: greedy, batch 4, source 256, 64 new tokens; short generate: batch 4, source 128, "
        "24 new tokens. Each cell: best stock time, best NV time (seconds), **best-of-N ratio**, median of the N "
        "pairwise ratios. Peak RSS: one fresh process per variant, weights plus the peak of running every workload "
        "once (`VmHWM` after resetting it). Regularised knobs: "
        + ", ".join(f"{k} {v}" for k, v in REGULARISED.items())
        + ".\n\nCommand: `python benchmarks/attention_speed.py`\n\n"
    )
    update_section(args.out, "attention_speed.py", header + "\n\n".join(tables) + "\n")


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
