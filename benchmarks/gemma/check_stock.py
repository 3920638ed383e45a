"""The stock rows of the Gemma benchmark through the product (issue 22 §5): `nvib run benchmarks/gemma/gemma.yaml`'s
evaluator (few-shot prompt, shared prefix) against the stored rows of benchmarks/runs/gemma-bias/state.json.

    python benchmarks/gemma/check_stock.py            # about 12 min on 2 CPU cores; writes stock_check.json there

For each domain: the unconverted model with the Debian demonstrations and with the domain's own ("target demos"),
per-example target NLL (largest gap in nats per token) and greedy predictions (how many differ).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from nvib.workflow.data import load_examples
from nvib.workflow.evaluate import new_progress
from nvib.workflow.prompting import FewShotPrompt, draw_demonstrations
from nvib.workflow.run import Run
from nvib.workflow.settings import RunConfig

HERE = Path(__file__).resolve().parent
STATE = HERE.parent / "runs" / "gemma-bias" / "state.json"


def main() -> None:
    torch.set_num_threads(2)
    config = RunConfig.load(HERE / "gemma.yaml")
    (stored,) = json.loads(STATE.read_text()).values()
    run = Run(config)
    evaluator = run.evaluator(None)
    debian = run.prompt
    data = HERE.parent / "data" / "build"
    out, start = {}, time.time()
    for domain in config.data.test:
        test = run.examples("test", domain)
        prompts = {"unconverted": debian}
        if domain != "debian":  # the domain's own demonstrations, drawn as the Debian ones
            given = config.prompt.demonstrations
            pool = load_examples(data / domain / "train.jsonl", limit=given.pool)
            demos = draw_demonstrations(pool, given.k, given.seed, given.source_words)
            prompts["target demos"] = FewShotPrompt(
                debian.tokenizer,
                config.prompt.template,
                demonstrations=demos,
                max_source_tokens=config.data.max_source_len,
            )
        for system, prompt in prompts.items():
            evaluator.prompt = prompt
            with new_progress() as bar:
                evaluator.progress = bar
                outputs = evaluator.outputs(test, f"{domain} · {system}")
            row = stored[f"{domain}/{system}"]
            gap = max(abs(o.nll - nll) / n for o, (nll, n) in zip(outputs, row["nll"], strict=True))
            differ = sum(o.prediction != p for o, p in zip(outputs, row["preds"], strict=True))
            out[f"{domain}/{system}"] = {"n": len(test), "nll_gap_per_token": gap, "differing_predictions": differ}
            print(domain, system, out[f"{domain}/{system}"], f"{time.time() - start:.0f} s", flush=True)
    record = {"config": str(HERE / "gemma.yaml"), "against": str(STATE), "rows": out,
              "prompt": dataclasses.asdict(config.prompt)}  # fmt: skip
    (STATE.parent / "stock_check.json").write_text(json.dumps(record, indent=2) + "\n")
    ok = all(r["nll_gap_per_token"] <= 1e-4 and r["differing_predictions"] == 0 for r in out.values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
