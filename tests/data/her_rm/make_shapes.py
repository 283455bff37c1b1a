"""Writes the HER-RM answer fixtures of this folder (run it after changing one; the files are committed).

The texts are ours; the shape is the one HER's RM data builders write (field names, key order, fence and
indent: ``training_code/step2_reward_sft/construct_rm_training_data.py`` dumps the judgment record with a
2-space indent inside a ```json fence; ``step3_reward_rl/extract_rm_data.py`` reads ``better_response``
with a regex and asks the RL-stage judge to reason inside ``<think>`` first).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

LEAR = "<role_thinking>He mocks me, yet he is right.</role_thinking><role_action>turns away</role_action>Enough, boy."
ASSISTANT = "As an AI language model, I think the king should apologise."


def principle(name: str, dimension: str, level: str, content: str, why: str) -> dict:
    return {"principle_name": name, "dimension_name": dimension, "principle_level": level,
            "main_content": content, "reason_for_choosing": why}


def comparison(name: str, level: str, first: str, second: str, reason: str, winner: str) -> dict:
    return {"principle_name": name, "principle_level": level, "cand_1_performance": first,
            "cand_2_performance": second, "comparison_reason": reason, "winner": winner}


def record(cand_1: str, cand_2: str, principles: list[dict], comparisons: list[dict], overall: str, summary: str,
           better: str) -> dict:
    """One judgment in HER-RM's key order: candidates echoed, principles, analysis, then the verdict last."""
    return {
        "cand_1": cand_1,
        "cand_2": cand_2,
        "principle": {f"Principle {i}": p for i, p in enumerate(principles, start=1)},
        "analysis": {"principle_comparisons": comparisons, "overall_analysis": overall, "principle_summary": summary},
        "better_response": better,
    }


def fenced(rec: dict) -> str:
    """The SFT target exactly as HER's builder writes it."""
    return f"```json\n{json.dumps(rec, ensure_ascii=False, indent=2)}\n```"


SFT = record(
    LEAR, ASSISTANT,
    [principle("Stays inside the character", "Character Consistency", "sentence",
               "The reply speaks as the character, never as an assistant.",
               "One candidate steps out of the story."),
     principle("Inner thoughts stay private", "Dual-layer Thinking", "sentence",
               "Role thinking voices the character's own mind and reads no one else's.",
               "Both candidates carry thoughts or none; worth checking."),
     principle("Answers what was just said", "Dialogue Coherence", "session",
               "The reply takes up the other speaker's last line.",
               "The fool's jibe asks for an answer.")],
    [comparison("Stays inside the character", "sentence", "Speaks as Lear throughout.",
                "Breaks the fiction and talks as an assistant.",
                "A clear difference: cand_2 violates the principle outright.", "cand_1"),
     comparison("Inner thoughts stay private", "sentence", "Its thought is Lear's own.", "It has no thoughts.",
                "Neither reply reads another mind; no difference.", "tie"),
     comparison("Answers what was just said", "session", "Cuts the fool short.",
                "Addresses the apology directly.", "A slight edge for cand_2 on taking up the line.", "cand_2")],
    "The assistant voice in cand_2 is a flaw that decides the pair.",
    "Cand_1 wins 1 principle (Stays inside the character, high weight, clear); Cand_2 wins 1 (Answers what was "
    "just said, low weight, slight); 1 tie",
    "cand_1",
)

RL = record(
    "<role_action>nods</role_action>Very well.",
    "<role_thinking>I will not beg him.</role_thinking><role_action>folds her hands, chin high</role_action>"
    "Then I shall go, sir, and you may keep your house.",
    [principle("Concrete visible action", "Dual-layer Thinking", "sentence",
               "Actions are specific and visible on a stage.", "The candidates differ in what they show."),
     principle("Period-appropriate language", "Character Consistency", "sentence",
               "Speech fits the book's time and class.", "One reply is curt, one formal."),
     principle("Stays inside the character", "Character Consistency", "session",
               "The reply speaks as the character.", "Both stay inside; a tie is likely.")],
    [comparison("Concrete visible action", "sentence", "A bare nod.", "Folded hands and a raised chin.",
                "cand_2 is clearly more concrete.", "cand_2"),
     comparison("Period-appropriate language", "sentence", "Terse.", "Formal and of its time.",
                "A slight edge for cand_2.", "cand_2"),
     comparison("Stays inside the character", "session", "In character.", "In character.", "No difference.", "tie")],
    "cand_2 shows more and speaks in period.",
    "Cand_2 wins 2 principles; 1 tie",
    "cand_2",
)
# HER's RL-stage judge reasons in <think> first; its reasoning may itself quote a verdict-shaped string.
RL_ANSWER = ("<think>\nThe first reply is thin. If I wrote {\"better_response\": \"cand_1\"} I would reward a bare "
             "nod. The second shows the refusal on stage.\n</think>\n" + fenced(RL))

# An echo with unescaped double quotes (HER's prompt asks the judge to use single quotes; a judge may not):
# the JSON does not parse, yet `better_response` is there to read, as HER's own regex reads it.
QUOTED = "<role_action>smiles</role_action>You call this \"honour\", sir?"
BROKEN = fenced(record(QUOTED, LEAR, SFT["principle"].values(), SFT["analysis"]["principle_comparisons"],
                       "cand_2 answers in the character's voice.", "Cand_2 wins", "cand_2")).replace(
    json.dumps(QUOTED, ensure_ascii=False), '"' + QUOTED + '"')

# The prompt's own example wraps the record as {"result": [ ... ]}; a judge prompted with it may answer so.
WRAPPED = {"result": [record(
    "<role_action>sits</role_action>Good evening.", "<role_action>sits down</role_action>Good evening to you.",
    [principle("Consistent with the scene", "Scene Consistency", "session", "Fits the setting.", "Both do."),
     principle("Emotional depth", "Emotional Expression", "sentence", "Shows a feeling.", "Neither does."),
     principle("Natural speech", "Language Style", "sentence", "Sounds spoken.", "Both do.")],
    [comparison("Consistent with the scene", "session", "Fits.", "Fits.", "No difference.", "tie"),
     comparison("Emotional depth", "sentence", "Flat.", "Flat.", "No difference.", "tie"),
     comparison("Natural speech", "sentence", "Natural.", "Natural.", "No difference.", "tie")],
    "Equivalent replies.", "3 ties", "tie")]}

FILES = {
    "training_target.txt": fenced(SFT),
    "after_rl_think.txt": RL_ANSWER,
    "broken_json_quotes.txt": BROKEN,
    "bare_result_wrapper.txt": json.dumps(WRAPPED, ensure_ascii=False, indent=2),
}

if __name__ == "__main__":
    for name, text in FILES.items():
        (HERE / name).write_text(text + "\n", encoding="utf-8")
        print("wrote", name)
