"""Fine-tuning with and without the NVIB regularisers (issue 5), on the OOD benchmark.

    python benchmarks/ood/finetune_nvib.py [--steps 600] [--lambdas 0 1e-3] [--variances shared per-token]
                                           [--stdev-taus 0]

Each run starts from the same warm start as `finetune_base.py` (BERT2BERT from all-MiniLM-L6-v2, seed 0),
converted to NV form with the empirical prior of the warm start on in-domain data (identity
initialisation; with the initial τ_σ = 0, step 0 is the warm-start model), and trains with the same recipe
and data order as the base model through `nvib.finetune` (NV attention samples during training, spec §8).
Runs differ in λ_G = λ_D, the initial τ_σ, and whether the layers learn a variance per token (W_σ;
evaluated by the general form of spec §4) or keep one shared variance per site (the fast form). Each
fine-tuned NV model is scored on the test splits like `experiment.py`, as it is (its trained knobs); the
scores are kept next to the model and the results table lists every scored run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import transformers as tf

import nvib
from nvib.data import batches, load_examples
from nvib.evaluate import Evaluator, GenerationArgs, metric
from nvib.finetune import RUN_LOG, LambdaSchedule, finetune
from nvib.metrics import paired_bootstrap

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
import finetune_base  # noqa: E402
from attention_speed import update_section  # noqa: E402
from experiment import score_cell  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCORES = "ood_scores.json"  # per fine-tuned model directory: its test scores (the table reads them all)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "build")
    parser.add_argument("--models", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--steps", type=int, default=finetune_base.RECIPE["steps"])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1e-3])
    parser.add_argument("--variances", nargs="+", choices=["shared", "per-token"], default=["shared", "per-token"])
    parser.add_argument("--stdev-taus", type=float, nargs="+", default=[0.0], help="initial τ_σ, every kind")
    parser.add_argument("--nv-lr", type=float, help="learning rate of the NV parameters (default: the recipe's)")
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--domains", nargs="+", default=["debian", "docstrings", "wikipara", "wiki"])
    parser.add_argument("--baseline", type=Path, default=ROOT / "runs" / "ood" / "predictions")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    recipe = {**finetune_base.RECIPE, "steps": args.steps}
    tokenizer = tf.AutoTokenizer.from_pretrained(finetune_base.MINILM)
    train = load_examples(args.data / "debian" / "train.jsonl")
    random.Random(recipe["seed"]).shuffle(train)
    train = train[: recipe["steps"] * recipe["batch_size"]]
    for variance, stdev_tau, lam in [
        (v, st, lam) for v in args.variances for st in args.stdev_taus for lam in args.lambdas
    ]:
        name = f"nvib-l{lam:g}-s{args.steps}" + ("-ptv" if variance == "per-token" else "")
        out = args.models / (
            name + (f"-st{stdev_tau:g}" if stdev_tau else "") + (f"-nvlr{args.nv_lr:g}" if args.nv_lr else "")
        )
        if not (out / "nv_config.json").exists():
            torch.manual_seed(recipe["seed"])
            model = finetune_base.build_model(recipe["decoder_layers"]).eval()
            prior_data = batches(
                train[:1000], tokenizer, 32, recipe["max_source_len"], recipe["max_target_len"], "seq2seq"
            )
            prior = nvib.EmpiricalPrior.estimate(model, prior_data, data="debian train[:1000] (shuffled)")
            knobs = nvib.NVConfig(stdev_tau_e=stdev_tau, stdev_tau_c=stdev_tau, stdev_tau_d=stdev_tau)
            finetune(
                model, train, tokenizer, output_dir=out, nv_config=knobs, prior=prior, lambda_g=lam, lambda_d=lam,
                schedule=LambdaSchedule("linear", steps=recipe["steps"] // 5), max_steps=recipe["steps"],
                batch_size=recipe["batch_size"], lr=recipe["lr"], warmup_steps=recipe["warmup"], weight_decay=0.01,
                seed=recipe["seed"], max_source_len=recipe["max_source_len"],
                max_target_len=recipe["max_target_len"], logging_steps=25, save_steps=100,
                per_token_variance=variance == "per-token", nv_lr=args.nv_lr,
            )  # fmt: skip
        scores_file = out / SCORES
        if scores_file.exists() and json.loads(scores_file.read_text())["test"] == args.test:
            continue
        log = json.loads((out / RUN_LOG).read_text())
        result = {
            "run": {
                "variance": variance,
                "stdev_tau": stdev_tau,
                "lambda": lam,
                "steps": args.steps,
                "nv_lr": args.nv_lr,
            },
            "test": args.test,
            "train_runtime": next(e["train_runtime"] for e in reversed(log) if "train_runtime" in e),
            "scores": {},
        }
        model = nvib.load(out)
        evaluator = Evaluator(model, tokenizer, "summarisation", GenerationArgs(num_beams=1, max_new_tokens=24,
                              batch_size=32), max_source_len=recipe["max_source_len"],
                              max_target_len=recipe["max_target_len"])  # fmt: skip
        t0 = time.time()
        for domain in args.domains:
            test = load_examples(args.data / domain / "test.jsonl")[: args.test]
            refs = [e.target for e in test]
            preds = [o.prediction for o in evaluator.outputs(test, f"{domain} {out.name}", score=False)]
            entry = {"rougeL": metric("rougeL")(preds, refs)}
            base_file = args.baseline / f"{domain}.json"
            if base_file.exists():  # the post-training benchmark's predictions on the same examples
                base = json.loads(base_file.read_text())
                if base["refs"] == refs:
                    b = paired_bootstrap(metric("rougeL"), base["unconverted"], preds, refs, n=1000)
                    entry["delta"], entry["ci"] = b.delta, (b.ci_low, b.ci_high)
            result["scores"][domain] = entry
            print(out.name, domain, entry, flush=True)
        result["eval_seconds"] = time.time() - t0
        scores_file.write_text(json.dumps(result, indent=2) + "\n")
    write_table(args, recipe)


def write_table(args: argparse.Namespace, recipe: dict) -> None:
    """The `finetune` section of RESULTS.md from every scored run under --models (earlier invocations too)."""
    results = [json.loads(f.read_text()) for f in args.models.glob(f"*/{SCORES}")]
    results = [r for r in results if r["run"]["steps"] == args.steps and r["test"] == args.test]
    results.sort(
        key=lambda r: (
            r["run"].get("nv_lr") or 0,
            r["run"]["variance"] != "shared",
            r["run"]["stdev_tau"],
            r["run"]["lambda"],
        )
    )
    lines = [
        "## finetune",
        "",
        f"Fine-tuning with the NVIB regularisers (`python benchmarks/ood/finetune_nvib.py --steps {args.steps}`):"
        f" the base model's recipe ({recipe['steps']} steps, batch {recipe['batch_size']}, lr {recipe['lr']}) "
        "through `nvib.finetune` (NV attention sampling, spec §8) with λ_G = λ_D = λ (linear warm-up over the "
        "first fifth), from the identity initialisation with the empirical prior and the initial τ_σ shown "
        "(τ_α = 10); variance: one per site (fast form at evaluation) or per token (W_σ, general form); NV lr: "
        "peak learning rate of the NV layers' parameters. "
        f"ROUGE-L ×100 on {args.test} test examples; Δ against the unconverted base model of the `ood` section "
        "(plain fine-tune, same data and steps), 95% paired bootstrap. Train: training minutes; eval: seconds "
        f"to score all {len(args.domains)} domains.",
        "",
        "| variance | τ_σ | NV lr | λ | " + " | ".join(args.domains) + " | train | eval |",
        "|---" * (len(args.domains) + 6) + "|",
    ]
    for r in results:
        run = r["run"]
        cells = " | ".join(score_cell(r["scores"][d]) if d in r["scores"] else "" for d in args.domains)
        lines.append(
            f"| {run['variance']} | {run['stdev_tau']:g} | {run.get('nv_lr') or recipe['lr']:g} | "
            f"{run['lambda']:g} | {cells} | "
            f"{r['train_runtime'] / 60:.1f} | {r.get('eval_seconds', float('nan')):.0f} |"
        )
    update_section(args.results, "finetune", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
