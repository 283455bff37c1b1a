"""`report.md` and charts of `her eval judge`: every judge side by side, each rate with its 95% interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._agreement import CALIBRATION_BINS

ACCURACY_CHART = "judge_accuracy.png"
FLAW_KIND_CHART = "judge_accuracy_by_flaw_kind.png"
RELIABILITY_CHART = "judge_reliability.png"

# (key in a judge's metrics, title, what it counts)
RATE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("accuracy", "Accuracy", "verdict == label, over pairs judged ok"),
    ("accuracy_errors_as_wrong", "Accuracy, errors counted wrong", "verdict == label, over all pairs"),
    ("swap_consistency", "Swap consistency", "ok verdicts whose two presentation orders agree"),
    ("first_slot_win_rate", "First-slot win rate",
     "single orders with a non-tie winner where the candidate shown first won (ideal 0.5)"),
    ("prefer_longer_rate", "Prefer-longer rate",
     "ok non-tie verdicts on pairs of unequal length that picked the longer reply"),
    ("tie_rate", "Tie rate", "ok verdicts that are ties"),
    ("errors", "Parse failures / errors", "pairs without a verdict, over all pairs (count = hits)"),
)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ci(r: dict[str, Any]) -> str:
    return "n/a" if r["ci95"] is None else f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def _cell(r: dict[str, Any] | None) -> str:
    """A compact "value [lo, hi] (hits/n)" cell for group tables."""
    if r is None:
        return "–"
    return f"{_fmt(r['value'])} {_ci(r)} ({r['hits']}/{r['n']})"


def _worst(worst: dict[str, Any] | None) -> str:
    return "–" if worst is None else f"{worst['family']}: {_cell(worst)}"


def render_judge_markdown(summary: dict[str, Any], charts: list[tuple[str, str]]) -> str:
    judges = summary["judges"]
    lines = [
        "# Judge agreement on labelled pairs",
        "",
        f"- pairs: {summary['pairs']}" + (f" from `{summary['pairs_file']}`" if summary["pairs_file"] else ""),
        f"- modes: {', '.join(summary['modes'])}; swap: {'on' if summary['swap'] else 'off'}; "
        f"engine: {summary['engine']}",
        "- intervals are 95% Wilson score intervals; a judge error is counted as an error, never as an answer.",
        "",
        "| Judge | Mode | Model | Engine | Principle detail | Judged ok | Worst family: accuracy | Seconds | "
        "Prompt tokens |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {j['name']} | {j['mode']} | `{j['model']}` | {j['engine']} | {j['principle_detail']} | "
          f"{j['metrics']['judged_ok']}/{j['metrics']['pairs']} | {_worst(j['metrics'].get('worst_family'))} | "
          f"{j['seconds']:.1f} | {j['usage']['prompt_tokens']} |" for j in judges),
        "",
    ]
    for key, title, meaning in RATE_METRICS:
        lines += [f"## {title}", "", f"{meaning}.", "", "| Judge | Value | 95% CI | Hits | Counted |",
                  "|---|---|---|---|---|"]
        for j in judges:
            r = j["metrics"][key]
            lines.append(f"| {j['name']} | {_fmt(r['value'])} | {_ci(r)} | {r['hits']} | {r['n']} |")
        lines.append("")
    lines += ["## By pair family", "",
              "Each family is one way the losing reply was made (`source` of the pairs); a judge is as good as its "
              "worst family. Cells: rate [95% CI] (hits/counted).", "",
              "| Family | Judge | Accuracy | Swap consistency | First-slot win rate |", "|---|---|---|---|---|"]
    for family in sorted({f for j in judges for f in j["metrics"]["by_family"]}):
        for j in judges:
            f = j["metrics"]["by_family"].get(family)
            if f is not None:
                lines.append(f"| {family} | {j['name']} | {_cell(f['accuracy'])} | {_cell(f['swap_consistency'])} | "
                             f"{_cell(f['first_slot_win_rate'])} |")
    lines.append("")
    for key, title in (("by_flaw_kind", "Accuracy by flaw kind"), ("by_pattern", "Accuracy by label pattern")):
        groups = sorted({g for j in judges for g in j["metrics"][key]})
        lines += [f"## {title}", "", "Cells: accuracy [95% CI] (right/judged ok).", "",
                  "| Group | " + " | ".join(j["name"] for j in judges) + " |",
                  "|---|" + "---|" * len(judges)]
        for g in groups:
            lines.append(f"| {g} | " + " | ".join(_cell(j["metrics"][key].get(g)) for j in judges) + " |")
        lines.append("")
    lines += ["## Calibration of P(a≻b)", "",
              "Over ok verdicts of pairs labelled a or b: ECE (count-weighted |share labelled a − mean P(a≻b)| "
              f"over {CALIBRATION_BINS} equal-width bins; 0 is perfect) and Brier score (mean squared error; "
              "0.25 is a constant 0.5).", "",
              "| Judge | Mode | ECE | Brier | Counted |", "|---|---|---|---|---|"]
    for j in judges:
        cal = j["metrics"]["calibration"]
        lines.append(f"| {j['name']} | {j['mode']} | {_fmt(cal['ece'])} | {_fmt(cal['brier'])} | {cal['n']} |")
    lines.append("")
    for name, alt in charts:
        lines += [f"![{alt}]({name})", ""]
    return "\n".join(lines)


def _bars(ax: Any, x: float, width: float, rates: list[dict[str, Any]], label: str, color: str | None) -> None:
    """One bar per rate at x + i, with asymmetric CI whiskers; a rate without data is an empty 'n/a'."""
    values = [r["value"] if r["value"] is not None else 0.0 for r in rates]
    low = [v - r["ci95"][0] if r["ci95"] else 0.0 for v, r in zip(values, rates, strict=True)]
    high = [r["ci95"][1] - v if r["ci95"] else 0.0 for v, r in zip(values, rates, strict=True)]
    xs = [x + i for i in range(len(rates))]
    bars = ax.bar(xs, values, width, yerr=[low, high], capsize=4, label=label, color=color)
    for bar, r in zip(bars, rates, strict=True):
        text = "n/a" if r["value"] is None else f"{r['value']:.2f}\nn={r['n']}"
        top = r["ci95"][1] if r["ci95"] else 0.0  # above the whisker
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, top + 0.01), ha="center", va="bottom", fontsize=7)


def _save(fig: Any, ax: Any, ylabel: str, title: str, path: Path) -> None:
    ax.set_ylim(0, 1.18)  # room above 1.0 for the legend
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render_judge_charts(summary: dict[str, Any], out_dir: Path) -> list[tuple[str, str]]:
    """Accuracy per judge (ok-only and errors-as-wrong) and accuracy by flaw kind; (file, title) pairs."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    judges = summary["judges"]
    names = [j["name"] for j in judges]
    charts = []

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(judges) + 2), 4.5))
    try:
        _bars(ax, -0.2, 0.4, [j["metrics"]["accuracy"] for j in judges], "over pairs judged ok", "#4c72b0")
        _bars(ax, 0.2, 0.4, [j["metrics"]["accuracy_errors_as_wrong"] for j in judges],
              "errors counted wrong", "#c44e52")
        ax.set_xticks(range(len(names)), names)
        _save(fig, ax, "accuracy (95% Wilson CI)",
              f"Judge accuracy on {summary['pairs']} labelled pairs", out_dir / ACCURACY_CHART)
        charts.append((ACCURACY_CHART, "Accuracy per judge"))
    finally:
        plt.close(fig)

    kinds = sorted({k for j in judges for k in j["metrics"]["by_flaw_kind"]})
    empty = {"value": None, "ci95": None, "n": 0, "hits": 0}
    width = 0.8 / len(judges)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(kinds) * len(judges) + 2), 4.5))
    try:
        for i, j in enumerate(judges):
            rates = [j["metrics"]["by_flaw_kind"].get(k, empty) for k in kinds]
            _bars(ax, -0.4 + width * (i + 0.5), width, rates, j["name"], None)
        ax.set_xticks(range(len(kinds)), kinds, rotation=20, ha="right", fontsize=8)
        _save(fig, ax, "accuracy over pairs judged ok (95% CI)", "Judge accuracy by flaw kind",
              out_dir / FLAW_KIND_CHART)
        charts.append((FLAW_KIND_CHART, "Accuracy by flaw kind"))
    finally:
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    try:
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
        for j in judges:
            cal = j["metrics"]["calibration"]
            if not cal["bins"]:
                continue
            xs = [b["mean_p"] for b in cal["bins"]]
            ys = [b["observed"] for b in cal["bins"]]
            sizes = [12 + 120 * b["n"] / cal["n"] for b in cal["bins"]]
            ece = "n/a" if cal["ece"] is None else f"{cal['ece']:.3f}"
            line = ax.plot(xs, ys, linewidth=1)[0]
            ax.scatter(xs, ys, s=sizes, color=line.get_color(), label=f"{j['name']} (ECE {ece}, n={cal['n']})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.18)
        ax.set_xlabel("mean predicted P(a≻b) in the bin")
        ax.set_ylabel("share of pairs labelled a")
        ax.set_title("Reliability of P(a≻b) (marker size: pairs in the bin)")
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        fig.savefig(out_dir / RELIABILITY_CHART, dpi=110)
        charts.append((RELIABILITY_CHART, "Reliability curve"))
    finally:
        plt.close(fig)
    return charts


def write_judge_report(out_dir: Path, summary: dict[str, Any]) -> None:
    """Write the charts and report.md for the contents of metrics.json."""
    charts = render_judge_charts(summary, out_dir)
    (out_dir / "report.md").write_text(render_judge_markdown(summary, charts), encoding="utf-8")
