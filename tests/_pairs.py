"""Judge pairs built from the real CoSER fixture scene."""

from __future__ import annotations

import json
from pathlib import Path

from her_engines import ChatMessage
from her_roleplay import Scene, coser_to_her, public_view

DEGENERATE = ("(nods)", "...", "I am an AI language model and cannot play this role.", "Yes.")


def fixture_pairs(scene: Scene, n: int, *, history: int = 2) -> list[dict]:
    """`n` pairs: the character's real line from the book vs a weaker alternative, with the
    preceding lines (others' thoughts hidden) as chat context."""
    lines = [(d.character, coser_to_her(d.message)) for d in scene.dialogues]
    pairs = []
    k = 0
    while len(pairs) < n:
        turn = 1 + k % (len(lines) - 1)
        speaker, real = lines[turn]
        context = [
            ChatMessage(role="user", content=f"{who}: {public_view(text)}")
            for who, text in lines[max(0, turn - history) : turn]
        ]
        if k % 2 == 0:
            other = DEGENERATE[(k // 2) % len(DEGENERATE)]
        else:  # a real line from elsewhere in the scene: fluent but off-topic here
            other = lines[(turn + len(lines) // 2) % len(lines)][1]
        a, b = (real, other) if k % 3 else (other, real)
        pairs.append({"context": context, "a": a, "b": b, "speaker": speaker, "turn": turn})
        k += 1
    return pairs


def short_rows(scene, path: Path) -> Path:
    """GRPO rows from the real scene with a short context (a one-line system prompt and the last
    message the character answers): the judge on CPU costs about its prompt length, and the full actor
    prompt is ~1,800 tokens."""
    from policy_trainer._data import grpo_rows_from_scene

    with path.open("w", encoding="utf-8") as out:
        for row in grpo_rows_from_scene(scene):
            system = f"You are {row['character']} from {scene.book}. Stay in character."
            prompt = [{"role": "system", "content": system}, row["prompt"][-1]]
            out.write(json.dumps({"prompt": prompt, "reference": row["reference"]}) + "\n")
    return path
