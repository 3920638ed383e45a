"""Issue 40's pre-registered comparison (benchmarks/RESULTS.md, "protocol: finetune regularisers (issue 40)"): continued
fine-tuning of the base model with KL_G only against plain fine-tuning, L2-SP, feature-mean matching and the attention
temperature tuned post hoc, every system through the product's trainer (`nvib.workflow.train.finetune`).

    python benchmarks/ood/finetune_regularisers.py --stage select   # seed 0, every grid value: dev NLL, the choice
    python benchmarks/ood/finetune_regularisers.py --stage test     # seeds 3-7 at the chosen values, test + T
    python benchmarks/ood/finetune_regularisers.py --stage test --seeds 3 5 --threads 1 &   # or the test stage
    python benchmarks/ood/finetune_regularisers.py --stage test --seeds 4 6 --threads 1     # shared by 2 processes
    ... --stage test --seeds 7 --systems plain kl_g --threads 1     # (and l2sp feature_mean in the other)
    python benchmarks/ood/finetune_regularisers.py --stage table    # intervals, the table and the verdict
    python benchmarks/ood/finetune_regularisers.py                  # all three
    python benchmarks/ood/finetune_regularisers.py --score pairs.jsonl   # every saved final model on a JSONL file

Every run's final model goes to MODELS/issue40/SYSTEM-VALUE-seedS (plain: plain-seedS; KL_G runs are NV models,
`nvib.load`; the others plain Hugging Face models) with its dev NLL (dev.json) and, for the test
seeds, its per-example test scores with and without the tuned temperature (test.json: summed NLL and target tokens,
so NLL is token-weighted when bootstrapped, and ROUGE-L). A finished model is reused, a killed run resumes from its
last checkpoint. `--score FILE.jsonl` scores {"document", "summary"} pairs with every saved final model (NLL per
target token, ROUGE-L) into MODELS/issue40/scores-FILE.json. `--quick` is a smoke run (2 steps, 8 examples, one grid
value, seeds 3 and 4, 2 bootstrap resamples; with `--base` a tiny saved model and `--data` tiny JSONL splits).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers as tf

import nvib
from nvib.workflow.baselines import AttentionTemperature, tune
from nvib.workflow.data import batches, load_examples
from nvib.workflow.evaluate import Evaluator, GenerationArgs, metric
from nvib.workflow.metrics import rouge_per_example
from nvib.workflow.objectives import DevObjective
from nvib.workflow.train import CHECKPOINTS, RUN_LOG, LambdaSchedule, finetune

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
import finetune_base  # noqa: E402
from attention_speed import update_section  # noqa: E402
from finetune_nvib import DEV_EXAMPLES, IN_DOMAIN_SLACK, choose_lambda  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECTION = "finetune regularisers"
SYSTEMS = ("plain", "kl_g", "l2sp", "feature_mean")
LABELS = {"plain": "plain", "kl_g": "KL_G only", "l2sp": "L2-SP", "feature_mean": "feature mean"}
KNOBS = {"kl_g": "λ_G", "l2sp": "α", "feature_mean": "μ"}
GRIDS = {"kl_g": (0.003, 0.01, 0.03), "l2sp": (0.01, 0.1, 1.0), "feature_mean": (0.003, 0.01, 0.03)}  # fixed
SELECT_SEED, TEST_SEEDS = 0, (3, 4, 5, 6, 7)
DOMAINS = ("debian", "docstrings", "wikipara", "wiki")  # the first is in domain
STEPS, TEST, PRIOR_EXAMPLES, RESAMPLES = 100, 400, 1000, 10_000
T_RANGE, T_TRIALS, T_SEED = (0.5, 2.0), 10, 0
ROUGE_SLACK = 0.5  # in-domain ROUGE-L KL_G may lose against plain
QUICK = dict(steps=2, batch_size=4, test=8, dev=8, prior_examples=8, resamples=2, trials=2, seeds=(3, 4))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["select", "test", "table", "all"], default="all")
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "build")
    parser.add_argument("--models", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--base", type=Path, help="the base model (default: MODELS/minilm-b2b-debian-1200)")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), help="the first is in domain")
    parser.add_argument("--score", type=Path, help="score a JSONL of document/summary pairs with every saved model")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps, 8 examples, 2 resamples")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="test only these of the protocol's test seeds (to share the test stage between processes: give each "
        "its own seeds and --threads)",
    )
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, help="test only these systems (as --seeds)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ctx = Context(args)
    if args.score:
        score_file(ctx, args.score)
        return
    if args.stage in ("select", "all"):
        select(ctx)
    if args.stage in ("test", "all"):
        test(ctx)
    if args.stage in ("table", "all"):
        write_table(ctx)


class Context:
    """The fixed setting (the protocol's, or `--quick`'s) and where everything is kept."""

    def __init__(self, args: argparse.Namespace):
        recipe = finetune_base.RECIPE
        quick = QUICK if args.quick else {}
        self.args, self.quick = args, bool(quick)
        self.root = args.models / "issue40" / ("quick" if quick else "")
        self.base = args.base or args.models / finetune_base.default_out(Path("."), recipe["steps"]).name
        self.domains = list(args.domains)
        self.steps = quick.get("steps", STEPS)
        self.batch_size = quick.get("batch_size", recipe["batch_size"])
        self.recipe = {**recipe, "steps": self.steps, "batch_size": self.batch_size}
        self.test, self.dev = quick.get("test", TEST), quick.get("dev", DEV_EXAMPLES)
        self.prior_examples = quick.get("prior_examples", PRIOR_EXAMPLES)
        self.resamples, self.trials = quick.get("resamples", RESAMPLES), quick.get("trials", T_TRIALS)
        self.seeds = quick.get("seeds", TEST_SEEDS)
        if args.seeds:
            if unknown := sorted(set(args.seeds) - set(self.seeds)):
                raise SystemExit(f"--seeds {unknown}: not test seeds of the protocol. Fix: choose from {self.seeds}")
            self.seeds = tuple(s for s in self.seeds if s in args.seeds)
        self.grids = {s: grid[1:2] for s, grid in GRIDS.items()} if quick else GRIDS
        self._tokenizer = self._train = self._prior = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not (self.base / "config.json").exists():
                raise SystemExit(f"no base model at {self.base}. Fix: run benchmarks/ood/finetune_base.py or --base")
            self._tokenizer = tf.AutoTokenizer.from_pretrained(self.base, local_files_only=True)
        return self._tokenizer

    @property
    def train(self) -> list:
        """The next steps × batch Debian training pairs after the base model's (in its data order)."""
        if self._train is None:
            pairs = load_examples(self.args.data / self.domains[0] / "train.jsonl")
            random.Random(finetune_base.RECIPE["seed"]).shuffle(pairs)
            first = 0 if self.quick else finetune_base.RECIPE["steps"] * finetune_base.RECIPE["batch_size"]
            self._train = pairs[first : first + self.steps * self.batch_size]
        return self._train

    def base_model(self) -> tf.EncoderDecoderModel:
        self.tokenizer  # noqa: B018 (checks the base model is there)
        return tf.EncoderDecoderModel.from_pretrained(self.base, local_files_only=True).eval()

    @property
    def prior(self) -> nvib.EmpiricalPrior:
        """The base model's empirical prior on the first PRIOR_EXAMPLES new training pairs, estimated once."""
        if self._prior is None:
            path = self.root / f"prior-p{self.prior_examples}.safetensors"
            if path.exists():
                self._prior = nvib.EmpiricalPrior.load(path)
            else:
                r = self.recipe
                data = batches(self.train[: self.prior_examples], self.tokenizer, 32, r["max_source_len"],
                               r["max_target_len"], "seq2seq")  # fmt: skip
                self._prior = nvib.EmpiricalPrior.estimate(
                    self.base_model(), data, data=f"{self.prior_examples} debian training pairs", progress=False
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                self._prior.save(path)
        return self._prior

    def run_dir(self, system: str, value: float | None, seed: int) -> Path:
        return self.root / (f"plain-seed{seed}" if system == "plain" else f"{system}-{value:g}-seed{seed}")

    def split(self, domain: str, name: str) -> list:
        n = self.test if name == "test" else self.dev
        return load_examples(self.args.data / domain / f"{name}.jsonl")[:n]

    def evaluator(self, model) -> Evaluator:
        r = self.recipe
        generation = GenerationArgs(num_beams=1, max_new_tokens=24, batch_size=32)
        return Evaluator(
            model, self.tokenizer, "summarisation", generation,
            max_source_len=r["max_source_len"], max_target_len=r["max_target_len"],
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# training and scoring one run


def train_one(ctx: Context, system: str, value: float | None, seed: int) -> Path:
    """Fine-tune `system` at `value` from the base model with `seed` (unless finished; a killed run resumes)."""
    out = ctx.run_dir(system, value, seed)
    if (out / RUN_LOG).exists():
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # finished: the final model is kept, not the checkpoints
        return out
    r = ctx.recipe
    options = dict(
        max_steps=r["steps"], batch_size=r["batch_size"], lr=r["lr"], warmup_steps=r["warmup"], weight_decay=0.01,
        seed=seed, max_source_len=r["max_source_len"], max_target_len=r["max_target_len"],
        logging_steps=min(25, r["steps"]), save_steps=min(25, r["steps"]), kl_clip="separate", progress=False,
        schedule=LambdaSchedule("linear", steps=max(1, r["steps"] // 5)),
    )  # fmt: skip
    if system == "kl_g":
        knobs = nvib.NVConfig(stdev_tau_e=0.0, stdev_tau_c=0.0, stdev_tau_d=0.0)
        options.update(nv_config=knobs, prior=ctx.prior, lambda_g=value, lambda_d=0.0, per_token_variance=False)
    else:
        options.update(convert=False)
        if system == "l2sp":
            options.update(l2sp=value)
        elif system == "feature_mean":
            options.update(feature_mean=value, prior=ctx.prior)
    torch.manual_seed(seed)
    t0 = time.time()
    finetune(ctx.base_model(), ctx.train, ctx.tokenizer, output_dir=out, **options)
    print(f"{out.name}: trained in {(time.time() - t0) / 60:.1f} min", flush=True)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # they only serve resuming an unfinished run (~1 GB a run)
    return out


def load_final(out: Path):
    """A saved final model: NV (KL_G runs) or plain."""
    if (out / "nv_config.json").exists():
        return nvib.load(out).eval()
    return tf.EncoderDecoderModel.from_pretrained(out, local_files_only=True).eval()


def dev_nll(ctx: Context, out: Path) -> dict[str, float]:
    """NLL per target token on the first dev pairs of each domain (cached in dev.json)."""
    path = out / "dev.json"
    if path.exists() and (cached := json.loads(path.read_text())).get("n") == ctx.dev:
        return cached["nll"]
    evaluator = ctx.evaluator(load_final(out))
    nll = {}
    for domain in ctx.domains:
        outputs = evaluator.outputs(ctx.split(domain, "dev"), f"{domain} dev {out.name}", generate=False)
        nll[domain] = metric("nll")(evaluator.metric_inputs(outputs, "nll"), [])
    path.write_text(json.dumps({"n": ctx.dev, "nll": nll}, indent=2) + "\n")
    return nll


def per_example(outputs, refs: list[str]) -> dict[str, list]:
    """Summed NLL, target tokens and ROUGE-L (×100) of each example."""
    return {
        "nll": [o.nll for o in outputs],
        "tokens": [o.nll_tokens for o in outputs],
        "rougeL": rouge_per_example([o.prediction for o in outputs], refs, ("rougeL",))["rougeL"].tolist(),
    }


def test_scores(ctx: Context, out: Path) -> dict:
    """Per-example test scores of the final model as it is and with the attention temperature tuned per domain on
    that domain's dev NLL (on the plain form of the model: a KL_G model's NV layers are removed first)."""
    path = out / "test.json"
    if path.exists() and (cached := json.loads(path.read_text())).get("n") == ctx.test:
        return cached
    model = load_final(out)
    evaluator = ctx.evaluator(model)
    result: dict = {"n": ctx.test, "scores": {}, "T": {}, "temperature": {}}
    t0 = time.time()
    for domain in ctx.domains:
        test = ctx.split(domain, "test")
        refs = [e.target for e in test]
        result["scores"][domain] = per_example(evaluator.outputs(test, f"{domain} test {out.name}"), refs)
    if nvib.is_converted(model):
        nvib.unload(model)
    baseline = AttentionTemperature(model, *T_RANGE)
    for domain in ctx.domains:
        dev, test = ctx.split(domain, "dev"), ctx.split(domain, "test")
        temperature, _ = tune(
            baseline, DevObjective(evaluator, dev, "nll", apply=baseline.apply), n_trials=ctx.trials,
            slices=[len(dev)], storage=f"sqlite:///{out / 'temperature.db'}", study_name=f"temperature-{domain}",
            seed=T_SEED, n_startup_trials=3,
        )  # fmt: skip
        baseline.set(temperature)
        outputs = evaluator.outputs(test, f"{domain} test {out.name} T={temperature:.2f}")
        baseline.reset()
        result["temperature"][domain] = temperature
        result["T"][domain] = per_example(outputs, [e.target for e in test])
    result["eval_seconds"] = time.time() - t0
    path.write_text(json.dumps(result) + "\n")
    return result


# ----------------------------------------------------------------------------------------------
# the stages


def select(ctx: Context) -> dict[str, float]:
    """Seed 0: plain and every grid value, dev NLL; each system's value by `choose_lambda`'s rule against plain."""
    plain = dev_nll(ctx, train_one(ctx, "plain", None, SELECT_SEED))
    dev = {"plain": plain}
    chosen = {}
    for system, grid in ctx.grids.items():
        dev[system] = {v: dev_nll(ctx, train_one(ctx, system, v, SELECT_SEED)) for v in grid}
        chosen[system] = choose_lambda({0.0: plain, **dev[system]})
        print(f"chosen {system}: {chosen[system]:g}", flush=True)
    selection = {"chosen": chosen, "dev": {s: d if s == "plain" else {f"{v:g}": n for v, n in d.items()}
                                           for s, d in dev.items()}}  # fmt: skip
    (ctx.root / "selection.json").write_text(json.dumps(selection, indent=2) + "\n")
    return chosen


def chosen_values(ctx: Context) -> dict[str, float | None]:
    path = ctx.root / "selection.json"
    if not path.exists():
        raise SystemExit(f"no selection at {path}. Fix: run --stage select first")
    return {"plain": None, **json.loads(path.read_text())["chosen"]}


def test(ctx: Context) -> None:
    """The four systems at their chosen values on the test seeds, each scored with and without T."""
    for seed in ctx.seeds:
        for system, value in chosen_values(ctx).items():
            if system in (ctx.args.systems or SYSTEMS):
                test_scores(ctx, train_one(ctx, system, value, seed))


def score_file(ctx: Context, path: Path) -> None:
    """Every saved final model under MODELS/issue40 on the {"document", "summary"} pairs of `path`."""
    pairs = load_examples(path)
    refs = [e.target for e in pairs]
    results = {}
    for out in sorted(p.parent for p in ctx.root.glob(f"*/{RUN_LOG}")):
        evaluator = ctx.evaluator(load_final(out))
        scores = per_example(evaluator.outputs(pairs, f"{path.stem} {out.name}"), refs)
        summary = {"nll": sum(scores["nll"]) / sum(scores["tokens"]), "rougeL": statistics.mean(scores["rougeL"])}
        results[out.name] = {**summary, "examples": scores}
        print(f"{out.name}: NLL {summary['nll']:.3f} ROUGE-L {summary['rougeL']:.2f}", flush=True)
    if not results:
        raise SystemExit(f"no finished model under {ctx.root}. Fix: run the select or test stage first")
    target = ctx.root / f"scores-{path.stem}.json"
    target.write_text(json.dumps({"file": str(path), "n": len(pairs), "models": results}) + "\n")
    print(f"-> {target}")


# ----------------------------------------------------------------------------------------------
# intervals and the table


def hierarchical_bootstrap(a: dict, b: dict, resamples: int, seed: int = 0) -> dict[str, object]:
    """Δ = A − B paired by seed and example: {"nll", "rougeL"} -> (mean Δ, 2.5%, 97.5%). `a`, `b`: seed -> per-example
    scores (`per_example`). Each resample draws the seeds with replacement, then within each drawn seed its examples
    with replacement (the same draw for A and B), takes that seed's token-weighted NLL (mean ROUGE-L) difference and
    averages over the drawn seeds."""
    seeds = sorted(a)
    rng = np.random.default_rng(seed)
    n = len(a[seeds[0]]["nll"])
    out = {}
    arrays = {
        "nll": [(np.asarray(a[s]["nll"]), np.asarray(a[s]["tokens"]), np.asarray(b[s]["nll"]),
                 np.asarray(b[s]["tokens"])) for s in seeds],
        "rougeL": [(np.asarray(a[s]["rougeL"]), np.ones(n), np.asarray(b[s]["rougeL"]), np.ones(n)) for s in seeds],
    }  # fmt: skip
    seed_draws = rng.integers(0, len(seeds), (resamples, len(seeds)))
    example_draws = rng.integers(0, n, (resamples, len(seeds), n))
    for name, rows in arrays.items():
        per_seed = np.array([an.sum() / at.sum() - bn.sum() / bt.sum() for an, at, bn, bt in rows])
        deltas = np.zeros(resamples)
        for j in range(len(seeds)):
            drawn = seed_draws[:, j]
            for k, (an, at, bn, bt) in enumerate(rows):
                rows_k = drawn == k
                if not rows_k.any():
                    continue
                idx = example_draws[rows_k, j]
                deltas[rows_k] += an[idx].sum(1) / at[idx].sum(1) - bn[idx].sum(1) / bt[idx].sum(1)
        deltas /= len(seeds)
        low, high = np.percentile(deltas, [2.5, 97.5])
        out[name] = (float(per_seed.mean()), float(low), float(high))
    return out


def system_scores(ctx: Context) -> dict[str, dict[int, dict]]:
    """System label (with " + T") -> seed -> domain -> per-example scores, over the finished test runs."""
    systems: dict[str, dict[int, dict]] = {}
    for system, value in chosen_values(ctx).items():
        for seed in ctx.seeds:
            path = ctx.run_dir(system, value, seed) / "test.json"
            if not path.exists():
                continue
            result = json.loads(path.read_text())
            systems.setdefault(system, {})[seed] = result["scores"]
            systems.setdefault(f"{system} + T", {})[seed] = {
                d: {**s, "temperature": result["temperature"][d]} for d, s in result["T"].items()
            }
    return systems


def pairs_of(systems: list[str]) -> list[tuple[str, str]]:
    """Every system against plain, and KL_G only against every other system."""
    pairs = [(s, "plain") for s in systems if s != "plain"]
    return pairs + [("kl_g", s) for s in systems if s not in ("plain", "kl_g")]


def label(system: str) -> str:
    base, plus = (system[:-4], " + T") if system.endswith(" + T") else (system, "")
    return LABELS[base] + plus


def write_table(ctx: Context) -> None:
    """The `finetune regularisers` section of --results: selection, test scores, every pair's intervals, the verdict."""
    selection = json.loads((ctx.root / "selection.json").read_text())
    chosen = selection["chosen"]
    systems = system_scores(ctx)
    if "plain" not in systems or "kl_g" not in systems:
        raise SystemExit("no test scores of plain and KL_G yet. Fix: run --stage test first")
    complete = [s for s in systems if sorted(systems[s]) == sorted(ctx.seeds)]
    seeds = sorted(set.intersection(*(set(systems[s]) for s in complete)))
    in_domain, ood = ctx.domains[0], ctx.domains[1:]
    lines = [
        f"## {SECTION}",
        "",
        f"Issue 40's pre-registered comparison (protocol above; `python benchmarks/ood/finetune_regularisers.py"
        f"{' --quick' if ctx.quick else ''}`): the {finetune_base.RECIPE['steps']}-step base model fine-tuned "
        f"{ctx.steps} more steps on the next {ctx.steps * ctx.batch_size} unseen Debian pairs through "
        "`nvib.workflow.train` (regulariser weight warmed up over the first fifth, its gradient clipped separately), "
        "each system at the value chosen on seed 0's dev NLL; + T: the attention temperature tuned per domain on its "
        f"dev NLL ([{T_RANGE[0]:g}, {T_RANGE[1]:g}], {ctx.trials} trials; KL_G models with their NV layers removed). "
        f"Test: the first {ctx.test} pairs per domain ({in_domain} in domain), seeds {', '.join(map(str, seeds))}.",
        "",
        f"Selection (seed {SELECT_SEED}, dev NLL, first {ctx.dev} dev pairs per domain): the value of lowest mean "
        f"out-of-domain dev NLL among those within {IN_DOMAIN_SLACK} nats/token of plain in domain (else the "
        "smallest).",
        "",
        "| system | value | " + " | ".join(ctx.domains) + " | chosen |",
        "|---" * (len(ctx.domains) + 3) + "|",
        "| plain | | " + " | ".join(f"{selection['dev']['plain'][d]:.3f}" for d in ctx.domains) + " | |",
    ]
    for system, grid in selection["dev"].items():
        if system == "plain":
            continue
        for value, nll in grid.items():
            mark = "✓" if float(value) == chosen[system] else ""
            lines.append(f"| {label(system)} | {KNOBS[system]} = {value} | "
                         + " | ".join(f"{nll[d]:.3f}" for d in ctx.domains) + f" | {mark} |")  # fmt: skip
    lines += [
        "",
        "Test: mean over the seeds of each seed's ROUGE-L ×100 (greedy, 24 new tokens) and token-weighted NLL "
        "(nats/target token, teacher-forced); + T rows: the mean tuned temperature after the NLL. KL_G only is scored "
        "in NV form (the prior with no weight at evaluation), KL_G only + T with its NV layers removed.",
        "",
        "| system | value | " + " | ".join(f"{d} ROUGE-L | {d} NLL" for d in ctx.domains) + " |",
        "|---" * (2 * len(ctx.domains) + 2) + "|",
    ]
    for system in sorted(complete, key=lambda s: (SYSTEMS.index(s.removesuffix(" + T")), s)):
        base = system.removesuffix(" + T")
        cells = []
        for d in ctx.domains:
            rows = [systems[system][s][d] for s in seeds]
            cells.append(f"{statistics.mean(statistics.mean(r['rougeL']) for r in rows):.2f}")
            nll = statistics.mean(sum(r["nll"]) / sum(r["tokens"]) for r in rows)
            t = f" (T {statistics.mean(r['temperature'] for r in rows):.2f})" if system.endswith(" + T") else ""
            cells.append(f"{nll:.3f}{t}")
        value = f"{KNOBS[base]} = {chosen[base]:g}" if base in chosen else ""
        lines.append(f"| {label(system)} | {value} | " + " | ".join(cells) + " |")
    intervals = {
        (a, b, d): hierarchical_bootstrap(
            {s: systems[a][s][d] for s in seeds}, {s: systems[b][s][d] for s in seeds}, ctx.resamples
        )
        for a, b in pairs_of(complete)
        for d in ctx.domains
    }
    lines += [
        "",
        "Paired differences Δ = A − B (mean over seeds of the per-seed difference) with the 95% percentile interval "
        f"of {ctx.resamples} hierarchical bootstrap resamples (seeds, then examples within seed, paired; seed 0). NLL "
        "below 0 and ROUGE-L above 0 favour A.",
        "",
        "| A | B | " + " | ".join(f"{d} Δ NLL | {d} Δ ROUGE-L" for d in ctx.domains) + " |",
        "|---" * (2 * len(ctx.domains) + 2) + "|",
    ]
    for a, b in pairs_of(complete):
        cells = []
        for d in ctx.domains:
            for name, digits in (("nll", 3), ("rougeL", 2)):
                mean, low, high = intervals[a, b, d][name]
                cells.append(f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]")
        lines.append(f"| {label(a)} | {label(b)} | " + " | ".join(cells) + " |")
    lines += ["", *verdict(ctx, systems, intervals, complete, seeds, in_domain, ood)]
    update_section(ctx.args.results, SECTION, "\n".join(lines) + "\n")
    print(f"-> {ctx.args.results} ({SECTION})")


def verdict(ctx, systems, intervals, complete, seeds, in_domain, ood) -> list[str]:
    """The protocol's criterion, read off the intervals."""

    def below(a: str, b: str) -> list[str]:
        return [d for d in ood if intervals[a, b, d]["nll"][2] < 0]

    def rouge(system: str) -> float:
        return statistics.mean(statistics.mean(systems[system][s][in_domain]["rougeL"]) for s in seeds)

    need = 2 if len(ood) >= 3 else 1
    wins = below("kl_g", "plain")
    gap = rouge("kl_g") - rouge("plain")
    beats = len(wins) >= need and abs(gap) <= ROUGE_SLACK
    lines = [
        f"**Criterion (protocol).** KL_G only against plain: Δ NLL interval below 0 on {len(wins)} of {len(ood)} "
        f"out-of-domain domains ({', '.join(wins) or 'none'}; needed {need}), in-domain ROUGE-L {gap:+.2f} "
        f"(within ±{ROUGE_SLACK} needed): **{'met' if beats else 'not met'}**."
    ]
    for other in ("l2sp", "feature_mean", "plain + T"):
        if other not in complete:
            continue
        wins = below("kl_g", other)
        lines.append(
            f"- KL_G only against {label(other)}: Δ NLL interval below 0 on {len(wins)} of {len(ood)} "
            f"({', '.join(wins) or 'none'}): **{'beats it' if len(wins) >= need else 'does not beat it'}**."
        )
    if ctx.quick:
        lines.append("- (a `--quick` smoke run: tiny settings, not the protocol's numbers)")
    return lines


if __name__ == "__main__":
    main()
