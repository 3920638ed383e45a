"""The few-shot prompt's start-up check: on the first dev examples, the shared prefix gives the unshared NLL
(1e-4 nats/token) and the same greedy outputs, for the stock model and for NV at `CHECK_KNOBS`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from nvib.core import files
from nvib.core.convert import configure, nv_layers
from nvib.core.prior import EmpiricalPrior
from nvib.workflow.prompting import SharedPrefix, check_sharing
from nvib.workflow.search import knob_names
from nvib.workflow.stages.inputs import RunInputs
from nvib.workflow.stages.records import PROMPT_CHECK_FILE, start_run
from nvib.workflow.stages.studies import base_knobs

__all__ = ["CHECK_EXAMPLES", "CHECK_KNOBS", "check_prompt"]

#: The NV setting at which the few-shot prompt's sharing check runs (beside the stock model): a real prior weight
#: and noise, so the check covers the NV paths, not only the identity.
CHECK_KNOBS = {"alpha_tau": 0.0, "stdev_tau": 0.1}
CHECK_EXAMPLES = 3


def check_prompt(inputs: RunInputs, run_dir: Path, prior: EmpiricalPrior) -> dict[str, Any]:
    """Run the check of ``inputs.prompt`` (stock, then NV with ``prior``); leaves the model converted at the
    identity knobs, writes prompt_check.json and returns what it holds."""
    prompt, cfg = inputs.prompt, inputs.config
    assert prompt is not None
    model, _ = inputs.loaded
    items = [prompt.encode(e) for e in inputs.examples("dev")[:CHECK_EXAMPLES]]
    engine, new = SharedPrefix(model, prompt), cfg.generation.max_new_tokens
    inputs.unconverted_model()
    result = {"prefix_tokens": len(prompt.prefix), "stock": check_sharing(engine, items, new)}
    model = inputs.nv_model(prior)
    kinds = {layer.kind for layer in nv_layers(model).values()}
    knobs = {k: CHECK_KNOBS["alpha_tau" if k.startswith("alpha") else "stdev_tau"] for k in knob_names(kinds)}
    with warnings.catch_warnings():  # a clamped stdev_tau (docs/method.md §12) is no news: the user did not choose it
        warnings.simplefilter("ignore", UserWarning)
        configure(model, base_knobs(cfg).replace(**knobs))
    try:
        result["nv"] = {"knobs": knobs, **check_sharing(engine, items, new)}
    finally:
        configure(model, base_knobs(cfg))
    start_run(run_dir, cfg)
    files.write_json(run_dir / PROMPT_CHECK_FILE, result)
    gaps = max(result[s][g] for s in ("stock", "nv") for g in ("nll_gap", "evaluate_nll_gap"))
    inputs.console.print(
        f"prompt: {len(prompt.demonstrations)} demonstrations, prefix of {len(prompt.prefix)} tokens "
        f"shared; check on {len(items)} dev examples, stock and NV: NLL gap {gaps:.1e} nats/token, greedy "
        "outputs identical"
    )
    return result
