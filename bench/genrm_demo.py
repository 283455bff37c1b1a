"""HER's loop on this CPU: build labelled pairs from two CoSER books, train the bundled 135M model as a
judge on one book, and measure agreement on the other book, base vs trained, in one `her eval judge` run.

    .venv/bin/python bench/genrm_demo.py                 # the full demonstration (about 50 min here)
    .venv/bin/python bench/genrm_demo.py --quick         # a few steps: checks the pipeline, not the figure

Every stage runs the real command a user would type (`her build ...`, `her train genrm`, `her eval judge`);
the script only times them and collects their outputs into bench/results/genrm_demo/:

- `synth/`: HER reverse synthesis (role_thinking and system_thinking stages) on a few King Lear scenes with
  the bundled model as teacher, for the teacher token count (a 135M teacher's output mostly lands in
  the rejects file; a large teacher is an OpenAI-compatible server behind `--teacher-engine openai`);
- `train_pairs.jsonl` (King Lear) and `heldout_pairs.jsonl` (Othello): principle-grounded hard negatives,
  CoSER's evaluation scenes excluded; the held-out book is never seen in training;
- `judge/`: the trained judge (serves as is with `her serve --model`);
- `report/`: `her eval judge` output (report.md, metrics.json, PNGs);
- `demo_summary.json`: wall time per stage, pair counts, teacher tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COSER = ROOT / "tests" / "data" / "coser"
HER = str(Path(sys.executable).with_name("her"))


def run(stage: str, argv: list[str], timings: dict[str, float]) -> None:
    print(f"\n== {stage}: her {' '.join(argv)}", flush=True)
    started = time.monotonic()
    subprocess.run([HER, *argv], check=True, cwd=ROOT)
    timings[stage] = round(time.monotonic() - started, 1)
    print(f"== {stage}: {timings[stage]:.0f} s", flush=True)


def teacher_tokens(synth_dir: Path) -> dict:
    """Tokens the teacher stages used, as `her build synth` recorded them."""
    for name in ("usage.json", "teacher_usage.json"):
        path = synth_dir / name
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "genrm_demo"))
    parser.add_argument("--quick", action="store_true", help="a few training steps and pairs (pipeline check)")
    parser.add_argument("--train-pairs-per-turn", type=int, default=3)
    parser.add_argument("--heldout-limit", type=int, default=150)
    parser.add_argument("--synth-scenes", type=int, default=1)
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    timings: dict[str, float] = {}
    lear, othello, test_set = (str(COSER / f) for f in ("book_king_lear.json", "book_othello.json",
                                                         "example_test_set.json"))
    started = time.monotonic()

    run("synth", ["build", "synth", "--sources", lear, "--out", str(out / "synth"),
                  "--stages", "role_thinking,system_thinking",
                  "--limit-scenes", str(args.synth_scenes), "--max-lines", str(4 if args.quick else 8)], timings)
    per_turn = 1 if args.quick else args.train_pairs_per_turn
    run("pairs", ["build", "negatives", "--sources", lear, othello, "--exclude", test_set, "--books", "King Lear",
                  "--per-turn", str(per_turn), "--out", str(out / "train_pairs.jsonl")], timings)
    run("heldout", ["build", "negatives", "--sources", lear, othello, "--exclude", test_set, "--books", "Othello",
                    "--per-turn", "2", "--seed", "1", "--out", str(out / "heldout_pairs.jsonl")], timings)
    train = ["train", "genrm", "--config", str(ROOT / "policy_trainer" / "configs" / "genrm_demo_cpu.yaml"),
             "--pairs", str(out / "train_pairs.jsonl"), "--output-dir", str(out / "judge")]
    run("train", train + (["--max-steps", "3"] if args.quick else []), timings)
    limit = 16 if args.quick else args.heldout_limit
    run("eval", ["eval", "judge", "--pairs", str(out / "heldout_pairs.jsonl"), "--mode", "fast",
                 "--judge", "base=smollm2-135m-instruct", "--judge", f"trained={out / 'judge'}",
                 "--limit", str(limit), "--out", str(out / "report")], timings)

    count = lambda p: sum(1 for line in p.read_text().splitlines() if line.strip())  # noqa: E731
    summary = {
        "wall_time_s": round(time.monotonic() - started, 1),
        "stage_time_s": timings,
        "train_pairs": count(out / "train_pairs.jsonl"),
        "heldout_pairs_judged": min(limit, count(out / "heldout_pairs.jsonl")),
        "teacher_tokens": teacher_tokens(out / "synth"),
        "report": str(out / "report" / "report.md"),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print((out / "report" / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
