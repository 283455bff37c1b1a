"""Judge pairs built from the real CoSER fixture scene."""

from __future__ import annotations

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
