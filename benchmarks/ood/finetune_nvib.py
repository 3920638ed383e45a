"""Fine-tuning with and without the NVIB regularisers (issues 5 and 13), on the OOD benchmark, over seeds.

    python benchmarks/ood/finetune_nvib.py [--steps 600] [--lambdas 0 1e-3] [--seeds 0 1 2] [--kl-clip separate]
                                           [--variances shared per-token] [--stdev-taus 0] [--test 400]
    python benchmarks/ood/finetune_nvib.py --from-base --steps 100 --lambdas 0 0.01 0.1 --select-lambda
    (the second line is issue 13's run)

Each run starts from the same warm start as `finetune_base.py` (BERT2BERT from all-MiniLM-L6-v2; the new
cross-attention weights drawn with the run's seed), converted to NV form with the empirical prior of the warm
start on in-domain data (identity initialisation; with the initial τ_σ = 0, step 0 is the warm-start model),
and trains with the same recipe and data order as the base model through `nvib.workflow.train` (NV attention samples
during training, docs/method.md §8; the seed also drives the samples and dropout). Runs differ in λ_G = λ_D, the seed,
the gradient clipping (`kl_clip`), the initial τ_σ, and whether the layers learn a variance per token (W_σ;
evaluated by the general form of docs/method.md §4) or keep one shared variance per site (the fast form). Each
fine-tuned NV model is scored on the test splits like `experiment.py` (ROUGE-L of greedy outputs) and by the
teacher-forced NLL per target token; the scores are kept next to the model, and the results table lists every
setting with the mean and spread (min–max) over its seeds.

With `--from-base` the runs start instead from the cached base model of `finetune_base.py` (already fine-tuned
in domain) and continue for `--steps` (default 200) on the next unseen training pairs: the regularisers applied
where a user has a fine-tuned model and some budget. With `--select-lambda` every λ runs on the first seed, one
λ > 0 is chosen on dev NLL (`choose_lambda`, the test splits unseen), and only λ = 0 and that λ run on the other
seeds.
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
import nvib.core.kl
from nvib.workflow.data import batches, load_examples
from nvib.workflow.evaluate import Evaluator, GenerationArgs, metric
from nvib.workflow.train import RUN_LOG, LambdaSchedule, finetune

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
import finetune_base  # noqa: E402
from attention_speed import update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCORES = "ood_scores.json"  # per fine-tuned model directory: its test scores (the table reads them all)
SETTING = ("start", "variance", "stdev_tau", "nv_lr", "kl_clip", "kl_terms", "lambda")  # a row: all but the seed
KL_TERMS = {"both": "G+D", "gaussian": "G"}  # --kl-terms: λ weighs KL_G and KL_D, or KL_G only (λ_D = 0)
DEV_EXAMPLES = 200  # dev examples per domain for choosing λ (wiki has 29)
IN_DOMAIN_SLACK = 0.02  # nats/token of in-domain dev NLL a chosen λ may lose against λ = 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "build")
    parser.add_argument("--models", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument(
        "--from-base", action="store_true",
        help="continue from the cached base model of finetune_base.py on the next unseen training examples",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's, or 200 with --from-base)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--select-lambda", action="store_true",
        help="run every λ on the first seed only, choose one λ > 0 on dev NLL (see choose_lambda), and run λ = 0 "
        "and that λ on the other seeds",
    )  # fmt: skip
    parser.add_argument("--kl-clip", choices=["separate", "joint"], default="separate")
    parser.add_argument(
        "--kl-terms", choices=list(KL_TERMS), default="both",
        help="which KL terms λ weighs: both (λ_G = λ_D = λ) or gaussian only (λ_D = 0, a diagnostic)",
    )  # fmt: skip
    parser.add_argument("--variances", nargs="+", choices=["shared", "per-token"], default=["shared"])
    parser.add_argument("--stdev-taus", type=float, nargs="+", default=[0.0], help="initial τ_σ, every kind")
    parser.add_argument("--nv-lr", type=float, help="learning rate of the NV parameters (default: the recipe's)")
    parser.add_argument("--prior-examples", type=int, default=1000)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--domains", nargs="+", default=["debian", "docstrings", "wikipara", "wiki"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    if args.select_lambda and (0.0 not in args.lambdas or len(args.lambdas) < 2):
        parser.error("--select-lambda needs λ = 0 and at least one λ > 0 in --lambdas")
    torch.set_num_threads(args.threads)
    base = finetune_base.RECIPE
    args.steps = args.steps or (200 if args.from_base else base["steps"])
    recipe = {**base, "steps": args.steps}
    tokenizer = tf.AutoTokenizer.from_pretrained(finetune_base.MINILM)
    train = load_examples(args.data / "debian" / "train.jsonl")
    random.Random(base["seed"]).shuffle(train)  # the base model's data order
    first = base["steps"] * base["batch_size"] if args.from_base else 0  # continue on unseen examples
    train = train[first : first + args.steps * base["batch_size"]]
    settings = [(v, st) for v in args.variances for st in args.stdev_taus]
    seeds, lambdas = args.seeds, args.lambdas
    if args.select_lambda:
        seeds, rest = args.seeds[:1], args.seeds[1:]
    results = {
        (v, st, lam, seed): run_one(args, recipe, tokenizer, train, v, st, lam, seed)
        for v, st in settings for lam in lambdas for seed in seeds
    }  # fmt: skip
    if args.select_lambda:
        for v, st in settings:
            chosen = choose_lambda({lam: results[v, st, lam, seeds[0]]["dev_nll"] for lam in lambdas})
            print(f"chosen λ for {v} τ_σ={st:g}: {chosen}", flush=True)
            for lam in (0.0, chosen):
                for seed in rest:
                    run_one(args, recipe, tokenizer, train, v, st, lam, seed)
    write_table(args, recipe)


def start_label(args: argparse.Namespace) -> str:
    """Where the runs start: "base1200" (the cached base model, --from-base) or "warm" (the warm start)."""
    return f"base{finetune_base.RECIPE['steps']}" if args.from_base else "warm"


def setting(result: dict) -> tuple:
    """A scored run's table row key: its SETTING values."""
    return tuple(result["run"].get(k) or 0 for k in SETTING)


