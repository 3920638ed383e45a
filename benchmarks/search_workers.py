"""Knob search on one shared PostgreSQL study: 1 worker process vs 2, same study settings.

    python benchmarks/search_workers.py [--n-trials 12] [--workers 1 2]

The search of `nvib tour`'s embedded toy config (packaged MiniLM as BERT2BERT, rougeL on 16 dev docstrings,
16 new tokens) with a throw-away PostgreSQL server (tests/postgres.py: Debian's `postgresql`, psycopg). Each
setting gets a fresh database; its workers are `nvib search` processes started together. Reported: wall time of the
whole search (process start to last exit), the time from the first trial's start to the last trial's end
(trials per minute over that span), and the mean evaluation time of a trial.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import optuna
import yaml
from attention_speed import update_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres import create_database, missing, postgres_server  # noqa: E402

from nvib.workflow.run import Run  # noqa: E402
from nvib.workflow.settings import RunConfig  # noqa: E402

RESULTS = Path(__file__).parent / "RESULTS.md"


def demo_config(tmp: Path, storage: str, n_trials: int) -> Path:
    demo = Path(str(resources.files("nvib") / "demo_data"))
    raw = yaml.safe_load((demo / "demo.yaml").read_text())
    for key in ("train", "dev"):
        raw["data"][key] = str(demo / raw["data"][key])
    raw["data"]["test"] = {k: str(demo / v) for k, v in raw["data"]["test"].items()}
    raw["search"].update(storage=storage, study_name="bench", n_trials=n_trials)
    path = tmp / f"search-{abs(hash(storage))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_workers(config: Path, prior: Path, tmp: Path, n_workers: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nvib",
                "search",
                str(config),
                "--run-dir",
                str(tmp / f"w{n_workers}-{i}"),
                "--prior",
                str(prior),
                "--no-progress",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(n_workers)
    ]
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(out)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    if missing():
        raise SystemExit(missing())
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name, postgres_server() as server:
        tmp = Path(tmp_name)
        prior_run = Run(RunConfig.load(demo_config(tmp, server, args.n_trials)), tmp / "prior", progress=False)
        prior_run.prior()
        for n_workers in args.workers:
            storage = create_database(server, f"bench_{n_workers}")
            wall = run_workers(demo_config(tmp, storage, args.n_trials), prior_run.prior_path, tmp, n_workers)
            trials = [t for t in optuna.load_study(study_name="bench", storage=storage).trials if t.datetime_complete]
            done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
            span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
            per_trial = statistics.mean(t.user_attrs["wall_time_s"] for t in done)
            workers = len({t.user_attrs["worker"] for t in done})
            rows.append((n_workers, workers, len(done), wall, span, 60 * len(done) / span, per_trial))
            print(rows[-1], flush=True)
    cpu = f"{os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    lines = [
        "## search_workers.py",
        "",
        f"Search of the tour's toy config (MiniLM BERT2BERT, {args.n_trials} trials, slices 8/16 dev docstrings, "
        "16 new tokens) on one "
        f"PostgreSQL study; {cpu}, OMP_NUM_THREADS=1 per worker, machine shared with other jobs. "
        "`python benchmarks/search_workers.py`",
        "",
        "| workers | workers that ran trials | trials | wall time (s) | first-to-last trial (s) | trials/min "
        "| mean time per trial (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, used, count, wall, span, rate, per in rows:
        lines.append(f"| {n} | {used} | {count} | {wall:.1f} | {span:.1f} | {rate:.1f} | {per:.2f} |")
    update_section(RESULTS, "search_workers.py", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
