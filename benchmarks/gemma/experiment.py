"""Gemma 3 270M few-shot out-of-domain benchmark (issue 10, part 2).

    python benchmarks/gemma/experiment.py --quick      # reduced budget, labelled as such (writes runs/gemma-quick)
    python benchmarks/gemma/experiment.py              # protocol budget (writes runs/gemma, benchmarks/RESULTS.md)

Protocol (fixed before any number was seen):
- "Trained" in domain = a fixed 3-shot prompt of Debian descriptions → synopsis (demonstrations drawn with
  --seed from the Debian train split among 15–40-word descriptions). Inputs are cut to --max-input-tokens.
- The empirical prior is estimated on in-domain prompts as they are used: the Debian demonstrations, a Debian
  train input and its target, teacher-forced (--prior-examples prompts, none of them a demonstration).
- Per target domain (debian = in domain; docstrings, wikipara = out of domain) and per system, the knobs
  are tuned on the first --dev pairs of the domain's dev split with --trials Optuna trials (TPE, sampler seed
  --seed + domain index, median pruning on half the dev set), objective = mean target-token NLL under teacher
  forcing; then the first --test pairs of the test split are scored: ROUGE-L of greedy outputs (≤ 24 new
  tokens, stopped at the newline), target NLL, diversity; 95% paired bootstrap intervals against unconverted.
- Systems: unconverted; NV tuned (alpha_tau_d, stdev_tau_d); attention temperature (one knob, same budget);
  target-domain demonstrations instead of Debian ones (3 from the domain's train split, drawn as the Debian
  ones; no tuning); NV tuned on top of target-domain demonstrations.
  For debian the two target-demonstration systems are the unconverted and NV-tuned ones and are not rerun.
- `--stdev-unit bias` (the second run, issue 21): the NV systems read τσ in docs/method.md §12's unit (nats of spread of
  the per-token score bias, one scale per KV head), default range [0, 2]; the prior-only points (τσ = 0, τα ∈ {−2, 0,
  +2}) are tried right after the identity point, and each NV study's best prior-only trial is scored on test as
  its own row ("…, prior only"). The stock systems, the prior and the stock check are the same steps as in the
  first run and are shared with it in one state file.
- `wiki` (whole articles) is left out: 29 dev / 58 test pairs are below the protocol's sizes, it has no train
  split for demonstrations, and its 200-word documents do not fit three to a prompt; `wikipara` (the same
  articles, one pair per paragraph, 500 dev / 1000 test) is the Wikipedia domain.
- The demonstrations' KV cache is computed once per prompt and knob setting and copied for every batch (the
  product's few-shot prompt, `nvib.workflow.prompting`, as `nvib run` uses it with a `prompt:` section); a check
  at start-up requires the shared and unshared NLL to agree to 1e-4 nats/token and greedy outputs to be identical,
  for the stock model and for NV at a regularised setting, and the NV model at the equivalence knobs to give the
  stock NLL. Scoring, search objective and temperature baseline are the product's (`Evaluator`, `DevObjective`,
  `baselines.tune`); this script keeps the protocol, its resumable state and the table.
  `benchmarks/gemma/gemma.yaml` is the same comparison for one tuning domain through `nvib run`.

Every finished step is stored in OUT/state.json (keyed by the budget) and the Optuna studies in OUT/studies.db,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch

import nvib
from nvib.workflow.baselines import AttentionTemperature, tune
from nvib.workflow.data import Example
from nvib.workflow.evaluate import Evaluator, new_progress
from nvib.workflow.objectives import DevObjective
from nvib.workflow.prompting import (
    FewShotPrompt,
    SharedPrefix,
    check_sharing,
    describe_sharing,
    draw_demonstrations,
    prompt_prior,
)
from nvib.workflow.search import SearchSpace, best_knobs, run_search
from nvib.workflow.settings import PRIOR_ONLY_ALPHA_TAUS, STDEV_RANGES, GenerationArgs

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
from gemma3_model import load_gemma3  # noqa: E402
from measures import summarise  # noqa: E402
from tables import render, verdict  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ("debian", "docstrings", "wikipara")
IN_DOMAIN = "debian"
NV_SYSTEMS = ("NV tuned", "NV + target demos")
SYSTEMS = ("unconverted", "temperature", "target demos", *NV_SYSTEMS, *(f"{s}, prior only" for s in NV_SYSTEMS))
TEMPERATURE = (0.5, 2.0)
REGULARISED = {"alpha_tau_d": 0.0, "stdev_tau_d": 0.3}  # the sharing check's NV setting
# Key-space τ_α is centred on an average in-domain token and counted in units ς ≥ 1 (docs/method.md §11): τ_α = 0 gives
# the prior an average token's weight, -3 gives it e^{3ς} ≥ 20 tokens' worth (all the attention where ς ≈ 50), +3 at
# most e^-3 of a token. The equivalence point (10) is tried first and widens the range to it (nvib.workflow.search).
ALPHA_RANGE, STDEV_RANGE = (-3.0, 3.0), STDEV_RANGES["prior"]
PROTOCOL = {"dev": 64, "trials": 20, "test": 300}
TEMPLATE = "Text: {source}\nSummary: {target}"  # one line in, one line out: generation stops at the newline
#: Demonstrations are drawn among the first POOL train pairs with DEMO_WORDS document words (a short prefix).
POOL, DEMO_WORDS = 20000, (15, 40)
QUICK = {"dev": 8, "trials": 5, "test": 16, "prior_examples": 12}  # ≤ 10 min on 2 cores, first GGUF load included


def range_free(step: str) -> bool:
    """Whether a step's result does not depend on the NV knobs' unit and range (stock systems, prior, stock check):
    a `--stdev-range` or `--stdev-unit` run takes those from the first run's key."""
    return step in ("check stock", "prior") or step.endswith(("/unconverted", "/temperature", "/target demos"))


