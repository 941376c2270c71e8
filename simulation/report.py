"""RUN/report.md of a simulation: sites, rounds, comparisons, privacy, time; with plots."""
from __future__ import annotations

import math
from pathlib import Path

from server.report import write_report as write_federation_report
from server.run_state import RunDirectory
from synth.atomic import write_atomic


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _bar_plot(path: Path, table: dict[str, dict[str, float]], metric: str) -> None:
    """Grouped bars per hospital; the legend sits beside the axes (it covered a bar), and the
    y axis runs from 0 to 1 for a metric in [0, 1], so a small difference looks small."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    methods = list(table)
    sites = sorted({s for row in table.values() for s in row})
    fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        ys = [table[m].get(s, float("nan")) for s in sites]
        ax.bar(np.arange(len(sites)) + i * width, ys, width, label=m)
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2)
    ax.set_xticklabels(sites)
    values = [v for row in table.values() for v in row.values() if not math.isnan(v)]
    if values and min(values) >= 0 and max(values) <= 1:
        ax.set_ylim(0, 1)
    ax.set_ylabel(f"{metric} on held-out cases")
    ax.set_title("comparisons on each hospital's held-out cases")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# (challenger, baseline, what the comparison asks); rows missing from the table are skipped.
COMPARISONS = (
    ("federated (DP)", "local alone (DP)", "Federated vs {site} alone"),
    ("federated (DP)", "pretrained heads, no fine-tuning", "Federated vs no fine-tuning at {site}"),
    ("pooled (DP)", "pooled (no DP)", "DP vs no DP (pooled) at {site}"),
    ("pooled, pretrained backbone (DP)", "pooled, scratch backbone (DP)",
     "Pretrained vs scratch backbone (pooled) at {site}"),
)


def _direction(a: float, b: float, tie_below: float) -> str:
    if math.isnan(a) or math.isnan(b):
        return "not measured"
    if abs(a - b) < tie_below:
        return "tie (within the noise)"
    return "better" if a > b else "WORSE"


def verdicts(table: dict[str, dict[str, float]], tie_below: float) -> list[str]:
    """Every comparison at every site and on the mean, in both directions: a loss is said as plainly as a
    win, and a difference smaller than `tie_below` (one held-out case) is called a tie."""
    lines = []
    for challenger, baseline, question in COMPARISONS:
        ch, ba = table.get(challenger), table.get(baseline)
        if not ch or not ba:
            continue
        sites = sorted(set(ch) & set(ba))
        for site in sites:
            lines.append(f"- {question.format(site=site)}: {_direction(ch[site], ba[site], tie_below)} "
                         f"({_fmt(ch[site])} vs {_fmt(ba[site])}).")
        if sites:
            mc = sum(ch[s] for s in sites) / len(sites)
            mb = sum(ba[s] for s in sites) / len(sites)
            lines.append(f"- {question.format(site='the mean over sites')}: "
                         f"{_direction(mc, mb, tie_below / math.sqrt(len(sites)))} ({_fmt(mc)} vs {_fmt(mb)}).")
    return lines


def audit_section(audit: dict | None) -> list[str]:
    """The report's lines on the empirical privacy audit of one site (`simulation.runner.audit_one_site`)."""
    lines = ["## Privacy audit (one site)", ""]
    if audit is None:
        return lines + ["Not run (`audit: false` in the simulation config; it is on by default, about 10 s).", ""]
    if "skipped" in audit:
        return lines + [f"Not run for {audit['site']}: {audit['skipped']}.", ""]
    lines += [f"`pasta-fed privacy audit` on {audit['site']}: its own DP training path (planning, clipping, noise, "
              f"outbox) on a separate ledger, with {audit['canaries']} synthetic canaries each included with "
              f"probability 1/2 ({audit['included']} were), guessed from the released head alone.", "",
              "| site | canaries | correct guesses | confidence | epsilon lower bound | ledger's epsilon | verdict |",
              "|---|---|---|---|---|---|---|",
              f"| {audit['site']} | {audit['canaries']} | {audit['correct']} of {audit['guesses']} | "
              f"{audit['confidence']:.0%} | {audit['epsilon_lower_bound']:.3f} | {audit['claimed_epsilon']:.3f} | "
              f"{audit['verdict']} |", "",
              "![privacy audit](plots/privacy-audit.png)", "",
              f"- A lower bound, not a proof: below the claim it says this attack found no leak; above it, the "
              f"implementation releases more than its ledger charges. It took {audit['seconds']:.1f} s (on by "
              f"default; `audit: false` turns it off). Details: `privacy-audit.json`, docs/privacy.md.", ""]
    return lines


def write_simulation_report(run_dir: Path, *, config: dict, sites: list[dict], table: dict[str, dict[str, float]],
                            metric: str, timings: dict[str, float],
                            audit: dict | None = None) -> Path:
    run = RunDirectory(run_dir)
    fed_report = write_federation_report(run, title="Federated rounds")   # writes plots/ too
    fed_body = fed_report.read_text(encoding="utf-8").split("\n", 1)[1]
    plots = run_dir / "plots"
    _bar_plot(plots / "comparisons.png", table, metric)
    lines = ["# PASTA-Fed simulation report", "",
             f"{len(sites)} simulated hospitals, task `{config['task']}`, preset `{config['preset']}`, "
             f"{config['rounds']} rounds, epsilon budget {config['epsilon']} per site (delta {config['delta']}), "
             f"strategy {config['strategy']}, seed {config['seed']}.", "",
             "## Hospitals", "",
             "| " + " | ".join(sites[0]) + " |", "|" + "---|" * len(sites[0])]
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in sites]
    sites_names = sorted({s for row in table.values() for s in row})
    lines += ["", f"## Comparisons ({metric} on each hospital's held-out cases)", "",
              "| method | " + " | ".join(sites_names) + " | mean |", "|---|" + "---|" * (len(sites_names) + 1)]
    for method, row in table.items():
        vals = [row.get(s, float("nan")) for s in sites_names]
        finite = [v for v in vals if not math.isnan(v)]
        mean = sum(finite) / len(finite) if finite else float("nan")
        lines.append(f"| {method} | " + " | ".join(_fmt(v) for v in vals) + f" | {_fmt(mean)} |")
    lines += ["", "![comparisons](plots/comparisons.png)", "", "### What this shows", ""]
    n_held = config.get("heldout_cases", 0)
    tie_below = 1 / n_held if n_held else 0.0
    if n_held:
        lines += [f"Each hospital has {n_held} held-out cases, so one case moves a figure by {tie_below:.2f}: "
                  f"differences smaller than that are called ties.", ""]
    lines += verdicts(table, tie_below) or ["- (no comparison configured)"]
    lines += [""] + audit_section(audit)
    lines += ["", "## Time", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += ["", fed_body]
    path = run_dir / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path
