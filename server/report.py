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


def _save_plot(path: Path, title: str, ylabel: str, series: dict[str, tuple[list[int], list[float]]]) -> bool:
    if not series:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for name, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, marker="o", label=name)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return True


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
    if _save_plot(plots / "sites.png", "sites per round", "sites", sites):
        shown.append(("sites per round", "sites.png"))
    for caption, name in shown:
        lines += [f"## {caption}", "", f"![{caption}](plots/{name})", ""]

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
