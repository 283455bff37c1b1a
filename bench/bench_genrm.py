"""GenRM benchmark, one run, same pairs, bundled model:

1. decode tokens per verdict: our `compact` output vs the HER-RM output format for the same judgments
   (the HER-RM form is built from each compact verdict: same principles and reasons, plus the fields
   HER-RM writes — principle name/dimension/level and both candidates echoed — tokenised with the judge's
   tokenizer). Goal ≤ 0.35×.
2. wall time of `fast` vs `cot` on the same pairs (both orders). Goal ≤ 0.1×.
3. parse failures of `cot` (goal: zero).

Run: ``.venv/bin/python bench/bench_genrm.py [--pairs 100] [--batch 16]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _pairs import fixture_pairs  # noqa: E402

from her_engines import create_engine, ensure_hf_folder  # noqa: E402
from her_genrm import GenRM, JudgeRequest, Verdict  # noqa: E402
from her_roleplay import default_library, load_scenes, strip_system_thinking  # noqa: E402

SCENE = Path(__file__).resolve().parents[1] / "tests" / "data" / "coser_test_sample_pride_and_prejudice.json"
SLOT_NAME = {"a": "cand_1", "b": "cand_2", "tie": "tie"}


def her_rm_form(verdict: Verdict, a: str, b: str) -> str:
    """The same judgment written in HER-RM's output format (order a-first)."""
    library = default_library()
    order = verdict.orders[0]
    principles = []
    for c in order.comparisons:
        p = library.get(c.principle)
        principles.append({"name": p.name, "dimension": p.dimension, "level": p.level,
                           "analysis": c.reason, "winner": SLOT_NAME[c.winner]})
    doc = {"principles": principles, "cand_1": strip_system_thinking(a), "cand_2": strip_system_thinking(b),
           "better_response": SLOT_NAME[order.winner or "tie"]}
    return "```json\n" + json.dumps(doc, ensure_ascii=False, indent=2) + "\n```"


async def timed_judge(genrm: GenRM, reqs: list[JudgeRequest], batch: int, label: str) -> tuple[list[Verdict], float]:
    verdicts: list[Verdict] = []
    start = time.perf_counter()
    with Progress() as progress:
        task = progress.add_task(label, total=len(reqs))
        for i in range(0, len(reqs), batch):
            verdicts += await genrm.judge(reqs[i : i + batch])
            progress.advance(task, len(reqs[i : i + batch]))
    return verdicts, time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_hf_folder("smollm2-135m-instruct")))
    engine = create_engine("transformers")
    genrm = GenRM(engine)
    scene = load_scenes(SCENE)[0]
    pairs = fixture_pairs(scene, args.pairs)
    cot = [JudgeRequest(context=p["context"], a=p["a"], b=p["b"], mode="cot") for p in pairs]
    fast = [r.model_copy(update={"mode": "fast"}) for r in cot]

    fast_verdicts, fast_s = await timed_judge(genrm, fast, args.batch, "fast")
    cot_verdicts, cot_s = await timed_judge(genrm, cot, args.batch, "cot")

    failures = [v.error for v in cot_verdicts if v.status != "ok"]
    ok = [(v, p) for v, p in zip(cot_verdicts, pairs, strict=True) if v.status == "ok"]
    compact_tokens = [o.usage.completion_tokens for v, _ in ok for o in v.orders[:1]]
    her_rm_tokens = [len(tokenizer(her_rm_form(v, p["a"], p["b"]))["input_ids"]) for v, p in ok]
    fast_failures = sum(v.status != "ok" for v in fast_verdicts)

    print()
    print(f"pairs: {len(pairs)} (both orders each), batch {args.batch}, model {engine.model_id}")
    print(f"cot parse failures: {len(failures)} / {len(pairs)}   fast failures: {fast_failures}")
    if compact_tokens:
        c, h = statistics.mean(compact_tokens), statistics.mean(her_rm_tokens)
        print(f"decode tokens per verdict (one order): compact {c:.1f}  her-rm format {h:.1f}  "
              f"ratio {c / h:.3f}  (goal <= 0.35)")
    print(f"wall time: fast {fast_s:.1f} s  cot {cot_s:.1f} s  ratio {fast_s / cot_s:.3f}  (goal <= 0.1)")
    consistent = [v.consistent for v in cot_verdicts if v.status == "ok"]
    if consistent:
        print(f"cot swap consistency: {sum(consistent) / len(consistent):.2f}")
    await engine.aclose()


if __name__ == "__main__":
    asyncio.run(main())