def choose_lambda(dev_nll: dict[float, dict[str, float]]) -> float:
    """The λ > 0 of lowest mean out-of-domain dev NLL among those whose in-domain (debian) dev NLL is at most
    IN_DOMAIN_SLACK above λ = 0's; the smallest λ > 0 when none is."""
    keep = [lam for lam in dev_nll if lam > 0 and dev_nll[lam]["debian"] <= dev_nll[0.0]["debian"] + IN_DOMAIN_SLACK]
    if not keep:
        return min(lam for lam in dev_nll if lam > 0)
    ood = {lam: statistics.mean(v for d, v in dev_nll[lam].items() if d != "debian") for lam in keep}
    return min(ood, key=ood.get)


def run_one(args, recipe: dict, tokenizer, train: list, variance: str, stdev_tau: float, lam: float, seed: int) -> dict:
    """Fine-tune one setting and seed (unless its model is cached), score it on dev (NLL) and test; its scores."""
    start = start_label(args)
    kl_terms = args.kl_terms if lam else "both"  # λ = 0 is the same run either way
    name = f"nvib-l{lam:g}-s{args.steps}-{args.kl_clip}" + ("-ptv" if variance == "per-token" else "")
    name += "-klG" if kl_terms == "gaussian" else ""
    name += (f"-st{stdev_tau:g}" if stdev_tau else "") + (f"-nvlr{args.nv_lr:g}" if args.nv_lr else "")
    name = (f"{start}-" if args.from_base else "") + name
    out = args.models / f"{name}-p{args.prior_examples}-seed{seed}"
    if not (out / "nv_config.json").exists():
        torch.manual_seed(seed)
        if args.from_base:
            path = finetune_base.default_out(ROOT)
            if not (path / "config.json").exists():
                raise SystemExit(f"no base model at {path}. Fix: run benchmarks/ood/finetune_base.py first")
            model = tf.EncoderDecoderModel.from_pretrained(path, local_files_only=True).eval()
        else:
            model = finetune_base.build_model(recipe["decoder_layers"]).eval()
        prior = base_prior(model, tokenizer, train[: args.prior_examples], recipe, args)
        knobs = nvib.NVConfig(stdev_tau_e=stdev_tau, stdev_tau_c=stdev_tau, stdev_tau_d=stdev_tau)
        finetune(
            model, train, tokenizer, output_dir=out, nv_config=knobs, prior=prior, lambda_g=lam,
            lambda_d=lam if kl_terms == "both" else 0.0,
            schedule=LambdaSchedule("linear", steps=max(1, recipe["steps"] // 5)), max_steps=recipe["steps"],
            batch_size=recipe["batch_size"], lr=recipe["lr"], warmup_steps=recipe["warmup"], weight_decay=0.01,
            seed=seed, max_source_len=recipe["max_source_len"], max_target_len=recipe["max_target_len"],
            logging_steps=min(25, recipe["steps"]), save_steps=100, per_token_variance=variance == "per-token",
            nv_lr=args.nv_lr, kl_clip=args.kl_clip,
        )  # fmt: skip
    scores_file = out / SCORES
    if scores_file.exists():
        result = json.loads(scores_file.read_text())
        if result["test"] == args.test and "dev_nll" in result:
            return result
    log = json.loads((out / RUN_LOG).read_text())
    result = {
        "run": {
            "start": start, "variance": variance, "stdev_tau": stdev_tau, "lambda": lam, "steps": args.steps,
            "nv_lr": args.nv_lr, "kl_clip": args.kl_clip, "kl_terms": kl_terms, "seed": seed,
            "prior_examples": args.prior_examples, "kl_floor": nvib.core.kl.PRIOR_VARIANCE_FLOOR,
        },
        "test": args.test,
        "train_runtime": next(e["train_runtime"] for e in reversed(log) if "train_runtime" in e),
        "final_task_loss": next((e["task_loss"] for e in reversed(log) if "task_loss" in e), float("nan")),
        "scores": {},
        "dev_nll": {},
    }  # fmt: skip
    model = nvib.load(out)
    evaluator = Evaluator(model, tokenizer, "summarisation", GenerationArgs(num_beams=1, max_new_tokens=24,
                          batch_size=32), max_source_len=recipe["max_source_len"],
                          max_target_len=recipe["max_target_len"])  # fmt: skip
    t0 = time.time()
    for domain in args.domains:
        dev = load_examples(args.data / domain / "dev.jsonl")[:DEV_EXAMPLES]
        dev_outputs = evaluator.outputs(dev, f"{domain} dev {out.name}", generate=False)
        result["dev_nll"][domain] = metric("nll")(evaluator.metric_inputs(dev_outputs, "nll"), [])
        test = load_examples(args.data / domain / "test.jsonl")[: args.test]
        outputs = evaluator.outputs(test, f"{domain} {out.name}")  # greedy outputs and the references' NLL
        refs = [e.target for e in test]
        result["scores"][domain] = {n: metric(n)(evaluator.metric_inputs(outputs, n), refs) for n in ("rougeL", "nll")}
        print(out.name, domain, result["scores"][domain], "dev NLL", result["dev_nll"][domain], flush=True)
    result["eval_seconds"] = time.time() - t0
    scores_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def base_prior(model, tokenizer, examples: list, recipe: dict, args) -> nvib.EmpiricalPrior:
    """The empirical prior of `model` on `examples`; with --from-base estimated once and kept under --models
    (every run starts from the same base model), from the warm start per run (its new weights differ by seed)."""
    path = args.models / f"prior-{start_label(args)}-p{len(examples)}.safetensors"
    if args.from_base and path.exists():
        return nvib.EmpiricalPrior.load(path)
    data = batches(examples, tokenizer, 32, recipe["max_source_len"], recipe["max_target_len"], "seq2seq")
    prior = nvib.EmpiricalPrior.estimate(model, data, data=f"{len(examples)} debian training pairs")
    if args.from_base:
        prior.save(path)
    return prior


def write_table(args: argparse.Namespace, recipe: dict) -> None:
    """The `finetune` section of RESULTS.md (`finetune from base` with --from-base) from every scored run under
    --models of the same start, steps, test size and prior (earlier invocations too)."""
    start = start_label(args)
    results = [json.loads(f.read_text()) for f in args.models.glob(f"*/{SCORES}")]
    results = [
        r
        for r in results
        if r["run"]["steps"] == args.steps and r["test"] == args.test and "kl_clip" in r["run"]
        and r["run"].get("prior_examples") == args.prior_examples and r["run"].get("start", "warm") == start
    ]  # fmt: skip
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        r["run"].setdefault("kl_terms", "both")  # runs scored before --kl-terms weighed both terms
        groups.setdefault(setting(r), []).append(r)
    if args.from_base:
        begin = (
            f"continued fine-tuning of the {start[4:]}-step base model of the `ood` section for {recipe['steps']} "
            f"more steps on the next {recipe['steps'] * recipe['batch_size']} unseen Debian training pairs (batch "
            f"{recipe['batch_size']}, lr {recipe['lr']}, {recipe['warmup']} warm-up steps, linear decay)"
        )
    else:
        begin = (
            f"the base model's recipe from its warm start ({recipe['steps']} steps, batch {recipe['batch_size']}, "
            f"lr {recipe['lr']})"
        )
    lines = [
        "## finetune" + (" from base" if args.from_base else ""),
        "",
        f"Fine-tuning with the NVIB regularisers (`python benchmarks/ood/finetune_nvib.py "
        f"{'--from-base ' if args.from_base else ''}--steps {args.steps} --test {args.test} --prior-examples "
        f"{args.prior_examples}`): {begin} through `nvib.workflow.train` (NV attention sampling, "
        "docs/method.md §8, KL_G with the prior-variance floor) with λ_G = λ_D = λ (KL: G+D) or λ_G = λ, λ_D = 0 (KL: "
        "G) (linear warm-up over the first fifth), "
        "from the identity initialisation with the empirical prior (estimated on the first "
        f"{args.prior_examples} training pairs) and the initial τ_σ shown (τ_α = 10); clip: `kl_clip` (task "
        "and KL gradients clipped to 1.0 separately, or their sum jointly); variance: one per site (fast form at "
        "evaluation) or per token (W_σ, general form). Each row: mean over the seeds (the seed drives sampling, "
        "dropout, the data order and, from the warm start, the new cross-attention weights) with the spread "
        "min–max in brackets; ROUGE-L ×100 of greedy outputs and "
        f"NLL (nats per target token, teacher-forced) on the first {args.test} test examples of each domain "
        "(debian is in domain). Train: minutes per run.",
        "",
        "| variance | τ_σ | clip | KL | λ | seeds | "
        + " | ".join(f"{d} ROUGE-L | {d} NLL" for d in args.domains)
        + " | final task loss | train |",
        "|---" * (2 * len(args.domains) + 8) + "|",
    ]
    for key in sorted(groups):
        rows = groups[key]
        run = rows[0]["run"]
        cells = []
        for domain in args.domains:
            for name, digits in (("rougeL", 2), ("nll", 3)):
                values = [r["scores"][domain][name] for r in rows if domain in r["scores"]]
                cells.append(spread(values, digits))
        lines.append(
            f"| {run['variance']} | {run['stdev_tau']:g} | {run['kl_clip']} | {KL_TERMS[run['kl_terms']]} "
            f"| {run['lambda']:g} | "
            f"{','.join(str(r['run']['seed']) for r in sorted(rows, key=lambda r: r['run']['seed']))} | "
            f"{' | '.join(cells)} | {spread([r['final_task_loss'] for r in rows], 3)} | "
            f"{statistics.mean(r['train_runtime'] for r in rows) / 60:.1f} |"
        )
    chosen = [r for r in results if r["run"]["seed"] == min(args.seeds) and "dev_nll" in r]
    if chosen:
        lines += [
            "",
            f"Dev NLL (first {DEV_EXAMPLES} dev pairs per domain; wiki has 29) of seed {min(args.seeds)}, which "
            f"`--select-lambda` reads: the λ > 0 of lowest mean out-of-domain dev NLL among those within "
            f"{IN_DOMAIN_SLACK} nats/token of λ = 0 in domain.",
            "",
            "| variance | τ_σ | KL | λ | " + " | ".join(args.domains) + " |",
            "|---" * (len(args.domains) + 4) + "|",
        ]
        for r in sorted(chosen, key=setting):
            run = r["run"]
            dev = " | ".join(f"{r['dev_nll'][d]:.3f}" if d in r["dev_nll"] else "" for d in args.domains)
            lines.append(
                f"| {run['variance']} | {run['stdev_tau']:g} | {KL_TERMS[run['kl_terms']]} | {run['lambda']:g} "
                f"| {dev} |"
            )
    name = "finetune from base" if args.from_base else "finetune"
    update_section(args.results, name, "\n".join(lines) + "\n")


def spread(values: list[float], digits: int) -> str:
    """mean [min, max]."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


if __name__ == "__main__":
    main()
