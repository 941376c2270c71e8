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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    methods = list(table)
    sites = sorted({s for row in table.values() for s in row})
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        ys = [table[m].get(s, float("nan")) for s in sites]
        ax.bar(np.arange(len(sites)) + i * width, ys, width, label=m)
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2)
    ax.set_xticklabels(sites)
    ax.set_ylabel(f"{metric} on held-out cases")
    ax.set_title("comparisons on each hospital's held-out cases")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def verdicts(table: dict[str, dict[str, float]], small_sites: list[str]) -> list[str]:
    lines = []
    fed, local = table.get("federated (DP)", {}), table.get("local alone (DP)", {})
    if fed and local:
        for s in small_sites:
            f, l = fed.get(s, float("nan")), local.get(s, float("nan"))
            ok = f > l
            lines.append(f"- Federated {'beats' if ok else 'does NOT beat'} {s} alone on its held-out cases "
                         f"({_fmt(f)} vs {_fmt(l)}).")
    pre, scr = table.get("pooled, pretrained backbone (DP)"), table.get("pooled, scratch backbone (DP)")
    if pre and scr:
        mp = sum(pre.values()) / len(pre)
        ms = sum(scr.values()) / len(scr)
        lines.append(f"- The pretrained backbone {'beats' if mp > ms else 'does NOT beat'} a randomly initialised "
                     f"one (mean over sites {_fmt(mp)} vs {_fmt(ms)}).")
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
                            metric: str, timings: dict[str, float], small_sites: list[str],
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
    lines += verdicts(table, small_sites) or ["- (no comparison configured)"]
    n_held = config.get("heldout_cases", 0)
    if n_held:
        lines += [f"- Each hospital has {n_held} held-out cases: differences below about {1 / n_held:.2f} "
                  f"are within the noise of one case, and the verdicts above should be read with that in mind."]
    lines += [""] + audit_section(audit)
    lines += ["", "## Time", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += ["", fed_body]
    path = run_dir / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path
