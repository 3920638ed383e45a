"""Cost of the empirical prior's streaming pass against a plain forward pass over the same data.

    python benchmarks/prior_speed.py [--batches 6] [--threads 2]

bart-base-sized BART (random weights), teacher-forced batches of 8 × (256 source, 64 target) tokens with
padding. Target: the prior pass costs at most 1.2× the plain forward pass.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import transformers as tf
from attention_speed import BART_BASE, update_section

import nvib


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = tf.BartForConditionalGeneration(tf.BartConfig(**BART_BASE)).eval()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(args.batches):
        batch = dict(
            input_ids=torch.randint(4, 50000, (8, 256), generator=g),
            attention_mask=torch.ones(8, 256, dtype=torch.long),
            labels=torch.randint(4, 50000, (8, 64), generator=g),
        )
        batch["attention_mask"][::2, 200:] = 0
        batch["labels"][1::2, 48:] = -100
        data.append(batch)

    def plain():
        with torch.no_grad():
            for batch in data:
                model(**batch, use_cache=False)

    def prior():
        nvib.EmpiricalPrior.estimate(model, data, progress=False)

    times = {"forward": [], "prior": []}
    plain()
    for _ in range(args.reps):
        for name, fn in (("forward", plain), ("prior", prior)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    fwd, pri = min(times["forward"]), min(times["prior"])
    body = (
        "## prior_speed.py\n\n"
        f"Empirical prior pass vs plain teacher-forced forward over the same {args.batches} batches of 8 × (256 + 64) "
        f"tokens, bart-base size, torch {torch.__version__}, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}, best of {args.reps}. Target: ratio <= 1.2.\n\n"
        "Command: `python benchmarks/prior_speed.py`\n\n"
        "| pass | seconds | ratio |\n|---|---|---|\n"
        f"| plain forward | {fwd:.2f} | 1.000 |\n| prior estimate | {pri:.2f} | {pri / fwd:.3f} |\n"
    )
    print(body)
    update_section(Path(__file__).with_name("RESULTS.md"), "prior_speed.py", body)


if __name__ == "__main__":
    main()
