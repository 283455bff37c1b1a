"""Prompts of the two agents besides the actors: the Environment narrator and the next-speaker predictor,
which see the conversation as CoSER shows it to them (speaker-labelled actions and speech, no thoughts)."""

from __future__ import annotations

from collections.abc import Sequence

from her_engines import ChatMessage
from her_roleplay import ENVIRONMENT, Scene, her_to_coser, public_view

from ._turns import END_CHAT


def _visible_history(history: Sequence[tuple[str, str]]) -> str:
    """``Name: (action) speech`` lines, as CoSER shows them to its narrator and predictor."""
    lines = []
    for speaker, text in history:
        seen = her_to_coser(public_view(text)).strip()
        if seen:
            lines.append(f"{speaker}: {seen}")
    return "\n\n".join(lines) or "(nothing has happened yet)"


def _people(scene: Scene) -> str:
    out = []
    for name in scene.cast():
        brief = scene.description_of(name)
        out.append(f"- {name}: {brief}" if brief else f"- {name}")
    return "\n".join(out)


def environment_prompt(scene: Scene, history: Sequence[tuple[str, str]]) -> list[ChatMessage]:
    """The narrator: describes what changes around the characters, never speaks or acts for them."""
    system = (
        f"You are the narrator of a scene from {scene.book}. You describe the surroundings only: light, "
        "sounds, objects, weather, people arriving or leaving, anything physical that changes. Write one to "
        "three sentences in plain prose. Never speak, think or decide for any of the characters, and never "
        "repeat what they said."
        f"\n\n## The scene\n{scene.scenario.strip()}\n\n## Characters present\n{_people(scene)}"
    )
    user = (
        f"The conversation so far:\n\n{_visible_history(history)}\n\n"
        "Describe what changes in the surroundings now."
    )
    return [ChatMessage(role="system", content=system), ChatMessage(role="user", content=user)]


def predictor_prompt(
    scene: Scene, history: Sequence[tuple[str, str]], options: Sequence[str]
) -> list[ChatMessage]:
    """The director: who acts next, or the end of the scene."""
    system = (
        f"You direct a scene from {scene.book} and decide who acts next so that the scene moves on "
        f"naturally. {ENVIRONMENT} stands for the surroundings (it describes physical changes)."
        f"\n\n## The scene\n{scene.scenario.strip()}\n\n## Characters present\n{_people(scene)}"
    )
    ending = f" Answer {END_CHAT} if the scene has come to its natural end." if END_CHAT in options else ""
    user = (
        f"The conversation so far:\n\n{_visible_history(history)}\n\n"
        f"Who acts next? Answer with exactly one of: {', '.join(options)}.{ending}"
    )
    return [ChatMessage(role="system", content=system), ChatMessage(role="user", content=user)]
