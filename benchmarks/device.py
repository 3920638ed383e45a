"""NV attention on a GPU: speed, memory, SDPA backends and equivalence against stock (issue 25).

    bash benchmarks/device.sh OUT          # on a CUDA machine: PYTHONPATH=src, nothing installed
    python benchmarks/device.py --smoke --device cpu --out /tmp/dev   # the same code on tiny shapes (tests)

Random-weight bart-base, bart-large and a Llama/Qwen-shaped decoder of about 0.5B parameters, in bf16 and fp16:
forward (batch 8 × 512) and greedy generate (batch 8, prompt 512, 128 new tokens), stock against NV at equivalence
(NVConfig()) and at regularised knobs; NV/stock time ratios from alternating runs timed with CUDA events (median and
best of 5), peak `max_memory_allocated` ratios, the SDPA backend each NV call can use (`sdpa_kernel` restricted to
one backend at a time: a refusal means that backend was not usable) and logits against stock at equivalence.
Writes OUT/device.json and OUT/device.md. Needs only torch, transformers and safetensors (`import nvib` does not pull
the workflow's dependencies).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import transformers as tf
from torch.nn.attention import SDPBackend, sdpa_kernel

import nvib

BART_BASE = dict(
    d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
    encoder_ffn_dim=3072, decoder_ffn_dim=3072,
)  # fmt: skip
BART_LARGE = dict(
    d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16, decoder_attention_heads=16,
    encoder_ffn_dim=4096, decoder_ffn_dim=4096,
)  # fmt: skip
DECODER_05B = dict(  # Qwen2.5-0.5B's shape (GQA 14/2, head 64), Llama modules
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    head_dim=64, vocab_size=32000, max_position_embeddings=4096,
)  # fmt: skip
SEQ2SEQ_KNOBS = nvib.NVConfig(
    alpha_tau_e=-3, alpha_tau_c=-7, alpha_tau_d=2, stdev_tau_e=0.35, stdev_tau_c=0.1, stdev_tau_d=0.2
)
DECODER_KNOBS = nvib.NVConfig(alpha_tau_d=-2, stdev_tau_d=0.3)
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def models(smoke: bool):
    if smoke:
        small = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128)  # fmt: skip
        dec = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=256)  # fmt: skip
        return [("bart-tiny", "seq2seq", lambda: tf.BartForConditionalGeneration(tf.BartConfig(**small))),
                ("decoder-tiny", "lm", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**dec)))]  # fmt: skip
    return [
        ("bart-base", "seq2seq", lambda: tf.BartForConditionalGeneration(tf.BartConfig(**BART_BASE))),
        ("bart-large", "seq2seq", lambda: tf.BartForConditionalGeneration(tf.BartConfig(**BART_LARGE))),
        ("decoder-0.5B", "lm", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**DECODER_05B))),
    ]


class Clock:
    """Wall time of a call: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000


def peak(device: str, fn) -> int:
    if not device.startswith("cuda"):
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def ratios(clock: Clock, stock_fn, nv_fn, reps: int) -> dict:
    stock_fn(), nv_fn()  # warm-up
    s, n = [], []
    for _ in range(reps):  # alternating
        s.append(clock(stock_fn))
        n.append(clock(nv_fn))
    r = [b / a for a, b in zip(s, n, strict=True)]
    return {"median": statistics.median(r), "best": min(n) / min(s), "stock_s": min(s), "nv_s": min(n)}


def backends(model, batch: dict, device: str) -> dict:
    """Which SDPA backend can run every call of one NV forward: each tried alone."""
    out = {}
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel([backend]), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model(**batch)
            out[name] = "ok"
        except RuntimeError as err:
            out[name] = f"refused: {str(err).splitlines()[0][:120]}"
    return out


