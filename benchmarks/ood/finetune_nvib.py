"""Fine-tuning with and without the NVIB regularisers (issues 5 and 13), on the OOD benchmark, over seeds.

    python benchmarks/ood/finetune_nvib.py [--steps 600] [--lambdas 0 1e-3] [--seeds 0 1 2] [--kl-clip separate]
                                           [--variances shared per-token] [--stdev-taus 0] [--test 400]

Each run starts from the same warm start as `finetune_base.py` (BERT2BERT from all-MiniLM-L6-v2; the new
cross-attention weights drawn with the run's seed), converted to NV form with the empirical prior of the warm
start on in-domain data (identity initialisation; with the initial τ_σ = 0, step 0 is the warm-start model),
and trains with the same recipe and data order as the base model through `nvib.finetune` (NV attention samples
during training, spec §8; the seed also drives the samples and dropout). Runs differ in λ_G = λ_D, the seed,
the gradient clipping (`kl_clip`), the initial τ_σ, and whether the layers learn a variance per token (W_σ;
evaluated by the general form of spec §4) or keep one shared variance per site (the fast form). Each
fine-tuned NV model is scored on the test splits like `experiment.py` (ROUGE-L of greedy outputs) and by the
teacher-forced NLL per target token; the scores are kept next to the model, and the results table lists every
setting with the mean and spread (min–max) over its seeds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers as tf

import nvib
import nvib.kl
from nvib.data import batches, load_examples
from nvib.evaluate import Evaluator, GenerationArgs, metric
from nvib.finetune import RUN_LOG, LambdaSchedule, finetune

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
import finetune_base  # noqa: E402
from attention_speed import update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCORES = "ood_scores.json"  # per fine-tuned model directory: its test scores (the table reads them all)
SETTING = ("variance", "stdev_tau", "nv_lr", "kl_clip", "lambda")  # a table row: everything but the seed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "build")
    parser.add_argument("--models", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--steps", type=int, default=finetune_base.RECIPE["steps"])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kl-clip", choices=["separate", "joint"], default="separate")
    parser.add_argument("--variances", nargs="+", choices=["shared", "per-token"], default=["shared"])
    parser.add_argument("--stdev-taus", type=float, nargs="+", default=[0.0], help="initial τ_σ, every kind")
    parser.add_argument("--nv-lr", type=float, help="learning rate of the NV parameters (default: the recipe's)")
    parser.add_argument("--prior-examples", type=int, default=1000)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--domains", nargs="+", default=["debian", "docstrings", "wikipara", "wiki"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = {**finetune_base.RECIPE, "steps": args.steps}
    tokenizer = tf.AutoTokenizer.from_pretrained(finetune_base.MINILM)
    train = load_examples(args.data / "debian" / "train.jsonl")
    random.Random(recipe["seed"]).shuffle(train)
    train = train[: recipe["steps"] * recipe["batch_size"]]
    runs = [
        (v, st, lam, seed)
        for v in args.variances
        for st in args.stdev_taus
        for lam in args.lambdas
        for seed in args.seeds
    ]
    for variance, stdev_tau, lam, seed in runs:
        name = f"nvib-l{lam:g}-s{args.steps}-{args.kl_clip}" + ("-ptv" if variance == "per-token" else "")
        name += (f"-st{stdev_tau:g}" if stdev_tau else "") + (f"-nvlr{args.nv_lr:g}" if args.nv_lr else "")
        out = args.models / f"{name}-p{args.prior_examples}-seed{seed}"
        if not (out / "nv_config.json").exists():
            torch.manual_seed(seed)
            model = finetune_base.build_model(recipe["decoder_layers"]).eval()
            prior_data = batches(
                train[: args.prior_examples], tokenizer, 32, recipe["max_source_len"], recipe["max_target_len"],
                "seq2seq",
            )  # fmt: skip
            prior = nvib.EmpiricalPrior.estimate(model, prior_data, data=f"debian train[:{args.prior_examples}]")
            knobs = nvib.NVConfig(stdev_tau_e=stdev_tau, stdev_tau_c=stdev_tau, stdev_tau_d=stdev_tau)
            finetune(
                model, train, tokenizer, output_dir=out, nv_config=knobs, prior=prior, lambda_g=lam, lambda_d=lam,
                schedule=LambdaSchedule("linear", steps=max(1, recipe["steps"] // 5)), max_steps=recipe["steps"],
                batch_size=recipe["batch_size"], lr=recipe["lr"], warmup_steps=recipe["warmup"], weight_decay=0.01,
                seed=seed, max_source_len=recipe["max_source_len"], max_target_len=recipe["max_target_len"],
                logging_steps=min(25, recipe["steps"]), save_steps=100, per_token_variance=variance == "per-token",
                nv_lr=args.nv_lr, kl_clip=args.kl_clip,
            )  # fmt: skip
        scores_file = out / SCORES
        if scores_file.exists() and json.loads(scores_file.read_text())["test"] == args.test:
            continue
        log = json.loads((out / RUN_LOG).read_text())
        result = {
            "run": {
                "variance": variance, "stdev_tau": stdev_tau, "lambda": lam, "steps": args.steps,
                "nv_lr": args.nv_lr, "kl_clip": args.kl_clip, "seed": seed, "prior_examples": args.prior_examples,
                "kl_floor": nvib.kl.PRIOR_VARIANCE_FLOOR,
            },
            "test": args.test,
            "train_runtime": next(e["train_runtime"] for e in reversed(log) if "train_runtime" in e),
            "final_task_loss": next((e["task_loss"] for e in reversed(log) if "task_loss" in e), float("nan")),
            "scores": {},
        }  # fmt: skip
        model = nvib.load(out)
        evaluator = Evaluator(model, tokenizer, "summarisation", GenerationArgs(num_beams=1, max_new_tokens=24,
                              batch_size=32), max_source_len=recipe["max_source_len"],
                              max_target_len=recipe["max_target_len"])  # fmt: skip
        t0 = time.time()
        for domain in args.domains:
            test = load_examples(args.data / domain / "test.jsonl")[: args.test]
            refs = [e.target for e in test]
            outputs = evaluator.outputs(test, f"{domain} {out.name}")  # greedy outputs and the references' NLL
            nll = sum(o.nll for o in outputs) / sum(o.nll_tokens for o in outputs)
            entry = {"rougeL": metric("rougeL")([o.prediction for o in outputs], refs), "nll": nll}
            result["scores"][domain] = entry
            print(out.name, domain, entry, flush=True)
        result["eval_seconds"] = time.time() - t0
        scores_file.write_text(json.dumps(result, indent=2) + "\n")
    write_table(args, recipe)


def write_table(args: argparse.Namespace, recipe: dict) -> None:
    """The `finetune` section of RESULTS.md from every scored run under --models (earlier invocations too)."""
    results = [json.loads(f.read_text()) for f in args.models.glob(f"*/{SCORES}")]
    results = [
        r
        for r in results
        if r["run"]["steps"] == args.steps and r["test"] == args.test and "kl_clip" in r["run"]
        and r["run"].get("prior_examples") == args.prior_examples
    ]  # fmt: skip
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r["run"].get(k) or 0 for k in SETTING), []).append(r)
    lines = [
        "## finetune",
        "",
        f"Fine-tuning with the NVIB regularisers (`python benchmarks/ood/finetune_nvib.py --steps {args.steps} "
        f"--test {args.test} --prior-examples {args.prior_examples}`): the base model's recipe ({recipe['steps']} "
        f"steps, batch {recipe['batch_size']}, lr {recipe['lr']}) through `nvib.finetune` (NV attention sampling, "
        "spec §8, KL_G with the prior-variance floor) with λ_G = λ_D = λ (linear warm-up over the first fifth), "
        "from the identity initialisation with the empirical prior (estimated on the first "
        f"{args.prior_examples} training examples) and the initial τ_σ shown (τ_α = 10); clip: `kl_clip` (task "
        "and KL gradients clipped to 1.0 separately, or their sum jointly); variance: one per site (fast form at "
        "evaluation) or per token (W_σ, general form). Each row: mean over the seeds (the warm start's new "
        "weights, sampling, dropout) with the spread min–max in brackets; ROUGE-L ×100 of greedy outputs and "
        f"NLL (nats per target token, teacher-forced) on the first {args.test} test examples of each domain "
        "(debian is in domain). Train: minutes per run.",
        "",
        "| variance | τ_σ | clip | λ | seeds | "
        + " | ".join(f"{d} ROUGE-L | {d} NLL" for d in args.domains)
        + " | final task loss | train |",
        "|---" * (2 * len(args.domains) + 7) + "|",
    ]
    for key in sorted(groups):
        rows = groups[key]
        run = rows[0]["run"]
        cells = []
        for domain in args.domains:
            for name, scale, digits in (("rougeL", 100, 2), ("nll", 1, 3)):
                values = [r["scores"][domain][name] * scale for r in rows if domain in r["scores"]]
                cells.append(spread(values, digits))
        lines.append(
            f"| {run['variance']} | {run['stdev_tau']:g} | {run['kl_clip']} | {run['lambda']:g} | "
            f"{','.join(str(r['run']['seed']) for r in sorted(rows, key=lambda r: r['run']['seed']))} | "
            f"{' | '.join(cells)} | {spread([r['final_task_loss'] for r in rows], 3)} | "
            f"{statistics.mean(r['train_runtime'] for r in rows) / 60:.1f} |"
        )
    update_section(args.results, "finetune", "\n".join(lines) + "\n")


def spread(values: list[float], digits: int) -> str:
    """mean [min, max]."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


if __name__ == "__main__":
    main()
