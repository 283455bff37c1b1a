"""Public API lists, the CLI entry point and the deployment files (checked statically: no Docker engine here)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["her_roleplay", "her_engines", "her_genrm", "rm_server", "policy_trainer", "eval"]


@pytest.mark.parametrize("name", PACKAGES)
def test_public_api_is_explicit_and_importable(name):
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported == sorted(exported, key=lambda s: (not s.isupper(), s)) or len(set(exported)) == len(exported)
    assert len(set(exported)) == len(exported), "duplicate names in __all__"
    for symbol in exported:
        assert hasattr(module, symbol), f"{name}.__all__ names {symbol!r} but the package lacks it"
    private_leaks = [s for s in exported if s.startswith("_")]
    assert private_leaks == []


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
