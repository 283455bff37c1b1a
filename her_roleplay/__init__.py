"""The role-play domain shared by every package: HER's dual-layer reply format and its
validators, the CoSER scene schema, actor prompts and per-character histories, and the
GenRM principle library."""

from ._format import (
    Finding,
    Reply,
    Segment,
    SegmentKind,
    as_her,
    coser_to_her,
    her_to_coser,
    parse_coser,
    parse_reply,
    public_view,
    render_coser,
    render_display,
    render_her,
    strip_system_thinking,
)
from ._principles import DIMENSIONS, Principle, PrincipleLibrary, default_library
from ._prompts import (
    CONVERSATION_START,
    REPLY_WORD_BUDGET,
    CharacterSample,
    build_actor_system_prompt,
    build_character_samples,
    build_chat_prompt,
)
from ._scene import (
    ENVIRONMENT,
    DialogueLine,
    KeyCharacter,
    Plot,
    PlotCharacter,
    Scene,
    SceneLoadError,
    load_scenes,
)
from ._validate import FINDING_CODES, find_repeated_patterns, validate_reply

__all__ = [
    "CONVERSATION_START",
    "DIMENSIONS",
    "ENVIRONMENT",
    "FINDING_CODES",
    "REPLY_WORD_BUDGET",
    "CharacterSample",
    "DialogueLine",
    "Finding",
    "KeyCharacter",
    "Plot",
    "PlotCharacter",
    "Principle",
    "PrincipleLibrary",
    "Reply",
    "Scene",
    "SceneLoadError",
    "Segment",
    "SegmentKind",
    "as_her",
    "build_actor_system_prompt",
    "build_character_samples",
    "build_chat_prompt",
    "coser_to_her",
    "default_library",
    "find_repeated_patterns",
    "her_to_coser",
    "load_scenes",
    "parse_coser",
    "parse_reply",
    "public_view",
    "render_coser",
    "render_display",
    "render_her",
    "strip_system_thinking",
    "validate_reply",
]
