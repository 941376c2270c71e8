"""RUN/report.md with PNG plots: what a coordinator shows the consortium after a run."""
from __future__ import annotations

import logging
from pathlib import Path

from server.run_state import RunDirectory
from synth.atomic import atomic_path, write_atomic

log = logging.getLogger(__name__)

SKIP_KEYS = {"num-examples", "node_id"}
HEADLINE_METRICS = {"dice", "auc", "accuracy", "macro-f1", "c-index", "eval-loss"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(records: list[dict], getter) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for rec in records:
        for name, value in getter(rec).items():
            if isinstance(value, (int, float)):
                xs, ys = out.setdefault(name, ([], []))
                xs.append(rec["round"])
                ys.append(float(value))
    return out


_STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--")]


def _save_plot(path: Path, title: str, ylabel: str, series: dict[str, tuple[list[int], list[float]]],
               *, from_zero: bool = True, integer_y: bool = False) -> bool:
    """One line per series; markers and dashes differ, so identical series stay visible, and
    the y axis starts at 0 (at most 1 for a metric in [0, 1]) so that +0.04 looks like +0.04."""
    if not series:
        return False
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for i, (name, (xs, ys)) in enumerate(sorted(series.items())):
        marker, dashes = _STYLES[i % len(_STYLES)]
        ax.plot(xs, ys, marker=marker, linestyle=dashes, markersize=8 - 1.2 * (i % 4), label=name, alpha=0.85)
    values = [y for _, ys in series.values() for y in ys]
    if from_zero:
        top = 1.0 if max(values) <= 1.0 else max(values) * 1.1
        ax.set_ylim(min(0.0, min(values)), top)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if integer_y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return True


def evaluation_gaps(records: list[dict]) -> list[str]:
    """Why per-site metric curves are missing: each site that sent no evaluation, and why."""
    reasons: dict[str, set[str]] = {}
    for rec in records:
        for failure in rec.get("evaluate_failed", []):
            reasons.setdefault(failure["site"], set()).add(failure["reason"])
    evaluated = {s for r in records for s, e in r.get("sites", {}).items() if e.get("evaluate")}
    return [f"- **{site}** sent no evaluation metrics in {'any' if site not in evaluated else 'some'} round: "
            f"{'; '.join(sorted(why))}" for site, why in sorted(reasons.items())]


def _evaluation_section(records: list[dict]) -> list[str]:
    gaps = evaluation_gaps(records)
    if not gaps:
        return []
    scored = any(r.get("global") for r in records)
    why = ("a site refuses to release metrics over fewer validation patients than its "
           "`min_cases_for_metrics`")
    after = ("the coordinator's own validation set (`eval-data`) still scored every round." if scored else
             "this run has no `eval-data`, so no figure of model quality was measured at all.")
    return ["## Sites without evaluation metrics", "",
            f"Their curves are missing from the plots above ({why}); {after}", "", *gaps, ""]


def _metric_keys(records: list[dict]) -> list[str]:
    keys: set[str] = set()
    for rec in records:
        keys |= set(rec.get("global", {}))
        for entry in rec.get("sites", {}).values():
            keys |= set(entry.get("evaluate", {}))
    return sorted(k for k in keys if k in HEADLINE_METRICS)


def write_report(run: RunDirectory, title: str = "Federated run") -> Path:
    records = run.records()
    plots = run.root / "plots"
    lines = [f"# {title}", "", f"Run directory: `{run.root}`; {len(records)} complete round(s).", ""]
    shown: list[tuple[str, str]] = []
    for key in _metric_keys(records):
        # _series calls the getter before the next iteration; key is bound so the linter and the reader agree
        series = _series(records, lambda r, key=key: {"coordinator validation": r.get("global", {}).get(key)})
        per_site = _series(records, lambda r, key=key: {s: e.get("evaluate", {}).get(key)
                                                        for s, e in r.get("sites", {}).items()})
        series.update({f"site {s}": v for s, v in per_site.items()})
        name = f"metric-{key}.png"
        if _save_plot(plots / name, f"{key} per round", key, series):
            shown.append((f"{key} per round (global and per site)", name))
    eps = _series(records, lambda r: {s: e.get("train", {}).get("epsilon") for s, e in r.get("sites", {}).items()})
    if _save_plot(plots / "epsilon.png", "privacy spent per site (epsilon)", "epsilon", eps):
        shown.append(("epsilon spent per site", "epsilon.png"))
    sites = _series(records, lambda r: {"sites aggregated": r.get("num_sites")})
    if _save_plot(plots / "sites.png", "sites per round", "sites", sites, integer_y=True):
        shown.append(("sites per round", "sites.png"))
    for caption, name in shown:
        lines += [f"## {caption}", "", f"![{caption}](plots/{name})", ""]
    lines += _evaluation_section(records)
    if records:
        last = records[-1]
        lines += ["## Final figures", "", f"After round {last['round']}:", "",
                  "| site | metric | value |", "|---|---|---|"]
        for key, value in sorted(last.get("global", {}).items()):
            lines.append(f"| coordinator validation set | {key} | {value:.4f} |")
        for site, entry in sorted(last.get("sites", {}).items()):
            for key, value in sorted(entry.get("evaluate", {}).items()):
                if key not in SKIP_KEYS:
                    lines.append(f"| {site} | {key} | {value:.4f} |")
            eps_v = entry.get("train", {}).get("epsilon")
            if eps_v is not None:
                lines.append(f"| {site} | epsilon spent | {eps_v:.3f} |")
        noisy = [(r["round"], s) for r in records for s in r.get("noise_dominated", [])]
        if noisy:
            lines += ["", "## Sites whose privacy budget is spent", "",
                      "Their updates were mostly noise (noise multiplier >= 10): give them a new model "
                      "(a fresh budget) or leave them out.", ""]
            lines += [f"- round {rnd}: **{site}**" for rnd, site in noisy]
        missing = sorted({f["site"] for r in records for f in r.get("failed", [])})
        if missing:
            lines += ["", "## Sites that failed or timed out", ""]
            for rec in records:
                for f in rec.get("failed", []):
                    lines.append(f"- round {rec['round']}: **{f['site']}**: {f['reason']}")
        lines += ["", "## Time per round", "", "| round | sites | seconds |", "|---|---|---|"]
        lines += [f"| {r['round']} | {r.get('num_sites')} | {r.get('seconds', 0):.1f} |" for r in records]
    path = run.root / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path