def run_one(name: str, kind: str, build, dtype: torch.dtype, args) -> dict:
    device, B, L, new = args.device, args.batch, args.length, args.new_tokens
    torch.manual_seed(0)
    stock = build().eval().to(device=device, dtype=dtype)
    vocab = stock.config.vocab_size
    ids = torch.randint(5, vocab, (B, L), device=device)
    mask = torch.ones_like(ids)
    mask[1, : L // 4] = 0  # one padded row: masks are on every path
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        mask[1] = mask[1].flip(0)  # right padding for the encoder
        batch["decoder_input_ids"] = torch.randint(5, vocab, (B, min(L, 128)), device=device)
    gen_args = {k: v for k, v in batch.items() if k != "decoder_input_ids"}
    stock.generation_config.pad_token_id = 0
    knobs = SEQ2SEQ_KNOBS if kind == "seq2seq" else DECODER_KNOBS
    nvs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, config in (("equivalence", nvib.NVConfig()), ("regularised", knobs)):
            nvs[label] = nvib.convert(copy.deepcopy(stock), config)
    clock = Clock(device)
    result = {
        "model": name,
        "dtype": str(dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in stock.parameters()),
    }

    def forward(m):
        return lambda: m(**batch)

    def generate(m):
        return lambda: m.generate(**gen_args, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    with torch.no_grad():
        ref = stock(**batch).logits.float()
        got = nvs["equivalence"](**batch).logits.float()
        valid = mask.bool() if kind == "lm" else slice(None)
        result["equivalence_max_abs_logit_diff"] = float((got - ref)[valid].abs().max())
        result["equivalence_same_greedy"] = bool(torch.equal(generate(stock)(), generate(nvs["equivalence"])()))
        for label, nv in nvs.items():
            for what, make in (("forward", forward), ("generate", generate)):
                r = ratios(clock, make(stock), make(nv), args.reps)
                r["memory"] = peak(device, make(nv)) / max(1, peak(device, make(stock)))
                result[f"{what} {label}"] = r
    if device.startswith("cuda"):
        result["backends"] = {label: backends(nv, batch, device) for label, nv in nvs.items()}
    del stock, nvs
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def render(results: list[dict], meta: dict) -> str:
    lines = [
        f"Device: {meta['device_name']}; torch {meta['torch']}, transformers {meta['transformers']}; "
        f"batch {meta['batch']} × {meta['length']}, {meta['new_tokens']} new tokens; NV/stock, median (best) of "
        f"{meta['reps']} alternating runs; memory = peak allocated NV/stock. Wall {meta['seconds']:.0f} s.",
        "",
        "| model | dtype | logits Δ at equivalence | same greedy | forward eq | forward reg | generate eq | "
        "generate reg | memory fwd reg | memory gen reg | backends usable (regularised) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cell = {k: f"{v['median']:.3f} ({v['best']:.3f})" for k, v in r.items() if isinstance(v, dict) and "best" in v}

        usable = ", ".join(k for k, v in r.get("backends", {}).get("regularised", {}).items() if v == "ok") or "n/a"
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['equivalence_max_abs_logit_diff']:.2e} | "
            f"{r['equivalence_same_greedy']} | {cell['forward equivalence']} | {cell['forward regularised']} | "
            f"{cell['generate equivalence']} | {cell['generate regularised']} | "
            f"{r['forward regularised']['memory']:.3f} | {r['generate regularised']['memory']:.3f} | {usable} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny models and shapes (checks the script)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    args.batch, args.length, args.new_tokens = (2, 16, 4) if args.smoke else (8, 512, 128)
    if args.smoke:
        args.reps = min(args.reps, 2)
    dtypes = [torch.bfloat16, torch.float16] if args.device.startswith("cuda") else [torch.float32]
    t0 = time.time()
    results = []
    for name, kind, build in models(args.smoke):
        for dtype in dtypes:
            results.append(run_one(name, kind, build, dtype, args))
            print(json.dumps(results[-1]), flush=True)
    cuda = args.device.startswith("cuda")
    meta = {
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": tf.__version__, "batch": args.batch, "length": args.length,
        "new_tokens": args.new_tokens, "reps": args.reps, "seconds": time.time() - t0,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (args.out / "device.md").write_text(render(results, meta))
    print(render(results, meta))


if __name__ == "__main__":
    main()
