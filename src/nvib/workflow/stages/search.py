"""The knob search stage: tune the NV knobs on the dev set (resuming a stored study) and write nv_config.json; and
the tuned knobs a later stage reads back."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import optuna
from torch import nn

from nvib.core.config import NVConfig
from nvib.core.convert import nv_layers
from nvib.core.prior import EmpiricalPrior
from nvib.workflow.data import fingerprint
from nvib.workflow.evaluate import LOWER_IS_BETTER, DevObjective, new_progress
from nvib.workflow.search import best_knobs, knob_names, run_search
from nvib.workflow.settings import PRIOR_ONLY_ALPHA_TAUS, STDEV_RANGES, RunConfig, SearchSpace
from nvib.workflow.stages.inputs import RunInputs
from nvib.workflow.stages.records import KNOBS_FILE, start_run
from nvib.workflow.stages.studies import (
    FINISHED,
    base_knobs,
    dev_slices,
    run_sampler_seed,
    storage_url,
    stored_study,
    study_identity,
)

__all__ = ["search_knobs", "search_plan", "tuned_knobs"]


def search_plan(cfg: RunConfig, model: nn.Module, n_trials: int) -> tuple[SearchSpace, list[dict[str, float]]]:
    """The knob ranges and start points of a run's search: stdev_tau's default range in the unit the model's sites
    use (docs/method.md §12), and the prior-only points (stdev_tau = 0, alpha_tau in `PRIOR_ONLY_ALPHA_TAUS`) after the
    config's start points, as many as the budget holds beside the equivalence point."""
    space = cfg.search.space()
    unit = cfg.search.stdev_unit or next(iter(nv_layers(model).values())).STDEV_UNIT
    if "stdev_tau" not in cfg.search.ranges:
        space = dataclasses.replace(space, stdev_tau=STDEV_RANGES[unit])
    names = knob_names({layer.kind for layer in nv_layers(model).values()})
    prior_only = [{k: (a if k.startswith("alpha") else 0.0) for k in names} for a in PRIOR_ONLY_ALPHA_TAUS]
    room = max(n_trials - 1 - len(cfg.search.start_points), 0)
    return space, [*cfg.search.start_points, *prior_only[:room]]


def search_knobs(inputs: RunInputs, run_dir: Path, prior: EmpiricalPrior, n_trials: int) -> optuna.Study:
    """Tune the knobs of the model converted with ``prior`` on the dev set, up to ``n_trials`` trials in the
    study (a stored one resumes); writes nv_config.json and returns the study."""
    cfg, metric_name, console = inputs.config, inputs.config.metric, inputs.console
    model = inputs.nv_model(prior)
    start_run(run_dir, cfg)
    storage, seed, base = storage_url(cfg, run_dir), run_sampler_seed(cfg), base_knobs(cfg)
    dev = inputs.examples("dev")
    slices = dev_slices(cfg, dev)
    if slices[-1] < max(cfg.search.slices):
        console.print(f"search: the dev set has {len(dev)} examples; slices clipped to {slices}")
    previous = stored_study(storage, cfg.search.study_name)
    done = len(previous.get_trials(deepcopy=False, states=FINISHED)) if previous is not None else 0
    remaining = max(n_trials - done, 0)
    if done:
        console.print(f"search: resuming study with {done} finished trials; {remaining} to run")
    kinds = {layer.kind for layer in nv_layers(model).values()}
    space, start_points = search_plan(cfg, model, n_trials)
    bar, start = new_progress(inputs.progress, console), time.perf_counter()
    with bar:
        trials = bar.add_task("search", total=remaining, info=metric_name)
        started = [0]

        def on_call(knobs: dict[str, float], n: int) -> None:
            if n == slices[0]:
                bar.update(trials, completed=started[0], info=f"trial {started[0] + 1}/{remaining}")
                started[0] += 1

        objective = DevObjective(
            inputs.evaluator(bar),
            dev,
            metric_name,
            on_call=on_call,
            min_diversity=cfg.search.min_diversity,
            config=base,
        )
        study = run_search(
            objective,
            kinds,
            n_trials=n_trials,
            storage=storage,
            study_name=cfg.search.study_name,
            slices=slices,
            start_points=start_points,
            space=space,
            seed=seed,
            timeout=cfg.search.timeout,
            progress=False,
            n_startup_trials=cfg.search.n_startup_trials,
            objective_info={
                "metric": metric_name,
                "dev": fingerprint(dev[: slices[-1]]),
                **study_identity(cfg, prior, model),
            },  # fmt: skip
            heartbeat_interval=cfg.search.heartbeat_interval,
            grace_period=cfg.search.grace_period,
        )
        bar.update(trials, completed=remaining)
    study.set_user_attr("metric", metric_name)
    study.set_user_attr("sampler_seed", seed)
    tuned = base.replace(**best_knobs(study))
    tuned.save(run_dir / KNOBS_FILE)
    sign = -1 if metric_name in LOWER_IS_BETTER else 1
    seconds = time.perf_counter() - start
    per_trial = f" ({seconds / started[0]:.1f} s per trial)" if started[0] else ""
    rejected = sum("pruned_reason" in t.user_attrs for t in study.get_trials(deepcopy=False))
    console.print(
        f"search: {started[0]} trials in {seconds:.0f} s{per_trial} "
        f"({objective.n_generated} dev examples run); best {metric_name} {sign * study.best_value:.4f} "
        f"(trial #{study.best_trial.number}); knobs -> {run_dir / KNOBS_FILE}"
        + (f"; {rejected} trials pruned for low output diversity" if rejected else "")
    )
    return study


def tuned_knobs(config: RunConfig, run_dir: Path) -> NVConfig:
    """The search's knobs: nv_config.json, else the best trial of the stored study."""
    path = run_dir / KNOBS_FILE
    if path.is_file():
        return NVConfig.load(path)
    study = stored_study(storage_url(config, run_dir), config.search.study_name)
    if study is None:
        raise FileNotFoundError(f"no tuned knobs at {path} and no study. Fix: run `nvib search` first")
    return base_knobs(config).replace(**best_knobs(study))
