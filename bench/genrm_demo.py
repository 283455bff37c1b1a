"""HER's judge loop on this CPU, measured where RL needs it: build labelled pairs of three families from two CoSER
books, train the bundled 135M model as a judge on some families of one book, and measure agreement on every family
of the other book, trained judges beside the base model in one `her eval judge` run: the train-set × test-family
matrix. A judge's headline is its worst family it did not train on, never the average.

    .venv/bin/python bench/genrm_demo.py                 # the full matrix (the default judges below)
    .venv/bin/python bench/genrm_demo.py --quick         # one judge, a few steps: checks the pipeline, not the figure
    .venv/bin/python bench/genrm_demo.py --train-set all=hard_negative+wrong_moment+policy_sample:consistency ...

A train set is NAME=FAMILY[+FAMILY...][:OPTION...]; the options: `consistency` (the order-consistency term of
`her train genrm`), `rl` (then the judge's GRPO stage, `her train genrm-rl`, on the same pairs: a second judge
NAME-rl, so SFT alone and SFT+RL sit side by side), `cot` (cot answers trained too; the judge is also measured in
cot mode on `--cot-per-family` held-out pairs of each family). The default judges, all trained on hard negatives
only, compare plain SFT, SFT+RL, SFT with the consistency term, and a cot-trained judge with the consistency term.

Families (each a `source` of `her_genrm.LabelledPair`):

- `hard_negative`: a real line against a copy with one named flaw (`her build negatives`);
- `wrong_moment`: the real line against the same character's line from another moment (`her build rollout-pairs`);
- `policy_sample`: the book's line against the bundled model's own reply for the turn (`her build rollout-pairs`).

Every stage runs the real command a user would type; the script times them and writes bench/results/genrm_demo/:
`train_{name}.jsonl` (King Lear), `heldout.jsonl` (Othello, at most `--heldout-per-family` pairs of each family;
the held-out book is never trained on; CoSER's evaluation scenes are excluded from both), `heldout_cot.jsonl`
(its cot subset), `judge_{name}/` (each trained judge; serves as is with `her serve --model`), `report/` and
`report_cot/` (`her eval judge`: report.md, metrics.json, PNGs), `matrix.md` + `matrix.png` (accuracy per judge
and family, unseen families marked) and `demo_summary.json`.
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
OPTIONS = ("consistency", "rl", "cot")
DEFAULT_TRAIN_SETS = ["hard_negative=hard_negative:rl", "hard_negative_consistent=hard_negative:consistency",
                      "hard_negative_cot=hard_negative:consistency:cot"]


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


def parse_train_set(text: str) -> tuple[str, list[str], set[str]]:
    """NAME=FAMILY[+FAMILY...][:OPTION...] → (name, families, options)."""
    name, _, rest = text.partition("=")
    families, *options = rest.split(":")
    chosen = [f for f in families.split("+") if f]
    if not name or name.endswith("-rl") or not chosen or set(chosen) - set(FAMILIES) or set(options) - set(OPTIONS):
        raise SystemExit(f"--train-set {text!r}: expected NAME=FAMILY[+FAMILY...][:OPTION...] with families from "
                         f"{FAMILIES} and options from {OPTIONS}")
    return name, chosen, set(options)


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
    parser.add_argument("--train-set", action="append", dest="train_sets", metavar="NAME=FAMILY[+FAMILY][:OPTION]",
                        help="a judge to train, on these families of the training book; options: consistency (the "
                             "order-consistency term), rl (then `her train genrm-rl`: a second judge NAME-rl), cot "
                             "(cot answers too; also judged in cot mode). Repeatable; default: "
                             + " ".join(DEFAULT_TRAIN_SETS))
    parser.add_argument("--max-steps", type=int, default=40, help="training steps per judge (default 40)")
    parser.add_argument("--rl-steps", type=int, default=20, help="GRPO steps of the rl option (default 20)")
    parser.add_argument("--consistency-weight", type=float, default=1.0, help="weight of the consistency option")
    parser.add_argument("--train-pairs-per-turn", type=int, default=2, help="hard negatives per training turn")
    parser.add_argument("--heldout-per-family", type=int, default=40, help="held-out pairs judged per family")
    parser.add_argument("--cot-per-family", type=int, default=10,
                        help="held-out pairs per family the cot-trained judges also answer in cot mode (a cot "
                             "answer is a few hundred tokens per order: seconds per pair here; default 10)")
    args = parser.parse_args()
    parsed = [parse_train_set(t) for t in (args.train_sets or (
        ["quick=hard_negative:consistency:rl:cot"] if args.quick else DEFAULT_TRAIN_SETS))]

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
    cot_per_family = 2 if args.quick else args.cot_per_family
    write_jsonl(out / "heldout_cot.jsonl",
                [row for family in FAMILIES for row in [r for r in judged if r["source"] == family][:cot_per_family]])

    judges = ["--judge", "base=smollm2-135m-instruct"]
    cot_judges: list[str] = []
    train_sets: dict[str, list[str]] = {}
    steps = str(3 if args.quick else args.max_steps)
    for name, families, options in parsed:
        pairs_file = out / f"train_{name}.jsonl"
        write_jsonl(pairs_file, [row for family in families for row in train[family]])
        extra = ["--consistency-weight", str(args.consistency_weight)] if "consistency" in options else []
        extra += ["--modes", "fast", "cot"] if "cot" in options else []
        run(f"train_{name}", ["train", "genrm", "--config", str(ROOT / "policy_trainer" / "configs" /
                                                                "genrm_demo_cpu.yaml"),
                              "--pairs", str(pairs_file), "--output-dir", str(out / f"judge_{name}"),
                              "--max-steps", steps, *extra], timings)
        train_sets[name] = families
        judges += ["--judge", f"{name}={out / f'judge_{name}'}"]
        if "cot" in options:
            cot_judges += ["--judge", f"{name}={out / f'judge_{name}'}"]
        if "rl" in options:
            run(f"train_{name}-rl", ["train", "genrm-rl", "--config", str(ROOT / "policy_trainer" / "configs" /
                                                                         "genrm_rl_cpu.yaml"),
                                     "--model", str(out / f"judge_{name}"), "--pairs", str(pairs_file),
                                     "--output-dir", str(out / f"judge_{name}-rl"),
                                     "--max-steps", str(2 if args.quick else args.rl_steps)], timings)
            train_sets[f"{name}-rl"] = families
            judges += ["--judge", f"{name}-rl={out / f'judge_{name}-rl'}"]
    run("eval_fast", ["eval", "judge", "--pairs", str(out / "heldout.jsonl"), "--mode", "fast", *judges,
                      "--out", str(out / "report")], timings)
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    if cot_judges and cot_per_family:
        run("eval_cot", ["eval", "judge", "--pairs", str(out / "heldout_cot.jsonl"), "--mode", "cot", *cot_judges,
                         "--out", str(out / "report_cot")], timings)
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
        "heldout_pairs_judged_cot": cot_per_family if cot_judges else 0,
        "train_sets": {name: {"families": families, "options": sorted(options)} for name, families, options in parsed},
        "worst_unseen_family": min(unseen, key=lambda w: w["accuracy"]) if unseen else None,
        "matrix": str(out / "matrix.md"),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print((out / "matrix.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
