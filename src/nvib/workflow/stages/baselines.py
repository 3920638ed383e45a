"""The baselines stage: tune the configured baselines (attention temperature, WiSE-FT) on the unconverted model with
the knob search's objective, dev data and budget (resuming their studies); writes baselines.json."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nvib.core import files
from nvib.workflow.baselines import AttentionTemperature, Baseline, WiseFT, summary, tune
from nvib.workflow.data import fingerprint
from nvib.workflow.evaluate import LOWER_IS_BETTER, VARIANTS, DevObjective, new_progress
from nvib.workflow.models import load_model, model_location
from nvib.workflow.stages.inputs import RunInputs
from nvib.workflow.stages.records import BASELINES_FILE, start_run
from nvib.workflow.stages.studies import dev_slices, run_sampler_seed, storage_url, study_identity

__all__ = ["make_baselines", "tune_baselines"]


def make_baselines(inputs: RunInputs) -> dict[str, Baseline]:
    """The config's baselines over the run's (unconverted) model: name -> baseline; loads WiSE-FT's
    pre-fine-tuning model."""
    cfg = inputs.config
    made: dict[str, Baseline] = {}
    if cfg.baselines.temperature or cfg.baselines.wise_ft:
        model = inputs.unconverted_model()
        if cfg.baselines.temperature:
            made["temperature"] = AttentionTemperature(model, *cfg.baselines.temperature_range)
        if cfg.baselines.wise_ft:
            section = dataclasses.replace(cfg.model, path=cfg.baselines.wise_ft, gguf_file=None)
            where = model_location(section.path, cfg.base_dir)
            inputs.console.print(f"WiSE-FT: loading the pre-fine-tuning model {where}")
            pretrained, _ = load_model(section, cfg.task, cfg.base_dir)
            made["wise_ft"] = WiseFT(model, pretrained, *cfg.baselines.wise_ft_range)
            del pretrained
    return made


def tune_baselines(
    inputs: RunInputs, run_dir: Path, n_trials: int
) -> tuple[dict[str, tuple[Baseline, float]], str | None]:
    """Tune the configured baselines: name -> (baseline, tuned value), and the name of the one with the best dev
    objective (None without baselines). Writes baselines.json."""
    made = make_baselines(inputs)
    if not made:
        return {}, None
    cfg = inputs.config
    start_run(run_dir, cfg)
    model, _ = inputs.loaded
    dev = inputs.examples("dev")
    slices = dev_slices(cfg, dev)
    tuned, summaries = {}, {}
    bar = new_progress(inputs.progress, inputs.console)
    with bar:
        for name, baseline in made.items():
            task = bar.add_task(f"baseline {baseline.label}", total=n_trials, info=cfg.metric)
            objective = DevObjective(
                inputs.evaluator(bar), dev, cfg.metric, min_diversity=cfg.search.min_diversity, apply=baseline.apply
            )
            identity = study_identity(cfg, None, model)
            del identity["prior"], identity["stdev_unit"]  # the baselines run the unconverted model
            if name == "wise_ft":
                identity["pretrained"] = str(model_location(cfg.baselines.wise_ft, cfg.base_dir))
            value, study = tune(
                baseline, objective, n_trials=n_trials, slices=slices, storage=storage_url(cfg, run_dir),
                study_name=f"{cfg.search.study_name}-{name}", seed=run_sampler_seed(cfg),
                n_startup_trials=cfg.search.n_startup_trials,
                on_trial=lambda n, task=task: bar.update(task, completed=n, info=f"trial {n + 1}"),
                objective_info={"metric": cfg.metric, "dev": fingerprint(dev[: slices[-1]]), **identity},
                heartbeat_interval=cfg.search.heartbeat_interval, grace_period=cfg.search.grace_period,
            )  # fmt: skip
            bar.update(task, completed=n_trials)
            tuned[name], summaries[name] = (baseline, value), summary(study)
    scored = {n: s["dev_objective"] for n, s in summaries.items() if s["dev_objective"] is not None}
    best = max(scored, key=scored.get) if scored else None
    files.write_json(run_dir / BASELINES_FILE, {"metric": cfg.metric, "best": best, "baselines": summaries})
    sign = -1 if cfg.metric in LOWER_IS_BETTER else 1  # the studies maximise
    for name, s in summaries.items():
        found = "no complete trial" if s["value"] is None else f"{s['value']:.4g}"
        result = "" if s["value"] is None else f" (dev {cfg.metric} {sign * s['dev_objective']:.4f})"
        inputs.console.print(f"baseline {VARIANTS[name]}: {found} after {s['trials']} trials{result}")
    return tuned, best
