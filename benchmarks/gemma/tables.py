"""Markdown section `## gemma` of the results file: one table per domain, then knobs, prior mass and cost."""

from __future__ import annotations

SYSTEMS = ("unconverted", "NV tuned", "NV tuned, prior only", "temperature", "target demos", "NV + target demos",
           "NV + target demos, prior only")  # fmt: skip


def _delta(entry: dict, name: str, digits: int) -> str:
    if f"delta_{name}" not in entry:
        return ""
    lo, hi = entry[f"ci_{name}"]
    return f" (Δ {entry[f'delta_{name}']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}])"


def _knobs(knobs: dict) -> str:
    return ", ".join(f"{k.replace('alpha_tau_d', 'τα').replace('stdev_tau_d', 'τσ')}={v:.2f}" for k, v in knobs.items())


def _mass(mass: dict) -> str:
    return ", ".join(f"{v:.3f}" for v in mass.values()) or "–"


def _move(search: dict) -> str:
    """Dev NLL of the identity trial (knobs that leave the model unchanged, tried first) → the best trial's."""
    if not search:
        return "–"
    return f"{search['first_value']:.3f} → {search['best_value']:.3f}"


def render(rows: dict, details: dict, meta: dict, section: str = "gemma", against: dict | None = None) -> str:
    b = meta["budget"]
    label = " --quick" if meta["quick"] else ""
    lines = [
        f"## {section}",
        "",
        f"Gemma 3 270M few-shot benchmark (`python benchmarks/gemma/experiment.py{label}`"
        f"{', REDUCED BUDGET: not the protocol sizes' if meta['quick'] else ''}): a fixed 3-shot prompt of Debian "
        f'descriptions → synopsis is the in-domain "training"; inputs cut to {b["max_input_tokens"]} tokens; '
        f"greedy, ≤ {b['max_new_tokens']} new tokens, stopped at the newline. Knobs tuned per domain on its dev pairs "
        f"({b['trials']} Optuna trials per tuned system, objective = mean target NLL; τα in [-3, 3] and the identity "
        f"point 10, τσ in {b.get('stdev_range', [0.0, 2.0] if 'stdev_unit' in b else [0.0, 0.5])}"
        f"{' nats of score-bias spread (docs/method.md §12)' if 'stdev_unit' in b else ' (docs/method.md §3 unit)'}"
        f"{' (post-hoc range)' if 'stdev_range' in b else ''}), scored on its test pairs. "
        "ROUGE-L F1 ×100, NLL in nats per target token (lower is better); Δ = system − unconverted with the 95% "
        "paired bootstrap interval (1000 resamples). distinct = distinct predictions / n, top = share of the most "
        f"frequent prediction, d2 = distinct-2. Wall time {meta['seconds'] / 60:.1f} min with {meta['threads']} "
        f"threads on a shared machine (load average at the end {meta['load_average'][1]:.1f}).",
        "",
    ]
    for domain, row in rows.items():
        d = details[domain]
        lines += [
            f"### {domain} ({d['n_dev']} dev, {d['n_test']} test)",
            "",
            "| system | ROUGE-L | NLL | distinct | top | d2 |",
            "|---|---|---|---|---|---|",
        ]
        for system in SYSTEMS:
            if system not in row:
                continue
            e = row[system]
            same = " (= unconverted)" if domain == "debian" and system == "target demos" else ""
            same = " (= NV tuned)" if domain == "debian" and system == "NV + target demos" else same
            same = " (= NV tuned, prior only)" if domain == "debian" and system.endswith("demos, prior only") else same
            lines.append(
                f"| {system}{same} | {e['rougeL']:.2f}{_delta(e, 'rougeL', 2)} | {e['nll']:.3f}{_delta(e, 'nll', 3)} "
                f"| {e['distinct']:.2f} | {e['top_share']:.2f} | {e['distinct_2']:.2f} |"
            )
        lines.append("")
    lines += [
        "| domain | NV knobs | prior mass | temperature | NV + target demos knobs | prior mass | "
        "dev NLL, identity trial → best: NV / temperature / NV + target demos | s per trial (NV) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for domain, d in details.items():
        s = d["search"]
        nv, temp, nvt = s.get("NV tuned", {}), s.get("temperature", {}), s.get("NV + target demos", {})
        secs = nv.get("trial_seconds") or [0.0]
        lines.append(
            f"| {domain} | {_knobs(d['nv_knobs'])} | {_mass(d['nv_prior_mass'])} | {d['temperature']:.2f} | "
            f"{_knobs(d['nv_target_knobs'])} | {_mass(d['nv_target_prior_mass'])} | "
            f"{_move(nv)} / {_move(temp)} / {_move(nvt)} | "
            f"{sum(secs) / len(secs):.0f} |"
        )
    if against:
        lines += ["", "NV against temperature, paired on the same test pairs: Δ = NV − temperature [95% interval].", "",
                  "| domain | system | ΔROUGE-L | ΔNLL |", "|---|---|---|---|"]  # fmt: skip
        for domain, systems in against.items():
            for s in SYSTEMS:
                if s in systems:
                    e = systems[s]
                    lines.append(f"| {domain} | {s} | {_delta(e, 'rougeL', 2)[3:-1]} | {_delta(e, 'nll', 3)[3:-1]} |")
    prior_only = [(domain, s, *v) for domain, d in details.items() for s, v in d.get("prior_only", {}).items()]
    if prior_only:
        lines += ["", "Prior only: the best τσ = 0 trial of each NV study (scored on test above).", "",
                  "| domain | study | knobs | prior mass |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {domain} | {s} | {_knobs(k)} | {_mass(m)} |" for domain, s, k, m in prior_only]
    checks = meta["checks"]
    phases = ", ".join(f"{k} {v['wall'] / 60:.1f} ({v['cpu'] / 60:.1f})" for k, v in meta["phases"].items())
    lines += [
        "",
        f"Checks: prefix-shared vs unshared NLL, stock {checks['stock']['nll_gap']:.1e} / "
        f"{checks['stock']['evaluate_nll_gap']:.1e} nats/token, NV regularised "
        f"{checks['nv']['regularised']['nll_gap']:.1e} / {checks['nv']['regularised']['evaluate_nll_gap']:.1e}; "
        f"greedy identical: {checks['stock']['greedy_identical'] and checks['nv']['regularised']['greedy_identical']}; "
        f"NV at the identity knobs vs stock: {checks['nv']['identity_nll_gap']:.1e} nats/token. Wall minutes per "
        f"phase (process CPU minutes): {phases}; CPU total {meta['cpu_seconds'] / 60:.1f} min (on idle cores the wall "
        f"time would be about CPU / {meta['threads']}).",
        "",
    ]
    return "\n".join(lines)


def _compare(entry: dict) -> str:
    """'better' / 'worse' / 'no different' from the 95% interval of Δ NLL (lower NLL is better)."""
    lo, hi = entry["ci_nll"]
    return "better than" if hi < 0 else "worse than" if lo > 0 else "no different from"


def _interval(entry: dict) -> str:
    lo, hi = entry["ci_nll"]
    return f"Δ NLL {entry['delta_nll']:+.4f} [{lo:+.4f}, {hi:+.4f}] nats/token"


def verdict(rows: dict, against: dict) -> str:
    """One sentence per domain: tuned NV against the unconverted model and against the attention temperature (95%
    paired-bootstrap intervals of Δ target NLL), then the count over domains."""
    lines, wins_stock, wins_temperature = [], 0, 0
    for domain, systems in rows.items():
        nv, vs_t = systems["NV tuned"], against[domain]["NV tuned"]
        wins_stock += nv["ci_nll"][1] < 0
        wins_temperature += vs_t["ci_nll"][1] < 0
        lines.append(
            f"- {domain}: NV tuned is {_compare(nv)} the unconverted model ({_interval(nv)}) and {_compare(vs_t)} "
            f"the attention temperature ({_interval(vs_t)})."
        )
    n = len(rows)
    lines.append(
        f"Verdict: tuned NV beat the unconverted model on {wins_stock} of {n} domains and the one-knob attention "
        f"temperature on {wins_temperature} of {n} (a win: the whole 95% interval of Δ NLL below 0)."
    )
    return "\n".join(lines)
