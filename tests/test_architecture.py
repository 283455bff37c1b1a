"""The layering holds: no import circle, one engine registry that callers go through."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from her_engines import (
    Engine,
    EngineSettings,
    EngineUnavailable,
    GenRequest,
    GenResult,
    build_engine,
    engine_class,
    engine_kinds,
    register_engine,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["her_roleplay", "her_engines", "her_genrm", "rm_server", "policy_trainer", "eval", "data_builder",
            "her_cli"]
# Packages allowed to name an engine kind: the engine layer itself.
KIND_NAMERS = {"her_engines"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports, at import time or inside a function (a deferred import is still a
    dependency); `if TYPE_CHECKING:` blocks do not count."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                out.add(target if target in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in out if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_no_module_imports_itself_back():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package's __init__ imports its submodules; a submodule naming its own package is not a circle.
    for name, path in modules.items():
        if path.name != "__init__.py":
            graph[name].discard(name.rpartition(".")[0])
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_packages_form_layers():
    """Package-level: lower layers never import upper ones (her_roleplay/her_engines at the bottom)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        top = name.split(".")[0]
        graph.setdefault(top, set()).update(m.split(".")[0] for m in _imports(name, path, modules))
        graph[top].discard(top)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_engine_layer_names_an_engine_kind():
    kinds = set(engine_kinds())
    named = []
    for name, path in _modules().items():
        if name.split(".")[0] in KIND_NAMERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in kinds:
                named.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert named == []


class EchoEngine(Engine):
    """A registered backend from outside the package: echoes the last message back."""

    kind = "echo"
    continuous_batching = True

    def __init__(self, model: str, *, prefix: str = "") -> None:
        self.model_id, self.prefix = model, prefix

    @classmethod
    def options_from(cls, settings: EngineSettings) -> dict:
        return {"prefix": f"{settings.model}: "}

    async def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        texts = [r.messages[-1].content if r.messages else r.prompt or "" for r in requests]
        return [GenResult(text=self.prefix + text) for text in texts]

    async def aclose(self) -> None:
        pass


def test_a_new_engine_is_one_class_and_one_registration(monkeypatch):
    import asyncio

    import her_engines._registry as registry

    monkeypatch.setattr(registry, "_ENGINES", dict(registry._ENGINES))  # undone after the test
    register_engine("echo", f"{__name__}:EchoEngine")
    assert "echo" in engine_kinds()
    engine = build_engine(EngineSettings.model_construct(**{**EngineSettings().model_dump(), "engine": "echo",
                                                           "model": "m"}))
    assert isinstance(engine, EchoEngine) and isinstance(engine, Engine)
    assert (engine.kind, engine.tokenizer, engine.alive, engine.continues_turns) == ("echo", None, True, False)
    assert asyncio.run(engine.generate([GenRequest(prompt="hi")]))[0].text == "m: hi"
    register_engine("wrong", f"{__name__}:EchoEngine")
    with pytest.raises(EngineUnavailable, match="declares kind 'echo'"):
        engine_class("wrong")
