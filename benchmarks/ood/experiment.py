"""The out-of-domain benchmark (the paper's protocol on models and text that install here).

    python benchmarks/ood/experiment.py            # full budget
    python benchmarks/ood/experiment.py --quick    # the README's demo budget

1. builds the data (`benchmarks/benchdata`, cached) and the base model (`finetune_base.py`, cached): BERT2BERT
   warm-started from all-MiniLM-L6-v2 and fine-tuned on Debian descriptions (long description → synopsis);
2. estimates the empirical prior on the in-domain train split;
3. for each target domain, tunes on that domain's dev split, at the same budget, (a) the six NV knobs,
   (b) a softmax temperature on all attention, (c) WiSE-FT interpolation between the warm-start and the
   fine-tuned weights; and scores the test split: unconverted, NV at equivalence (must be identical),
   tuned NV, temperature, WiSE-FT, with 95% paired bootstrap intervals of ROUGE-L against unconverted.
Results go to OUT (default runs/ood) and a section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import optuna
import torch
import transformers as tf

import nvib
from nvib.data import batches, load_examples
from nvib.evaluate import DevObjective as NVObjective
from nvib.evaluate import Evaluator, GenerationArgs, metric
from nvib.metrics import paired_bootstrap
from nvib.search import best_knobs, run_search

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
import finetune_base  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ("debian", "docstrings", "wikipara", "wiki")
KINDS = {"encoder", "decoder", "cross"}


class OneKnobObjective:
    """Objective of a one-knob baseline: `apply(value)` changes the model, then the dev metric (cached)."""

    def __init__(self, evaluator: Evaluator, examples, apply):
        self.evaluator, self.examples, self.apply, self.cache = evaluator, examples, apply, {}

    def __call__(self, trial: optuna.Trial, name: str, low: float, high: float) -> float:
        value = trial.suggest_float(name, low, high)
        if value not in self.cache:
            self.apply(value)
            outputs = self.evaluator.outputs(self.examples, f"dev {name}={value:.3g}")
            self.cache[value] = metric("rougeL")([o.prediction for o in outputs], [e.target for e in self.examples])
        return self.cache[value]


def tune_one_knob(objective: OneKnobObjective, name, low, high, start, n_trials, storage, study_name):
    study = optuna.create_study(
        study_name=study_name, storage=storage, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3),
    )  # fmt: skip
    if not study.trials:
        study.enqueue_trial({name: start})
    left = n_trials - len([t for t in study.trials if t.state.is_finished()])
    if left > 0:
        study.optimize(lambda t: objective(t, name, low, high), n_trials=left)
    return study.best_params[name], study


def set_temperature(model, temperature: float, original: dict) -> None:
    """Divide every attention score by `temperature` (all attention modules' `scaling`)."""
    for name, module in model.named_modules():
        if name in original:
            module.scaling = original[name] / temperature


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ood")
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "build")
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "models" / "minilm-b2b-debian")
    parser.add_argument("--quick", action="store_true", help="reduced budget (the README demo)")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--dev", type=int, default=64, help="dev examples per domain")
    parser.add_argument("--test", type=int, default=400, help="test examples per domain")
    parser.add_argument("--prior-examples", type=int, default=4000)
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--results",
        type=Path,
        help="markdown file to update (default: benchmarks/RESULTS.md; OUT/RESULTS.md with --quick)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.dev, args.test, args.prior_examples = 10, 32, 150, 1000
    args.results = args.results or (args.out / "RESULTS.md" if args.quick else ROOT / "benchmarks" / "RESULTS.md")
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t_start = time.time()
    if not (args.data / "manifest.json").exists():
        from benchdata import build_all

        build_all(args.data, ROOT / ".cache" / "benchdata")
    finetune_base.main(["--data", str(args.data), "--out", str(args.model)])
    args.out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{args.out / 'studies.db'}"

    tokenizer = tf.AutoTokenizer.from_pretrained(args.model)
    model = tf.EncoderDecoderModel.from_pretrained(args.model, local_files_only=True).eval()
    recipe = json.loads((args.model / "finetune.json").read_text())["recipe"]
    torch.manual_seed(recipe["seed"])  # the fine-tune's starting point, for WiSE-FT
    warm = {k: v.clone() for k, v in finetune_base.build_model(recipe["decoder_layers"]).state_dict().items()}
    tuned = {k: v.clone() for k, v in model.state_dict().items()}
    scalings = {n: m.scaling for n, m in model.named_modules() if hasattr(m, "scaling") and hasattr(m, "key")}
    gen = GenerationArgs(num_beams=1, max_new_tokens=24, batch_size=32)
    evaluator = Evaluator(model, tokenizer, "summarisation", gen, max_source_len=recipe["max_source_len"],
                          max_target_len=recipe["max_target_len"])  # fmt: skip

    prior_path = args.out / f"prior-{args.prior_examples}.safetensors"
    if prior_path.exists():
        prior = nvib.EmpiricalPrior.load(prior_path)
    else:
        train = load_examples(args.data / "debian" / "train.jsonl")[: args.prior_examples]
        data = batches(train, tokenizer, 32, recipe["max_source_len"], recipe["max_target_len"], "seq2seq")
        prior = nvib.EmpiricalPrior.estimate(
            model, data, data=f"debian train[:{len(train)}]", total=len(train) // 32 + 1
        )
        prior.save(prior_path)

    rows, details = {}, {}
    for domain in args.domains:
        dev = load_examples(args.data / domain / "dev.jsonl")[: args.dev]
        test = load_examples(args.data / domain / "test.jsonl")[: args.test]
        refs = [e.target for e in test]

        def score(label: str, store: dict, test=test, domain=domain) -> None:
            outputs = evaluator.outputs(test, f"{domain} test: {label}")
            store[label] = [o.prediction for o in outputs]

        preds: dict[str, list[str]] = {}
        score("unconverted", preds)
        nvib.convert(model, prior=prior)
        score("NV equivalence", preds)
        objective = NVObjective(evaluator, dev, "rougeL")
        study = run_search(
            objective, KINDS, n_trials=args.trials, storage=storage, study_name=f"nv-{domain}-{args.dev}",
            slices=[len(dev) // 2, len(dev)], progress=False,
        )  # fmt: skip
        knobs = best_knobs(study)
        nvib.configure(model, nvib.NVConfig(**knobs))
        with nvib.record_prior_mass(model) as mass:
            score("NV tuned", preds)
        nvib.unload(model)

        temp_obj = OneKnobObjective(evaluator, dev, lambda t: set_temperature(model, t, scalings))
        temperature, _ = tune_one_knob(
            temp_obj, "temperature", 0.5, 2.0, 1.0, args.trials, storage, f"temp-{domain}-{args.dev}"
        )
        set_temperature(model, temperature, scalings)
        score("temperature", preds)
        set_temperature(model, 1.0, scalings)

        def interpolate(w: float) -> None:
            model.load_state_dict({k: (1 - w) * warm[k] + w * tuned[k] if k in warm else tuned[k] for k in tuned})

        wise_obj = OneKnobObjective(evaluator, dev, interpolate)
        w, _ = tune_one_knob(wise_obj, "wise_ft", 0.0, 1.0, 1.0, args.trials, storage, f"wise-{domain}-{args.dev}")
        interpolate(w)
        score("WiSE-FT", preds)
        model.load_state_dict(tuned)

        rouge_l = metric("rougeL")
        rows[domain] = {}
        for label, p in preds.items():
            entry = {"rougeL": rouge_l(p, refs)}
            if label != "unconverted":
                b = paired_bootstrap(rouge_l, preds["unconverted"], p, refs, n=1000)
                entry["delta"], entry["ci"] = b.delta, (b.ci_low, b.ci_high)
            rows[domain][label] = entry
        details[domain] = {
            "nv_knobs": knobs, "temperature": temperature, "wise_ft": w, "prior_mass": mass,
            "identical_at_equivalence": preds["NV equivalence"] == preds["unconverted"],
            "n_dev": len(dev), "n_test": len(test),
        }  # fmt: skip
        (args.out / "predictions").mkdir(exist_ok=True)
        (args.out / "predictions" / f"{domain}.json").write_text(json.dumps({"refs": refs, **preds}))
        print(domain, json.dumps(rows[domain]), json.dumps(details[domain]), flush=True)

    elapsed = time.time() - t_start
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "details": details, "seconds": elapsed}, indent=2))
    table = render(rows, details, args, elapsed)
    print(table)
    print(f"results: {args.out / 'results.json'}, predictions: {args.out / 'predictions'}, table: {args.results}")
    from attention_speed import update_section  # benchmarks/attention_speed.py

    update_section(args.results, "ood", table)


