"""Fold finished samples into ``results.json``, ``report.md`` and a bar chart (``scores.png``).

Means are taken per run over the samples with status ``ok`` (errors are counted, never scored as 0),
then across runs. With three runs or more each metric gets a 95% confidence interval over the run
means (Student's t; scipy when installed, else a built-in table of t quantiles).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from her_genrm import DIMENSION_TITLES, TRANSCRIPT_DIMENSIONS

from ._runner import RunOutcome, load_sample, sample_path, write_json_atomic

MIN_RUNS_FOR_CI = 3
OVERLAP_METRICS: tuple[str, ...] = ("bleu", "rouge_l", "coser_bleu", "coser_rouge_l")
METRICS: tuple[str, ...] = (*TRANSCRIPT_DIMENSIONS, "average", *OVERLAP_METRICS)
TITLES: dict[str, str] = {
    **DIMENSION_TITLES,
    "average": "Average",
    "bleu": "BLEU",
    "rouge_l": "ROUGE-L",
    "coser_bleu": "BLEU (CoSER, 0–1)",
    "coser_rouge_l": "ROUGE-L (CoSER, 0–1)",
}
COST_ROLES: tuple[str, ...] = ("actor", "environment", "predictor", "judge")
CHART_METRICS: tuple[str, ...] = (*TRANSCRIPT_DIMENSIONS, "average")
CHART_NAME = "scores.png"

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: 1.96).
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    try:
        from scipy import stats  # optional: exact for any df
    except ImportError:
        return _T975[df - 1] if df <= len(_T975) else 1.96
    return float(stats.t.ppf(0.975, df))


def mean_ci(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, half-width of the 95% CI); the half-width is None below three values."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    if len(values) < MIN_RUNS_FOR_CI:
        return mean, None
    half = t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, half


def collect(out_dir: Path, sample_ids: Sequence[str], runs: int) -> list[dict[str, Any]]:
    """The finished records of the given samples and runs (missing ones are skipped)."""
    records = []
    for run in range(runs):
        for sid in sample_ids:
            rec = load_sample(sample_path(out_dir, run, sid))
            if rec is not None:
                records.append(rec)
    return records


def summarise(records: Sequence[dict[str, Any]], runs: int) -> dict[str, Any]:
    """Per metric: mean and CI across run means, the run means, and how many samples counted."""
    summary: dict[str, Any] = {}
    for metric in METRICS:
        run_means = []
        counted = 0
        for run in range(runs):
            values = [
                r.get(metric) if metric not in TRANSCRIPT_DIMENSIONS else r["scores"].get(metric)
                for r in records
                if r["run"] == run and r["status"] == "ok"
            ]
            present = [float(v) for v in values if v is not None]
            counted += len(present)
            if present:
                run_means.append(statistics.fmean(present))
        mean, half = mean_ci(run_means)
        summary[metric] = {
            "mean": _r(mean),
            "ci95": _r(half),
            "run_means": [_r(m) for m in run_means],
            "n": counted,
        }
    return summary


def cost(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Engine requests, tokens and seconds summed over the finished samples."""
    out: dict[str, Any] = {}
    for role in COST_ROLES:
        out[role] = {
            k: sum(r["usage"].get(role, {}).get(k, 0) for r in records)
            for k in ("calls", "prompt_tokens", "completion_tokens")
        }
    out["sample_seconds"] = round(sum(r["usage"]["seconds"] for r in records), 3)
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def build_results(
    out_dir: Path, sample_ids: Sequence[str], runs: int, outcome: RunOutcome, manifest: dict[str, Any]
) -> dict[str, Any]:
    records = collect(out_dir, sample_ids, runs)
    rows = [
        {
            "sample_id": r["sample_id"],
            "run": r["run"],
            "book": r["book"],
            "i_p": r["i_p"],
            "i_c": r["i_c"],
            **{d: r["scores"].get(d) for d in TRANSCRIPT_DIMENSIONS},
            "average": r["average"],
            **{m: r.get(m) for m in OVERLAP_METRICS},
            "status": r["status"],
            "error": r["error"],
            "actor_rounds": r["actor_rounds"],
        }
        for r in records
    ]
    return {
        "manifest": manifest,
        "runs": runs,
        "samples_expected": len(sample_ids) * runs,
        "samples_ok": sum(1 for r in records if r["status"] == "ok"),
        "samples_error": sum(1 for r in records if r["status"] == "error"),
        "samples_failed": outcome.failed,
        "summary": summarise(records, runs),
        "cost": {
            **cost(records),
            "this_invocation": {
                "computed": len(outcome.computed),
                "skipped": len(outcome.skipped),
                "wall_seconds": outcome.seconds,
            },
        },
        "samples": rows,
    }


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_markdown(results: dict[str, Any], chart: str | None = CHART_NAME) -> str:
    runs = results["runs"]
    summary = results["summary"]
    ci_note = (
        f"± is the half-width of the 95% confidence interval over {runs} run means (Student's t)."
        if runs >= MIN_RUNS_FOR_CI
        else f"{runs} run(s): confidence intervals need {MIN_RUNS_FOR_CI} or more."
    )
    m = results["manifest"]
    sim = m["simulation"]
    lines = [
        "# CoSER given-circumstance acting: evaluation report",
        "",
        f"- actor: `{m.get('actor', '?')}` (reply format `{sim.get('actor_format', 'her')}`); "
        f"judge: `{m.get('judge', '?')}`",
        f"- Environment played by `{m.get('environment', '?')}`, next-speaker predictor by "
        f"`{m.get('predictor', '?')}`. Scores compare with CoSER's, or across actors, only when these two "
        "are the same fixed models (CoSER: GPT-4o and GPT-4o-mini).",
        f"- protocol: `{sim.get('protocol', 'her')}`; actor temperature {sim.get('temperature')}, "
        f"top-p {sim.get('top_p')}, {sim.get('actor_max_tokens')} tokens",
        f"- runs: {runs}; samples per run: {results['samples_expected'] // max(runs, 1)}; "
        f"max rounds: {sim['max_rounds']} "
        f"(the scene may end once {sim['min_end_round']} lines are written)",
        f"- finished samples: {results['samples_ok']} ok, {results['samples_error']} with judge errors "
        f"(excluded from means), {len(results['samples_failed'])} failed in this invocation (rerun to retry)",
        "",
        "| Metric | Mean | ± 95% CI | Samples counted | Run means |",
        "|---|---|---|---|---|",
    ]
    for metric in METRICS:
        s = summary[metric]
        d = 4 if metric.startswith("coser_") else 2  # 0-1 scale
        run_means = ", ".join(_fmt(x, d) for x in s["run_means"]) or "n/a"
        lines.append(f"| {TITLES[metric]} | {_fmt(s['mean'], d)} | {_fmt(s['ci95'], d)} | {s['n']} | {run_means} |")
    lines += [
        "",
        ci_note,
        "Dimension scores: 100 − 5·(Σ flaw severity − 0.3·character lines), clipped to 0–100. "
        "BLEU and ROUGE-L (F1) compare the visible dialogue with the book's, on a 0–100 scale; "
        "the CoSER columns compute them as CoSER does (its text layout and tokenisation, 0–1), "
        "comparable with its published numbers.",
        "",
    ]
    if chart:
        lines += [f"![Scores per dimension]({chart})", ""]
    c = results["cost"]
    inv = c["this_invocation"]
    lines += [
        "## Cost",
        "",
        "| | Engine requests | Prompt tokens | Completion tokens |",
        "|---|---|---|---|",
        *(
            f"| {role} | {c[role]['calls']} | {c[role]['prompt_tokens']} | {c[role]['completion_tokens']} |"
            for role in COST_ROLES
        ),
        "",
        f"Sample time (sum over samples): {c['sample_seconds']:.1f} s. This invocation: {inv['computed']} "
        f"samples computed, {inv['skipped']} resumed from disk, wall time {inv['wall_seconds']:.1f} s.",
        "",
    ]
    if results["samples_failed"]:
        lines += [
            "## Failed samples",
            "",
            *(f"- `{k}`: {v}" for k, v in results["samples_failed"].items()),
            "",
        ]
    return "\n".join(lines)


