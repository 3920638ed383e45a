"""Start-up time of the command line: `nvib --help`, every `nvib <command> --help`, what `import nvib.cli` imports.

    python benchmarks/cli_speed.py [--n 5] [--baseline-src /path/to/other/checkout/src]

Each help is timed as a fresh `python -m nvib ... --help` process (wall clock, best and median of --n runs), beside
`python -c pass` (the interpreter's own start-up). `python -X importtime -c "import nvib.cli"` gives the modules
that cost the most. --baseline-src times `nvib --help` on another checkout's code too (PYTHONPATH=that src), in the
same run, so a loaded machine slows both alike. Target: every help under 1 s. Writes the `## cli_speed.py` section
of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from attention_speed import update_section

from nvib.cli import app

TARGET_S = 1.0


def commands() -> list[str]:
    """The visible commands of `nvib`, in their help order."""
    return [c.name or c.callback.__name__ for c in app.registered_commands if not c.hidden]


def timings(argv: list[str], n: int, env: dict[str, str]) -> tuple[list[float], list[float]]:
    """(wall-clock seconds, CPU seconds: user + system) of ``n`` runs of ``argv`` (each must exit 0)."""
    walls, cpus = [], []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return walls, cpus


def import_profile(env: dict[str, str], top: int) -> tuple[float, list[tuple[str, float, float]]]:
    """(total ms, the ``top`` modules by cumulative ms as (module, self ms, cumulative ms)) of ``import nvib.cli``."""
    argv = [sys.executable, "-X", "importtime", "-c", "import nvib.cli"]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "self [us]" in line:
            continue
        own, cumulative, name = line[len("import time:") :].split("|")
        rows.append((name.rstrip(), int(own) / 1000, int(cumulative) / 1000))
    total = sum(own for _, own, _ in rows)
    return total, sorted(rows, key=lambda r: -r[2])[:top]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5, help="runs per command (best and median reported)")
    parser.add_argument("--top", type=int, default=12, help="modules listed from -X importtime")
    parser.add_argument("--baseline-src", type=Path, help="another checkout's src/ to time `nvib --help` on")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    python = [sys.executable]
    load = os.getloadavg()[0]

    rows = [("`python -c pass` (interpreter start-up)", *timings([*python, "-c", "pass"], args.n, env))]
    for cmd in [None, *commands()]:
        label = f"`nvib {cmd} --help`" if cmd else "`nvib --help`"
        rows.append((label, *timings([*python, "-m", "nvib", *([cmd] if cmd else []), "--help"], args.n, env)))
        print(f"{label}: best {min(rows[-1][1]):.2f} s", flush=True)
    if args.baseline_src is not None:
        old = {**env, "PYTHONPATH": str(args.baseline_src.resolve())}
        label = f"`nvib --help`, code of {args.baseline_src}"
        rows.append((label, *timings([*python, "-m", "nvib", "--help"], args.n, old)))
        print(f"{label}: best {min(rows[-1][1]):.2f} s", flush=True)
    total, modules = import_profile(env, args.top)
    load_after = os.getloadavg()[0]

    helps = [(wall, cpu) for label, wall, cpu in rows if label.startswith("`nvib") and "code of" not in label]
    worst = max(statistics.median(wall) for wall, _ in helps)
    worst_cpu = max(statistics.median(cpu) for _, cpu in helps)
    lines = [
        "## cli_speed.py",
        "",
        f"Wall time of fresh `python -m nvib ... --help` processes, best and median of {args.n}; "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load average "
        f"{load:.1f} at the start and {load_after:.1f} at the end (a loaded machine: times on an idle one are "
        f"shorter; the CPU time, user + system, is what one idle core would take). Target: every help under "
        f"{TARGET_S:g} s; the slowest median here is {worst:.2f} s wall, {worst_cpu:.2f} s CPU.",
        "",
        f"Command: `python benchmarks/cli_speed.py --n {args.n}"
        + (f" --baseline-src {args.baseline_src}`" if args.baseline_src else "`"),
        "",
        "| command | best wall (s) | median wall (s) | median CPU (s) |",
        "|---|---|---|---|",
        *(
            f"| {label} | {min(wall):.2f} | {statistics.median(wall):.2f} | {statistics.median(cpu):.2f} |"
            for label, wall, cpu in rows
        ),
        "",
        f'`python -X importtime -c "import nvib.cli"`: {total:.0f} ms in all (one run), the {len(modules)} '
        "modules with the largest cumulative time:",
        "",
        "| module | self (ms) | cumulative (ms) |",
        "|---|---|---|",
        *(f"| {name.strip()} | {own:.1f} | {cumulative:.1f} |" for name, own, cumulative in modules),
    ]
    body = "\n".join(lines) + "\n"
    print(body)
    update_section(args.results, "cli_speed.py", body)


if __name__ == "__main__":
    main()