class State:
    """Results of finished steps, persisted after each one (resume after an interruption), with the wall and
    process CPU seconds each step took when it ran (CPU seconds / threads estimates the time on idle cores)."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        every = json.loads(path.read_text()) if path.exists() else {}
        self.data = every.get(key, {})
        self.cost: dict[str, dict] = self.data.setdefault("_cost", {})

    def get(self, name: str, compute: Callable[[], dict], phase: str) -> dict:
        if name not in self.data:
            start, cpu = time.perf_counter(), time.process_time()
            self.data[name] = compute()
            self.cost[name] = {"phase": phase, "wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}
            every = json.loads(self.path.read_text()) if self.path.exists() else {}
            every[self.key] = self.data
            self.path.write_text(json.dumps(every))
        return self.data[name]

    def inherit(self, key: str, names: Callable[[str], bool]) -> None:
        """Copy the finished steps `names` accepts (and their cost) from the run stored under `key`, where
        this run has none of its own."""
        every = json.loads(self.path.read_text()) if self.path.exists() else {}
        other = every.get(key, {})
        for name, value in other.items():
            if not name.startswith("_") and names(name) and name not in self.data:
                self.data[name] = value
                if name in other.get("_cost", {}):
                    self.cost[name] = other["_cost"][name]

    def phases(self) -> dict[str, dict[str, float]]:
        """phase -> summed wall and CPU seconds of its steps."""
        out: dict[str, dict[str, float]] = {}
        for c in self.cost.values():
            acc = out.setdefault(c["phase"], {"wall": 0.0, "cpu": 0.0})
            acc["wall"] += c["wall"]
            acc["cpu"] += c["cpu"]
        return out


def _digest(budget: dict) -> str:
    """The state key of a budget."""
    return hashlib.sha256(json.dumps(budget, sort_keys=True).encode()).hexdigest()[:12]


def pairs(path: Path, limit: int) -> list[tuple[str, Example]]:
    """(id, example) of the first `limit` pairs of one split file (`{"id", "document", "summary"}` per line)."""
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            out.append((row["id"], Example(row["document"], row["summary"])))
            if len(out) >= limit:
                break
    return out


def _nll(study: optuna.Study, value: float) -> float:
    """A trial value as NLL: the product's objectives are maximised (−NLL); the first runs' studies minimised."""
    return -value if study.direction == optuna.study.StudyDirection.MAXIMIZE else value


def best_prior_only(study: optuna.Study) -> dict | None:
    """The knobs of the best complete trial at τσ = 0 with the prior in play (τα below the identity point), or None."""
    trials = [
        t for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE and t.params.get("stdev_tau_d") == 0.0
        and t.params.get("alpha_tau_d", 10.0) < ALPHA_RANGE[1] + 1e-9
    ]  # fmt: skip
    if not trials:
        return None
    best = min(trials, key=lambda t: _nll(study, t.value))  # ties: the first
    return dict(best.params)


def study_summary(study: optuna.Study) -> dict:
    """Trials, pruned trials, and the dev NLL of the best and of the first (the enqueued identity) trial."""
    trials = [t for t in study.trials if t.state.is_finished()]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {
        "n_trials": len(trials),
        "n_pruned": len(trials) - len(complete),
        "best_value": _nll(study, study.best_value),
        "first_value": _nll(study, complete[0].value) if complete else None,
        "trial_seconds": [t.duration.total_seconds() for t in trials if t.duration],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"reduced budget {QUICK} (labelled quick)")
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "build")
    parser.add_argument("--out", type=Path, help="output folder (default runs/gemma, runs/gemma-quick with --quick)")
    parser.add_argument("--trials", type=int, default=PROTOCOL["trials"], help="Optuna trials per tuned system")
    parser.add_argument("--dev", type=int, default=PROTOCOL["dev"], help="dev pairs per domain")
    parser.add_argument("--test", type=int, default=PROTOCOL["test"], help="test pairs per domain")
    parser.add_argument("--seed", type=int, default=0, help="demonstrations and sampler seed")
    parser.add_argument("--prior-examples", type=int, default=64, help="in-domain prompts for the empirical prior")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    parser.add_argument("--max-input-tokens", type=int, default=128)
    parser.add_argument(
        "--stdev-unit",
        choices=("prior", "bias"),
        default="prior",
        help='unit of stdev_tau_d: "prior" (docs/method.md §3, the first run) or "bias" '
        "(docs/method.md §12, the second run)",
    )
    parser.add_argument(
        "--stdev-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
        help="stdev_tau_d search range (default: the pre-registered one of the unit; another is a post-hoc variant)",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch", type=int, default=32, help="test examples per greedy-generation batch")
    parser.add_argument(
        "--nll-batch", type=int, default=8, help="dev examples per teacher-forced forward (small batches pad less)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, help="markdown to update (default: benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    args.out = args.out or ROOT / "runs" / ("gemma-quick" if args.quick else "gemma")
    args.results = args.results or (args.out / "RESULTS.md" if args.quick else ROOT / "benchmarks" / "RESULTS.md")
    if not (args.data / "manifest.json").is_file():
        sys.exit(f"no benchmark data at {args.data}: build it (benchmarks/data/README.md) or pass --data")
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = {k: getattr(args, k) for k in ("dev", "test", "trials", "seed", "prior_examples", "max_input_tokens",
                                               "max_new_tokens")}  # fmt: skip
    unit = args.stdev_unit
    args.stdev_range = tuple(args.stdev_range or STDEV_RANGES[unit])
    if unit != "prior":  # in the key only when changed: earlier runs keep their key
        budget["stdev_unit"] = unit
    if args.stdev_range != STDEV_RANGES[unit]:
        budget["stdev_range"] = list(args.stdev_range)
    key = _digest(budget)
    base_key = _digest({k: v for k, v in budget.items() if k not in ("stdev_range", "stdev_unit")})
    space = SearchSpace(alpha_tau=ALPHA_RANGE, stdev_tau=args.stdev_range)
    # the second run also tries the prior alone (τσ = 0) right after the identity point
    start_points = [] if unit == "prior" else [{"alpha_tau_d": a, "stdev_tau_d": 0.0} for a in PRIOR_ONLY_ALPHA_TAUS]
    nv_config = lambda knobs: nvib.NVConfig(**knobs, stdev_unit=unit)  # noqa: E731
    state, t_start = State(args.out / "state.json", key), time.time()
    if key != base_key:  # steps that do not depend on the τσ range come from the default-range run
        state.inherit(base_key, range_free)
    storage = f"sqlite:///{args.out / 'studies.db'}"
    log = lambda *a: print(f"[{time.time() - t_start:7.0f}s]", *a, flush=True)  # noqa: E731

    model, tokenizer = load_gemma3()
    load_seconds, load_cpu = time.time() - t_start, time.process_time()
    train = {d: args.data / d / "train.jsonl" for d in DOMAINS}
    pool = {d: pairs(train[d], POOL) for d in {IN_DOMAIN, *args.domains}}
    ids = {id(e): i for rows in pool.values() for i, e in rows}
    demos = {d: draw_demonstrations([e for _, e in pool[d]], 3, args.seed, DEMO_WORDS) for d in pool}
    dev = {d: [e for _, e in pairs(args.data / d / "dev.jsonl", args.dev)] for d in args.domains}
    test = {d: [e for _, e in pairs(args.data / d / "test.jsonl", args.test)] for d in args.domains}
    prompts = {
        d: FewShotPrompt(tokenizer, TEMPLATE, demonstrations=ds, max_source_tokens=args.max_input_tokens)
        for d, ds in demos.items()
    }
    log("prefix tokens:", {d: len(p.prefix) for d, p in prompts.items()}, "budget:", budget)

    def evaluator(prompt: str, batch: int, bar=None) -> Evaluator:
        """The product's evaluator behind one domain's demonstrations (greedy, stopped at the newline)."""
        generation = GenerationArgs(max_new_tokens=args.max_new_tokens, batch_size=batch)
        return Evaluator(model, tokenizer, "summarisation", generation, max_source_len=args.max_input_tokens,
                         max_target_len=10**6, prompt=prompts[prompt], progress=bar)  # fmt: skip

    def test_eval(domain: str, prompt: str) -> dict:
        with new_progress() as bar:
            outputs = evaluator(prompt, args.batch, bar).outputs(test[domain], f"{domain} test · {prompt} demos")
        return {"nll": [[o.nll, o.nll_tokens] for o in outputs], "preds": [o.prediction for o in outputs]}

    # ---- stock model: unconverted, temperature, target demonstrations
    check_items = [prompts[IN_DOMAIN].encode(e) for e in dev[IN_DOMAIN][:2] + dev[args.domains[-1]][:1]]
    engine = SharedPrefix(model, prompts[IN_DOMAIN])

    def stock_check() -> dict:
        result = check_sharing(engine, check_items, args.max_new_tokens)
        return {**result, "nll": [[s.nll, s.n] for s in engine.nll(check_items)]}

    checks = {"stock": state.get("check stock", stock_check, "check")}
    log(f"prompt sharing check, stock model: {describe_sharing(checks['stock'])}")

    # ---- NV: prior on in-domain prompts, conversion, checks, tuning
    used = {ids[id(e)] for e in demos[IN_DOMAIN]}
    prior_pairs = [e for i, e in pool[IN_DOMAIN][: args.prior_examples + 3] if i not in used][: args.prior_examples]
    prior_total = math.ceil(len(prior_pairs) / 4)  # batches of 4 prompts, for the progress bar
    prior_path = args.out / f"prior-{base_key}.safetensors"  # the τσ range does not change the prior

    def estimate() -> dict:
        with torch.inference_mode():
            data = f"debian 3-shot prompts x{args.prior_examples}"
            prior = prompt_prior(model, prompts[IN_DOMAIN], prior_pairs, 4, data=data, total=prior_total)
        prior.save(prior_path)
        return {"tokens": prior.metadata["tokens"]}

    def nv_checks() -> dict:
        """NV at the identity knobs gives the stock NLL; sharing holds at a regularised setting."""
        engine.reset()
        at_identity = engine.nll(check_items)
        gap = max(abs(a.nll - b[0]) / a.n for a, b in zip(at_identity, checks["stock"]["nll"], strict=True))
        nvib.configure(model, nv_config(REGULARISED))
        try:
            shared = check_sharing(engine, check_items, args.max_new_tokens)
        finally:
            nvib.configure(model, nvib.NVConfig())
        return {"identity_nll_gap": gap, "regularised": {"knobs": REGULARISED, **shared}}

    def to_stock() -> None:
        if nvib.is_converted(model):
            nvib.unload(model)

    def to_nv() -> None:
        """Estimate the prior (on the stock model) once, convert, and run the NV checks once."""
        if nvib.is_converted(model):
            return
        state.get("prior", estimate, "prior")
        nvib.convert(model, prior=nvib.EmpiricalPrior.load(prior_path))
        if "nv" not in checks:
            checks["nv"] = state.get("check nv", nv_checks, "check")
            nv, knobs = checks["nv"], ", ".join(f"{k}={v:g}" for k, v in checks["nv"]["regularised"]["knobs"].items())
            log(
                f"prompt sharing check, NV: at the identity knobs the NLL equals the stock model's to "
                f"{nv['identity_nll_gap']:.1e} nats per target token; at {knobs}, {describe_sharing(nv['regularised'])}"
            )

    def dev_objective(d: str, prompt: str, bar, label: str, **kwargs) -> DevObjective:
        """Mean target NLL of d's first n dev pairs behind `prompt`'s demonstrations (maximised as −NLL); each
        trial advances `label`'s row of the rich `bar` (a trial starts with the first slice)."""
        task = bar.add_task(label, total=args.trials, info="trials")
        first = len(dev[d]) // 2

        def on_call(knobs: dict, n: int) -> None:
            if n == first:
                bar.advance(task)

        return DevObjective(evaluator(prompt, args.nll_batch), dev[d], "nll", on_call, min_diversity=None, **kwargs)

    def stock_systems(i: int, d: str) -> None:
        state.get(f"{d}/unconverted", lambda d=d: test_eval(d, IN_DOMAIN), "test")
        log(d, "unconverted done")

        def temperature(d=d, i=i) -> dict:
            baseline = AttentionTemperature(model, *TEMPERATURE)
            with new_progress() as bar:
                t, study = tune(
                    baseline, dev_objective(d, IN_DOMAIN, bar, f"{d} temperature", apply=baseline.apply),
                    n_trials=args.trials, slices=[len(dev[d]) // 2, len(dev[d])], storage=storage,
                    study_name=f"temp-{d}-{key}", seed=args.seed + i,
                )  # fmt: skip
            baseline.set(t)
            try:
                result = {"temperature": t, "search": study_summary(study), **test_eval(d, IN_DOMAIN)}
            finally:
                baseline.reset()
            return result

        state.get(f"{d}/temperature", temperature, "temperature")
        if d != IN_DOMAIN:
            state.get(f"{d}/target demos", lambda d=d: test_eval(d, d), "test")
        log(d, "stock systems done")

    def nv_systems(i: int, d: str) -> None:
        for system, prompt in zip(NV_SYSTEMS, (IN_DOMAIN, d), strict=True):
            if system == "NV + target demos" and d == IN_DOMAIN:
                continue

            def search(d=d, i=i, prompt=prompt, system=system) -> dict:
                with new_progress() as bar:
                    study = run_search(
                        dev_objective(d, prompt, bar, f"{d} {system}", config=nv_config({})), {"decoder"},
                        n_trials=args.trials, storage=storage, study_name=f"nv-{d}-{prompt}-{key}",
                        slices=[len(dev[d]) // 2, len(dev[d])], seed=args.seed + i, progress=False, space=space,
                        start_points=start_points,
                        objective_info={"metric": "nll", "dev": f"{d}[:{len(dev[d])}]", "demonstrations": prompt},
                    )  # fmt: skip
                result = scored_at(best_knobs(study), d, prompt)
                return {**result, "search": study_summary(study), "prior_only": best_prior_only(study)}

            tuned = state.get(f"{d}/{system}", search, "nv")
            log(d, system, "done")
            if tuned.get("prior_only") is not None:
                state.get(f"{d}/{system}, prior only", lambda d=d, p=prompt, k=tuned["prior_only"]: scored_at(k, d, p),
                          "nv")  # fmt: skip
                log(d, system, "prior only done")

    def scored_at(knobs: dict, d: str, prompt: str) -> dict:
        """Test scores of NV at `knobs` with `prompt`'s demonstrations, and the attention mass on the prior."""
        nvib.configure(model, nv_config(knobs))
        try:
            with nvib.record_prior_mass(model) as mass:
                result = test_eval(d, prompt)
        finally:
            nvib.configure(model, nvib.NVConfig())
        return {"knobs": knobs, "prior_mass": dict(mass), **result}

    # domain by domain, so that a run cut short has whole rows
    for i, d in enumerate(args.domains):
        to_stock()
        stock_systems(i, d)
        to_nv()
        nv_systems(i, d)
    to_stock()

    # ---- report
    rows, details, against = {}, {}, {}
    for d in args.domains:
        refs = [e.target for e in test[d]]
        got = {s: state.data[f"{d}/{s}"] for s in SYSTEMS if f"{d}/{s}" in state.data}
        if d == IN_DOMAIN:
            got["target demos"], got["NV + target demos"] = got["unconverted"], got["NV tuned"]
            if "NV tuned, prior only" in got:
                got["NV + target demos, prior only"] = got["NV tuned, prior only"]
        rows[d] = {s: summarise(v, None if s == "unconverted" else got["unconverted"], refs) for s, v in got.items()}
        # the NV systems against the one-knob baseline, paired on the same test pairs (issue 21's reading)
        against[d] = {s: summarise(v, got["temperature"], refs) for s, v in got.items() if s.startswith("NV")}
        details[d] = {
            "n_dev": len(dev[d]), "n_test": len(test[d]), "temperature": got["temperature"]["temperature"],
            "nv_knobs": got["NV tuned"]["knobs"], "nv_prior_mass": got["NV tuned"]["prior_mass"],
            "nv_target_knobs": got["NV + target demos"]["knobs"],
            "nv_target_prior_mass": got["NV + target demos"]["prior_mass"],
            "prior_only": {s: (got[f"{s}, prior only"]["knobs"], got[f"{s}, prior only"]["prior_mass"])
                           for s in NV_SYSTEMS if f"{s}, prior only" in got},
            "search": {s: got[s]["search"] for s in ("NV tuned", "temperature", "NV + target demos")},
            "demos": [ids[id(e)] for e in demos[d if d in demos else IN_DOMAIN]],
        }  # fmt: skip
        (args.out / "predictions").mkdir(exist_ok=True)
        (args.out / "predictions" / f"{d}.json").write_text(
            json.dumps({"refs": refs, **{s: v["preds"] for s, v in got.items()}}, indent=1)
        )
    elapsed = time.time() - t_start
    phases = {"load": {"wall": load_seconds, "cpu": load_cpu}, **state.phases()}
    meta = {
        "budget": budget, "quick": args.quick, "domains": args.domains,
        "seconds": sum(p["wall"] for p in phases.values()),
        "cpu_seconds": sum(p["cpu"] for p in phases.values()),
        "phases": phases,
        "this_process_seconds": elapsed, "checks": checks, "load_average": os.getloadavg(),
        "threads": args.threads, "machine": platform.processor() or platform.machine(),
    }  # fmt: skip
    results = {"rows": rows, "against_temperature": against, "details": details, "meta": meta}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    section = "gemma" if unit == "prior" else f"gemma, stdev_unit {unit}"
    table = render(rows, details, meta, section, against)
    (args.out / "results.md").write_text(table)
    print(table)
    from attention_speed import update_section  # benchmarks/attention_speed.py

    update_section(args.results, section, table)
    log(f"results: {args.out / 'results.json'}, {args.out / 'results.md'}, section {section!r} of {args.results}")
    print(verdict(rows, against), flush=True)


if __name__ == "__main__":
    main()
