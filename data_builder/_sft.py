"""HER stage 5: one SFT sample per character perspective of every scene."""

from __future__ import annotations

from collections.abc import Iterable

from her_roleplay import Scene, build_character_samples


def sft_records(scenes: Iterable[Scene]) -> list[dict]:
    """Chat records `{"scene_id", "character", "messages"}`; the last message is the trained turn."""
    records = []
    for scene in scenes:
        for sample in build_character_samples(scene):
            records.append({
                "scene_id": sample.scene_id,
                "character": sample.character,
                "messages": [m.model_dump() for m in sample.messages],
            })
    return records