def score_cell(entry: dict) -> str:
    """ROUGE-L, and its difference to unconverted with the bootstrap interval when there is one."""
    cell = f"{entry['rougeL']:.2f}"
    if "delta" in entry:
        cell += f" (Δ {entry['delta']:+.2f} [{entry['ci'][0]:+.2f}, {entry['ci'][1]:+.2f}])"
    return cell


def render(rows, details, args, elapsed) -> str:
    labels = ["unconverted", "NV equivalence", "NV tuned", "temperature", "WiSE-FT"]
    lines = [
        "## ood",
        "",
        f"Out-of-domain benchmark (`python benchmarks/ood/experiment.py{' --quick' if args.quick else ''}`): "
        f"ROUGE-L F1 ×100 on {args.test} test examples per domain, knobs tuned on {args.dev} dev examples of the "
        f"same domain with {args.trials} trials each; Δ = difference to unconverted with its 95% paired bootstrap "
        f"interval. Wall time {elapsed / 60:.1f} min on this machine.",
        "",
        "| domain | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for domain, row in rows.items():
        lines.append(f"| {domain} | " + " | ".join(score_cell(row[label]) for label in labels) + " |")
    lines += [
        "",
        "| domain | identical at equivalence | tuned NV knobs | prior mass (tuned) | temperature | WiSE-FT w |",
        "|---|---|---|---|---|---|",
    ]
    for domain, d in details.items():
        knobs = ", ".join(
            f"{k.replace('alpha_tau_', 'α').replace('stdev_tau_', 'σ')}={v:.2f}" for k, v in d["nv_knobs"].items()
        )
        mass = ", ".join(f"{k}={v:.3f}" for k, v in d["prior_mass"].items())
        lines.append(
            f"| {domain} | {d['identical_at_equivalence']} | {knobs} | {mass} | "
            f"{d['temperature']:.2f} | {d['wise_ft']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
