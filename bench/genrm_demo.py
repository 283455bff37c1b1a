"""HER's judge loop on this CPU, measured where RL needs it: build labelled pairs of three families from two CoSER
books, train the bundled 135M model as a judge on some families of one book, and measure agreement on every family
of the other book, trained judges beside the base model in one `her eval judge` run: the train-set × test-family
matrix. A judge's headline is its worst family it did not train on, never the average.

    .venv/bin/python bench/genrm_demo.py                 # the full matrix (three judges; about 35 min on 2 cores)
    .venv/bin/python bench/genrm_demo.py --quick         # one judge, a few steps: checks the pipeline, not the figure
    .venv/bin/python bench/genrm_demo.py --train-set all=hard_negative+wrong_moment+policy_sample ...

Families (each a `source` of `her_genrm.LabelledPair`):

- `hard_negative`: a real line against a copy with one named flaw (`her build negatives`);
- `wrong_moment`: the real line against the same character's line from another moment (`her build rollout-pairs`);
- `policy_sample`: the book's line against the bundled model's own reply for the turn (`her build rollout-pairs`).

Every stage runs the real command a user would type; the script times them and writes bench/results/genrm_demo/:
`train_{family}.jsonl` (King Lear), `heldout.jsonl` (Othello, at most `--heldout-per-family` pairs of each family;
the held-out book is never trained on; CoSER's evaluation scenes are excluded from both), `judge_{name}/` (each
trained judge; serves as is with `her serve --model`), `report/` (`her eval judge`: report.md, metrics.json,
PNGs), `matrix.md` + `matrix.png` (accuracy per judge and family, unseen families marked) and `demo_summary.json`.
Precision follows the CPU (bf16 only where it is native: `policy_trainer/configs/genrm_demo_cpu.yaml`).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COSER = ROOT / "tests" / "data" / "coser"
HER = str(Path(sys.executable).with_name("her"))
FAMILIES = ("hard_negative", "wrong_moment", "policy_sample")
DEFAULT_TRAIN_SETS = [f"{family}={family}" for family in FAMILIES]


def run(stage: str, argv: list[str], timings: dict[str, float]) -> None:
    print(f"\n== {stage}: her {' '.join(argv)}", flush=True)
    started = time.monotonic()
    subprocess.run([HER, *argv], check=True, cwd=ROOT)
    timings[stage] = round(time.monotonic() - started, 1)
    print(f"== {stage}: {timings[stage]:.0f} s", flush=True)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def parse_train_set(text: str) -> tuple[str, list[str]]:
    name, _, families = text.partition("=")
    chosen = [f for f in families.split("+") if f]
    if not name or not chosen or set(chosen) - set(FAMILIES):
        raise SystemExit(f"--train-set {text!r}: expected NAME=FAMILY[+FAMILY...] with families from {FAMILIES}")
    return name, chosen


def build_pairs(book: str, out: Path, stage: str, args: argparse.Namespace, timings: dict[str, float],
                per_turn: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Every family's pairs of one book (CoSER's test scenes left out), by family."""
    books = [str(COSER / f) for f in ("book_king_lear.json", "book_othello.json")]
    exclude = ["--exclude", str(COSER / "example_test_set.json")]
    run(f"{stage}_hard_negative", ["build", "negatives", "--sources", *books, *exclude, "--books", book,
                                   "--per-turn", str(per_turn), "--seed", str(seed),
                                   "--out", str(out / "hard_negative.jsonl")], timings)
    turns = ["--turns-per-scene", "2"] if args.quick else []
    run(f"{stage}_rollout", ["build", "rollout-pairs", "--sources", *books, *exclude, "--books", book,
                             "--seed", str(seed), *turns, "--max-tokens", "96",
                             "--policy-kv-cache-gib", "1", "--out", str(out / "rollout.jsonl")], timings)
    pairs = {family: [] for family in FAMILIES}
    for row in read_jsonl(out / "hard_negative.jsonl") + read_jsonl(out / "rollout.jsonl"):
        pairs[row["source"]].append(row)
    return pairs


def matrix(metrics: dict[str, Any], train_sets: dict[str, list[str]]) -> dict[str, Any]:
    """Accuracy per (judge, family) from `her eval judge`'s metrics, each cell marked seen or unseen, and every
    judge's worst unseen family (its headline)."""
    rows = []
    for judge in metrics["judges"]:
        trained_on = train_sets.get(judge["name"], [])
        cells = {}
        for family in FAMILIES:
            f = judge["metrics"]["by_family"].get(family)
            if f is not None:
                cells[family] = {"seen": family in trained_on, **{k: f[k] for k in
                                                                  ("accuracy", "swap_consistency",
                                                                   "first_slot_win_rate")}}
        unseen = [(c["accuracy"]["value"], family) for family, c in cells.items()
                  if not c["seen"] and c["accuracy"]["value"] is not None]
        worst = min(unseen) if unseen else None
        rows.append({"judge": judge["name"], "mode": judge["mode"], "trained_on": trained_on, "cells": cells,
                     "worst_unseen": {"family": worst[1], "accuracy": worst[0]} if worst else None})
    return {"families": list(FAMILIES), "rows": rows}


def _cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "–"
    acc = c["accuracy"]
    ci = f" [{acc['ci95'][0]:.2f}, {acc['ci95'][1]:.2f}]" if acc.get("ci95") else ""
    value = "n/a" if acc["value"] is None else f"{acc['value']:.3f}"
    swap, first = c["swap_consistency"]["value"], c["first_slot_win_rate"]["value"]
    tail = f"; swap {swap:.2f}" if swap is not None else ""
    tail += f", first {first:.2f}" if first is not None else ""
    return f"{'' if c['seen'] else '**'}{value}{'' if c['seen'] else '**'}{ci} ({acc['hits']}/{acc['n']}{tail})"


