"""The prior behind the shared prefix against the prior of whole prompts, on Gemma 3 270M (issue 22 §1).

    python benchmarks/gemma/check_prior.py        # about a minute on 2 CPU cores; writes prior_check.json

`nvib run benchmarks/gemma/gemma.yaml`'s prior data and prompt: the prior estimated as the run does it
(`prompting.prompt_prior`: the prefix's cache computed once, its tokens counted once per row) and on the whole
prompts (prefix + suffix + target per row, as runs before this check did). Per site and statistic, the largest
difference relative to the statistic's largest magnitude, and the seconds of each pass (alternated, best of 2).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import nvib
from nvib.workflow.data import pad_and_mask, pad_id
from nvib.workflow.prompting import prompt_prior
from nvib.workflow.run import Run
from nvib.workflow.settings import RunConfig

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "runs" / "gemma-nvib-run" / "prior_check.json"
STATS = ("mean", "var", "sq_var", "log_alpha_mean", "log_alpha_std", "value_mean")


def main() -> None:
    torch.set_num_threads(2)
    config = RunConfig.load(HERE / "gemma.yaml")
    run = Run(config)
    model, _ = run.loaded
    prompt, batch = run.prompt, config.prior.batch_size
    demos = set(prompt.demonstrations)
    train = [e for e in run.examples("train") if e not in demos]

    def whole_prompts():
        for start in range(0, len(train), batch):
            encoded = [prompt.encode(e) for e in train[start : start + batch]]
            ids, mask = pad_and_mask([prompt.prefix + e.suffix + e.target for e in encoded], pad_id(prompt.tokenizer))
            yield {"input_ids": ids, "attention_mask": mask}

    passes = {
        "shared": lambda: prompt_prior(model, prompt, train, batch, progress=False),
        "whole": lambda: nvib.EmpiricalPrior.estimate(model, whole_prompts(), progress=False),
    }
    seconds: dict[str, list[float]] = {k: [] for k in passes}
    priors = {}
    for _ in range(2):
        for name, estimate in passes.items():
            start = time.perf_counter()
            priors[name] = estimate()
            seconds[name].append(time.perf_counter() - start)
    shared, whole = priors["shared"], priors["whole"]
    worst = {stat: 0.0 for stat in STATS}
    for site, w in whole.sites.items():
        s = shared.sites[site]
        assert s.count == w.count, (site, s.count, w.count)
        for stat in STATS:
            a, b = getattr(s, stat), getattr(w, stat)
            if b is not None:
                worst[stat] = max(worst[stat], float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
    record = {
        "examples": len(train),
        "prefix_tokens": len(prompt.prefix),
        "tokens_per_site": next(iter(whole.sites.values())).count,
        "seconds_best": {k: min(v) for k, v in seconds.items()},
        "seconds": seconds,
        "largest_relative_difference": worst,
    }
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    sys.exit(0 if max(worst.values()) <= 1e-4 else 1)


if __name__ == "__main__":
    main()
