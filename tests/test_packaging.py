"""Public API lists, the CLI entry point and the deployment files (checked statically: no Docker engine here)."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each package's public names, pinned: a change to a public API is a change to this file, made on purpose.
PUBLIC_API = json.loads((ROOT / "tests" / "data" / "public_api.json").read_text())
PACKAGES = sorted(PUBLIC_API)


def _ruff_sorted(names: list[str]) -> list[str]:
    """The order ruff's RUF022 keeps: SCREAMING_CASE, then CamelCase, then the rest, each alphabetical."""
    return sorted(names, key=lambda s: (0 if s.isupper() else 1 if s[:1].isupper() else 2, s))


def test_every_package_is_pinned():
    top_level = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert sorted(top_level) == PACKAGES


@pytest.mark.parametrize("name", PACKAGES)
def test_public_api_is_pinned_sorted_and_importable(name):
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == PUBLIC_API[name], f"{name}.__all__ changed; update tests/data/public_api.json on purpose"
    assert exported == _ruff_sorted(exported), f"{name}.__all__ is not sorted"
    assert len(set(exported)) == len(exported), "duplicate names in __all__"
    assert [s for s in exported if s.startswith("_")] == []
    for symbol in exported:  # resolves, lazily loaded names included
        assert getattr(module, symbol, None) is not None, f"{name}.__all__ names {symbol!r} but the package lacks it"
    # Nothing public in the package's namespace is left out of __all__ (imports from other packages aside).
    unlisted = sorted(
        n for n, v in vars(module).items()
        if not n.startswith("_") and not inspect.ismodule(v) and n != "annotations" and n not in exported
        and getattr(v, "__module__", name).split(".")[0] == name
    )
    assert unlisted == [], f"{name} defines public names missing from __all__"


def test_the_sort_guard_catches_an_unsorted_list():
    assert _ruff_sorted(["b", "Name", "MAX", "a"]) == ["MAX", "Name", "a", "b"]
    assert ["b", "a"] != _ruff_sorted(["b", "a"])


def test_her_cli_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "her_cli.main", "--help"], capture_output=True, text=True, check=True)
    for command in ("chat", "judge", "serve", "train", "build", "eval"):
        assert re.search(rf"\b{command}\b", out.stdout)


def test_serve_help_is_generated_from_settings():
    from rm_server import ServerSettings

    out = subprocess.run([sys.executable, "-m", "her_cli.main", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in ServerSettings.model_fields:
        assert "--" + name.replace("_", "-") in out
    assert "RM_API_KEYS" in out


def test_dockerfiles_copy_only_existing_paths():
    dockerfiles = sorted((ROOT / "docker").glob("Dockerfile.*"))
    assert len(dockerfiles) == 3
    for dockerfile in dockerfiles:
        for src in re.findall(r"^COPY (\S+)", dockerfile.read_text(), flags=re.MULTILINE):
            assert (ROOT / src).exists(), f"{dockerfile.name} copies missing path {src}"


def test_the_packages_type_check():
    """`make lint`'s mypy run ([tool.mypy] in pyproject.toml: every package, pydantic's plugin) stays clean."""
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