def render_chart(results: dict[str, Any], path: Path) -> None:
    """Bar chart of the four dimensions and their average, with 95% CI error bars when available
    (a metric without any scored sample is drawn as an empty bar labelled n/a)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    summary = results["summary"]
    names = [TITLES[m].replace(" ", "\n") for m in CHART_METRICS]
    means = [summary[m]["mean"] for m in CHART_METRICS]
    errs = [summary[m]["ci95"] for m in CHART_METRICS]
    has_ci = any(e is not None for e in errs)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        heights = [v if v is not None else 0.0 for v in means]
        bars = ax.bar(
            names,
            heights,
            color=["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#444444"],
            yerr=[e if e is not None else 0.0 for e in errs] if has_ci else None,
            capsize=6,
        )
        for bar, v, e in zip(bars, means, errs, strict=True):
            label = "n/a" if v is None else f"{v:.1f}" + (f" ± {e:.1f}" if e is not None else "")
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height() + (e or 0.0)),  # above the error bar
                ha="center",
                va="bottom",
                fontsize=9,
                xytext=(0, 3),
                textcoords="offset points",
            )
        top = max(h + (e or 0.0) for h, e in zip(heights, errs, strict=True))
        ax.set_ylim(0, max(105.0, top + 8.0))
        ax.set_ylabel("score (0–100)")
        runs = results["runs"]
        ax.set_title(f"CoSER GCA scores ({runs} run{'s' if runs != 1 else ''}{', 95% CI' if has_ci else ''})")
        ax.tick_params(axis="x", labelsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def write_report(
    out_dir: Path, sample_ids: Sequence[str], runs: int, outcome: RunOutcome, manifest: dict[str, Any]
) -> dict[str, Any]:
    """Write results.json, scores.png and report.md; returns the results."""
    out_dir = Path(out_dir)
    results = build_results(out_dir, sample_ids, runs, outcome, manifest)
    render_chart(results, out_dir / CHART_NAME)
    results["chart"] = chart = CHART_NAME
    write_json_atomic(out_dir / "results.json", results)
    (out_dir / "report.md").write_text(render_markdown(results, chart), encoding="utf-8")
    return results