def render_matrix(m: dict[str, Any]) -> str:
    lines = ["# Judge × pair family (held-out book: Othello)", "",
             "Accuracy [95% CI] (right/judged; swap consistency, first-slot win rate of single orders). **Bold**: "
             "a family the judge never trained on. A judge's headline is its worst bold cell.", "",
             "| Judge | Mode | Trained on | " + " | ".join(m["families"]) + " | Worst unseen |",
             "|---|---|---|" + "---|" * len(m["families"]) + "---|"]
    for row in m["rows"]:
        worst = row["worst_unseen"]
        lines.append(f"| {row['judge']} | {row['mode']} | {', '.join(row['trained_on']) or '(base model)'} | "
                     + " | ".join(_cell(row["cells"].get(f)) for f in m["families"])
                     + f" | {worst['family'] + ' ' + format(worst['accuracy'], '.3f') if worst else '–'} |")
    return "\n".join(lines) + "\n"


def plot_matrix(m: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = m["rows"]
    values = [[(r["cells"].get(f) or {}).get("accuracy", {}).get("value") for f in m["families"]] for r in rows]
    grid = [[v if v is not None else float("nan") for v in row] for row in values]
    fig, ax = plt.subplots(figsize=(1.8 * len(m["families"]) + 2.5, 0.6 * len(rows) + 1.5))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(m["families"])), m["families"])
    ax.set_yticks(range(len(rows)), [f"{r['judge']} ({r['mode']})" for r in rows])
    for i, r in enumerate(rows):
        for j, f in enumerate(m["families"]):
            cell = r["cells"].get(f)
            if cell and cell["accuracy"]["value"] is not None:
                ax.text(j, i, f"{cell['accuracy']['value']:.2f}" + ("" if cell["seen"] else "\nunseen"),
                        ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title("Judge accuracy by pair family (held-out book)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "genrm_demo"))
    parser.add_argument("--quick", action="store_true", help="one judge, a few steps and pairs (pipeline check)")
    parser.add_argument("--train-set", action="append", dest="train_sets", metavar="NAME=FAMILY[+FAMILY]",
                        help=f"a judge to train, on these families of the training book (repeatable; default: one "
                             f"judge per family: {' '.join(DEFAULT_TRAIN_SETS)})")
    parser.add_argument("--max-steps", type=int, default=40, help="training steps per judge (default 40)")
    parser.add_argument("--train-pairs-per-turn", type=int, default=2, help="hard negatives per training turn")
    parser.add_argument("--heldout-per-family", type=int, default=60, help="held-out pairs judged per family")
    parser.add_argument("--cot-limit", type=int, default=0,
                        help="also judge this many held-out pairs in cot mode (about 28 s a pair here; default 0)")
    args = parser.parse_args()
    train_sets = dict(parse_train_set(t) for t in (args.train_sets or (
        ["hard_negative=hard_negative"] if args.quick else DEFAULT_TRAIN_SETS)))

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "train").mkdir(parents=True)
    (out / "heldout").mkdir()
    timings: dict[str, float] = {}
    started = time.monotonic()

    train = build_pairs("King Lear", out / "train", "train_pairs", args, timings,
                        per_turn=1 if args.quick else args.train_pairs_per_turn, seed=0)
    heldout = build_pairs("Othello", out / "heldout", "heldout_pairs", args, timings, per_turn=1, seed=1)
    per_family = 8 if args.quick else args.heldout_per_family
    judged = [row for family in FAMILIES
              for row in random.Random(family).sample(heldout[family], min(per_family, len(heldout[family])))]
    write_jsonl(out / "heldout.jsonl", judged)

    judges = ["--judge", "base=smollm2-135m-instruct"]
    config = str(ROOT / "policy_trainer" / "configs" / "genrm_demo_cpu.yaml")
    for name, families in train_sets.items():
        pairs_file = out / f"train_{name}.jsonl"
        write_jsonl(pairs_file, [row for family in families for row in train[family]])
        run(f"train_{name}", ["train", "genrm", "--config", config, "--pairs", str(pairs_file),
                              "--output-dir", str(out / f"judge_{name}"),
                              "--max-steps", str(3 if args.quick else args.max_steps)], timings)
        judges += ["--judge", f"{name}={out / f'judge_{name}'}"]
    run("eval_fast", ["eval", "judge", "--pairs", str(out / "heldout.jsonl"), "--mode", "fast", *judges,
                      "--out", str(out / "report")], timings)
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    if args.cot_limit:
        run("eval_cot", ["eval", "judge", "--pairs", str(out / "heldout.jsonl"), "--mode", "cot", *judges,
                         "--limit", str(args.cot_limit), "--out", str(out / "report_cot")], timings)
        metrics["judges"] += json.loads((out / "report_cot" / "metrics.json").read_text())["judges"]

    m = matrix(metrics, train_sets)
    (out / "matrix.json").write_text(json.dumps(m, indent=2) + "\n")
    (out / "matrix.md").write_text(render_matrix(m))
    plot_matrix(m, out / "matrix.png")
    unseen = [r["worst_unseen"] for r in m["rows"] if r["trained_on"] and r["worst_unseen"]]
    summary = {
        "wall_time_s": round(time.monotonic() - started, 1),
        "stage_time_s": timings,
        "train_pairs": {family: len(rows) for family, rows in train.items()},
        "heldout_pairs_judged": {family: sum(r["source"] == family for r in judged) for family in FAMILIES},
        "train_sets": train_sets,
        "worst_unseen_family": min(unseen, key=lambda w: w["accuracy"]) if unseen else None,
        "matrix": str(out / "matrix.md"),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print((out / "matrix.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
